"""The server dies in the middle of a stage: the run goes on, loses nothing, and the report says so.

A headless run of our locustfile, three stages; a few seconds into the second stage the server's
whole process group is SIGKILLed. The run must still complete its schedule, every request must
be in the records and in Locust's count (succeeded, or failed with a category), and the report
must say when the server stopped answering, in which stage, and that the envelope above that
point is unknown. Once against the simulated server (fast), once against the real CPU vLLM.
"""

from __future__ import annotations

import io
import os
import secrets
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from analysis.cli import main as analysis_main
from analysis.failures import NO_ANSWER_CATEGORIES, run_server_stop
from analysis.load import load_run, run_start_unix_s
from analysis.table import envelope_table
from envelope.records import ErrorCategory
from envelope.telemetry import MetricsSampler, TelemetryRecorder
from helpers.locust_runs import locust_request_count, records, run_locust
from helpers.locust_runs import stages as read_stage_dicts

KILL_IN_STAGE = 1  # the second stage
KILL_AFTER_S = 3.0  # into that stage

STAGE_NAMES = ["death-1u", "death-2u", "death-3u"]


def _scenario(path: Path, *, durations_s: tuple[float, float, float], output_tokens: int, first_token_s: float,
              total_s: float) -> Path:
    path.write_text(f"""
name: death
seed: 0
defaults:
  client: fasthttp
  endpoint: chat
  timeouts: {{connect_s: 5, first_token_s: {first_token_s}, total_s: {total_s}}}
  workload: {{prompt_tokens: 64, output_tokens: {output_tokens}, fixed_output: true}}
  slos: {{ttft_p95_ms: 10000, e2e_p95_ms: 60000, error_rate_max: 0.05}}
passes:
  - name: death
    stages:
      - {{users: 1, spawn_rate: 10, duration_s: {durations_s[0]}}}
      - {{users: 2, spawn_rate: 10, duration_s: {durations_s[1]}}}
      - {{users: 3, spawn_rate: 10, duration_s: {durations_s[2]}}}
""")
    return path


@dataclass
class Killed:
    run_dir: Path
    returncode: int
    stderr: str
    kill_unix_s: float
    summary: str


def _kill_group(pid: int) -> None:
    """SIGKILL the process group, and any descendant that left it."""
    try:
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        family = []
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for proc in family:
        try:
            proc.kill()
        except psutil.Error:
            pass


