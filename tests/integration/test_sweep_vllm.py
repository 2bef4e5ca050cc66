"""``envelope sweep`` and ``envelope compare --gate`` against the real CPU vLLM (the tiny model).

The sweep launches the ``cpu-tiny`` profile twice, with ``max_num_seqs`` 4 and 16, and runs
``scenarios/gate.yaml`` (4 users, then 8, 12 s each) against each. With 4 batch slots the 8-user
stage queues (half the requests wait about one request's length for a slot), with 16 it does not.

Whether that wait breaks a fixed TTFT target depends on the machine's speed: the scenario's 400 ms
failed 4 slots at 8 users here (p95 471 ms, one request 324 ms) and passed them on a faster CI
machine. So the test sets the target from this machine's own request time, measured on the session's
server just before the sweep: half of one request's end-to-end time at 4 requests at once. Measured
here: the queued p95 TTFT is about 1.5 such requests (3x the target), the unqueued one 0.2 (0.4x).
The gate must pass two runs of the same configuration (the sweep's 16-slot run against a run on the
session's server, also ``cpu-tiny`` with 16 slots) and fail the 4-slot run against the 16-slot one.

The gate's intervals hold the noise within each run, not the drift between two runs on a shared 2-core
box, and that drift is large: same-configuration pairs of this test measured p95 TTFT at 8 users -53%,
+32% and +16% apart (the first pair read the other way round, +115%), and p95 TPOT up to +79%. So the test allows what this box
drifts, 200% (the allowances are the gate's settings for exactly this; docs/gate.md), while 4 slots
against 16 move the 8-user p95 TTFT by +500% or more and its attainment by tens of points.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from envelope.prompts import TokenizerProbe, calibrate
from helpers.locust_runs import REPO

pytestmark = [pytest.mark.slow]

SCENARIO = str(REPO / "scenarios" / "gate.yaml")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVELOPE_")}
    env.update(extra)
    return env


def _envelope(*args: str, env: dict[str, str] | None = None, timeout_s: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "envelope.cli", *args], cwd=REPO, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout_s)


def _one_request_s(vllm_server, workload: dict, at_once: int, rounds: int = 3) -> float:
    """The median end-to-end seconds of the scenario's request, ``at_once`` of them together."""
    model = vllm_server.served_model_name
    headers = {"Authorization": f"Bearer {vllm_server.api_key.get()}"}
    with httpx.Client(base_url=vllm_server.base_url, timeout=60, headers=headers) as http:
        def post(path: str, body: dict) -> dict:
            resp = http.post(path, json=body)
            resp.raise_for_status()
            return resp.json()

        def one(body: dict) -> float:
            t0 = time.perf_counter()
            answer = post("/v1/chat/completions", body)
            assert answer["usage"]["completion_tokens"] == workload["output_tokens"]
            return time.perf_counter() - t0

        factory = calibrate(TokenizerProbe(post, model))
        rng = random.Random(0)
        bodies = [{"model": model, "messages": factory.chat(workload["prompt_tokens"], rng).messages,
                   "max_tokens": workload["output_tokens"], "min_tokens": workload["output_tokens"],
                   "ignore_eos": True, "temperature": 0.0} for _ in range(at_once * (rounds + 1))]
        with ThreadPoolExecutor(at_once) as pool:
            list(pool.map(one, bodies[:at_once]))  # warm
            return statistics.median(pool.map(one, bodies[at_once:]))


def test_a_two_configuration_sweep_and_the_gate_on_cpu_tiny(vllm_server, tmp_path):
    scenario = yaml.safe_load(Path(SCENARIO).read_text())
    request_s = _one_request_s(vllm_server, scenario["defaults"]["workload"], at_once=4)
    scenario["defaults"]["slos"]["ttft_p95_ms"] = round(request_s * 1000 / 2)
    calibrated = tmp_path / "gate.yaml"
    calibrated.write_text(yaml.safe_dump(scenario, sort_keys=False))
    print(f"one request, 4 at once: {request_s * 1000:.0f} ms; TTFT p95 target {request_s * 500:.0f} ms")

    proc = _envelope("sweep", "--scenario", str(calibrated), "--profile", "cpu-tiny", "--set", "max_num_seqs=4,16",
                     "--out", str(tmp_path / "sweeps"), "--usd-per-hour", "0.10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "sweeps").iterdir()
    doc = json.loads((sweep_dir / "sweep.json").read_text())
    assert [(c["label"], c["status"]) for c in doc["configs"]] == [("max_num_seqs=4", "complete"),
                                                                   ("max_num_seqs=16", "complete")]
    four, sixteen = (sweep_dir / c["run_dir"] for c in doc["configs"])
    for run_dir, seqs in ((four, 4), (sixteen, 16)):
        server = json.loads((run_dir / "server.json").read_text())
        assert server["max_num_seqs"] == seqs and f"--max-num-seqs" in server["command"]
        assert server["command"][server["command"].index("--max-num-seqs") + 1] == str(seqs)
        assert (run_dir / "report" / "envelope.md").is_file() and (run_dir / "records").is_dir()
    md = (sweep_dir / "sweep.md").read_text()
    assert "chat: best is max_num_seqs=16" in md and (sweep_dir / "sweep.png").is_file()
    assert "| max_num_seqs=4 | complete | 4 users [failed at 8]" in md, md

    # the same configuration again, on the session's server (cpu-tiny, 16 slots, an API key)
    runs = tmp_path / "runs"
    same = _envelope("run", "--scenario", str(calibrated), "--host", vllm_server.base_url, "--out", str(runs),
                     "--api-key-env", "GATE_TEST_KEY", env=_env(GATE_TEST_KEY=vllm_server.api_key.get()))
    assert same.returncode == 0, same.stderr[-3000:]
    (again,) = runs.iterdir()

    drift = ("--max-ttft-regression", "200%", "--max-tpot-regression", "200%")
    ok = _envelope("compare", str(sixteen), str(again), "--gate", *drift, "--out", str(tmp_path / "ok"),
                   "--junit", str(tmp_path / "ok.xml"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Gate: pass" in ok.stdout
    bad = _envelope("compare", str(sixteen), str(four), "--gate", *drift, "--out", str(tmp_path / "bad"),
                    "--junit", str(tmp_path / "bad.xml"))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "Gate: FAIL" in bad.stdout
    suite = ET.parse(tmp_path / "bad.xml").getroot()
    failed = [case.get("name") for case in suite.iter("testcase") if case.find("failure") is not None]
    assert "chat / 8 users: TTFT p95" in failed, failed  # beyond even the 200% allowance
    assert "chat / 8 users: attainment" in failed, failed
    assert int(suite.get("failures")) == len(failed) >= 1

