"""Integration fixtures: one quick capstone run against the session's real vLLM, shared by several tests;
simulated servers started per test."""

from __future__ import annotations

import pytest

from helpers.locust_runs import REPO, generation_tokens_total, run_locust


@pytest.fixture(scope="session")
def capstone_run(vllm_server, tmp_path_factory):
    """(run_dir, server_generation_tokens_delta) of ``scenarios/capstone.yaml`` at ``--duration-scale 0.25``
    (stages of 20-30 s, to keep CI short), its fixed passes only.

    The server's ``/metrics`` is recorded to ``telemetry/metrics.jsonl`` meanwhile, every second, as
    ``envelope run`` does (no GPU or host streams: Locust runs here as a plain child process). The
    capstone's search passes are left out (the e2e test runs them through ``envelope run``): they would
    add several minutes to what these tests check, the analysis of fixed stages on a real server.
    """
    import yaml

    from envelope.telemetry import MetricsSampler, TelemetryRecorder

    base = tmp_path_factory.mktemp("capstone")
    scenario = yaml.safe_load((REPO / "scenarios" / "capstone.yaml").read_text())
    scenario["passes"] = [p for p in scenario["passes"] if "search" not in p]
    fixed = base / "capstone.yaml"
    fixed.write_text(yaml.safe_dump(scenario, sort_keys=False))
    run_dir = base / "run"
    before = generation_tokens_total(vllm_server.metrics_url)
    with TelemetryRecorder(run_dir / "telemetry", {"metrics": MetricsSampler(vllm_server.metrics_url)},
                           interval_s=1.0):
        proc = run_locust(vllm_server.base_url, vllm_server.api_key.get(), fixed, run_dir, "--quick",
                          "--duration-scale", "0.25", timeout_s=900)
    if proc.returncode != 0:
        pytest.fail(f"capstone run failed (exit {proc.returncode}): {proc.stderr[-3000:]}", pytrace=False)
    after = generation_tokens_total(vllm_server.metrics_url)
    return run_dir, after - before


@pytest.fixture
def start_sim():
    """``start_sim(**SimConfig fields) -> base URL``: a simulated server in a subprocess, stopped after the test."""
    from server.sim import SimConfig, SimServer

    started = []

    def start(**config) -> str:
        config.setdefault("max_model_len", 4096)
        proc = SimServer(SimConfig(**config)).start_in_subprocess()
        started.append(proc)
        return proc.base_url

    yield start
    for proc in started:
        proc.stop()