def _run_and_kill(tmp_path: Path, base_url: str, api_key: str | None, pid: int, scenario: Path) -> Killed:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recorder = TelemetryRecorder(run_dir / "telemetry", {"metrics": MetricsSampler(base_url + "/metrics")},
                                 interval_s=0.5).start()
    killed: dict[str, float] = {}
    done = threading.Event()

    def killer() -> None:
        while not done.is_set():
            try:
                stages = read_stage_dicts(run_dir)
            except (OSError, ValueError):
                stages = []
            if len(stages) > KILL_IN_STAGE:
                done.wait(KILL_AFTER_S)
                if not done.is_set():
                    killed["t"] = time.time()
                    _kill_group(pid)
                return
            done.wait(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        proc = run_locust(base_url, api_key, scenario, run_dir, timeout_s=600)
    finally:
        done.set()
        thread.join(10)
        recorder.stop()
    assert "t" in killed, f"the run never reached stage {KILL_IN_STAGE}: {proc.stderr[-3000:]}"
    out, err = io.StringIO(), io.StringIO()
    assert analysis_main([str(run_dir)], out=out, err=err) == 0, err.getvalue()
    return Killed(run_dir=run_dir, returncode=proc.returncode, stderr=proc.stderr, kill_unix_s=killed["t"],
                  summary=out.getvalue())


def _check(k: Killed) -> None:
    # the run completed its schedule
    assert k.returncode in (0, 1), k.stderr[-3000:]  # 1: Locust saw failed requests
    stages = read_stage_dicts(k.run_dir)
    assert [s["stage_name"] for s in stages] == STAGE_NAMES
    for s in stages:
        assert s["end_unix_s"] is not None and s["end_unix_s"] >= s["start_unix_s"] + s["duration_s"] - 2.0

    # every request is accounted for
    recs = records(k.run_dir)
    assert len(recs) == locust_request_count(k.run_dir)
    known = {v for name, v in vars(ErrorCategory).items() if name.isupper()}
    assert all(r["error_category"] is None or r["error_category"] in known for r in recs)
    assert not [r for r in recs if r["error_category"] == ErrorCategory.CLIENT_ERROR]
    ok_before = [r for r in recs if r["error_category"] is None and r["stage_name"] == STAGE_NAMES[0]]
    assert ok_before, "nothing succeeded before the server died"
    after = [r for r in recs if r["wall_start_unix_s"] > k.kill_unix_s + 0.5]
    assert after and all(r["error_category"] in NO_ANSWER_CATEGORIES | {ErrorCategory.CANCELLED} for r in after)
    assert {r["stage_name"] for r in after} == set(STAGE_NAMES[KILL_IN_STAGE:])
    # users back off (50 ms doubling to 1 s) while nothing listens, instead of thousands of records a second
    span_s = max(r["wall_start_unix_s"] for r in after) - k.kill_unix_s
    assert len(after) <= 3 * (span_s + 6)

    # the analysis finds when and where the server stopped answering
    run = load_run(k.run_dir)
    stop = run_server_stop(run)
    assert stop is not None
    assert stop.t_unix_s >= k.kill_unix_s  # nothing can show the death before it happened
    first_after = min(r["wall_start_unix_s"] + r["t_done_s"] - r["t_start_s"] for r in after)
    assert stop.t_unix_s <= first_after
    assert stop.stage_name == STAGE_NAMES[KILL_IN_STAGE]
    assert [s.stage_name for s in run.stages if s.stage_index in stop.affected_stage_indices] == \
        STAGE_NAMES[KILL_IN_STAGE:]
    assert stop.metrics_failed_from_unix_s is not None  # telemetry saw the server go too
    assert stop.metrics_failed_from_unix_s >= k.kill_unix_s
    rows = envelope_table(run)
    assert [r["server_stopped"] for r in rows] == [False, True, True]

    # and the report says it, in Markdown, HTML and the printed summary
    md = (k.run_dir / "report" / "envelope.md").read_text()
    html = (k.run_dir / "report" / "envelope.html").read_text()
    # one time zero for every "at N s" of the report: the run's start (as the table's windows)
    said = f"The server stopped answering at {stop.t_unix_s - run_start_unix_s(run):,.1f} s " \
           f"(stage {STAGE_NAMES[KILL_IN_STAGE]})"
    for text in (md, html, k.summary):
        assert said in text
        assert "the envelope above 1 user is unknown" in text
    assert "The envelope above that point is unknown: death-2u, death-3u are not judged." in md


@pytest.mark.slow
def test_simulated_server_killed_mid_stage(tmp_path):
    from server.sim import SimConfig, SimServer

    scenario = _scenario(tmp_path / "death.yaml", durations_s=(3, 5, 2), output_tokens=16, first_token_s=5,
                         total_s=10)
    sim = SimServer(SimConfig(ttft_s=0.02, itl_s=0.01)).start_in_subprocess(log_path=tmp_path / "sim.log")
    try:
        killed = _run_and_kill(tmp_path, sim.base_url, None, sim.pid, scenario)
    finally:
        sim.stop()
    _check(killed)


@pytest.mark.vllm
@pytest.mark.slow
def test_real_vllm_killed_mid_stage(tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    from envelope.secrets import Secret
    from server.launcher import LaunchError, VllmServer
    from server.profiles import load_profile

    # a server of our own (not the session's shared one): this test kills it
    api_key = Secret(f"sk-test-{secrets.token_hex(16)}")
    server = VllmServer(load_profile("cpu-tiny"), run_dir=tmp_path / "server", api_key=api_key)
    try:
        server.start()
    except LaunchError as exc:
        pytest.fail(f"could not launch vLLM: {exc}", pytrace=False)
    # a request takes ~0.3 s here: the first stage's window (its second half) holds several that succeeded,
    # and the second stage runs 4 s past the kill, long enough for the backed-off users to fail again
    scenario = _scenario(tmp_path / "death.yaml", durations_s=(5, 7, 3), output_tokens=32, first_token_s=30,
                         total_s=60)
    try:
        killed = _run_and_kill(tmp_path, server.base_url, api_key.get(), server.pid, scenario)
    finally:
        try:
            server.stop(grace_s=5.0)
        except LaunchError:
            pass
    _check(killed)
