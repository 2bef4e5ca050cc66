"""``envelope sweep`` and ``envelope compare --gate`` against the real CPU vLLM (the tiny model).

The sweep launches the ``cpu-tiny`` profile twice, with ``max_num_seqs`` 4 and 16, and runs
``scenarios/gate.yaml`` (4 users, then 8, 12 s each) against each. With 4 batch slots the 8-user
stage queues (half the requests wait about one request's length for a slot), with 16 it does not.

Whether that wait breaks a fixed TTFT target depends on the machine: the scenario's 400 ms failed
4 slots at 8 users on one box (p95 471 ms, one request 324 ms) and passed them on a faster CI machine;
on an AVX2-only box, where prefill is half of a request (TTFT 0.83 s of 1.44 s, 4 at once), even the
unqueued 4-user stage missed half a request's time. So the test sets the target from what it must
separate, measured on the session's server just before the sweep, streamed, 4 requests at once: a
request that gets a slot at once sees about that TTFT (the 16-slot 8-user stage's p95 was 0.87 s
against 0.80-0.87 s measured so), one that queues waits about a request's end-to-end time more (the
4-slot 8-user p95 was 2.05-2.08 s against 0.8 s + 1.4-1.7 s). The target is the TTFT plus half a
request. (Halfway to the slowest of 8 requests sent together set it too high: sent together, their
prefills queue behind each other, which a closed loop's staggered arrivals do not.)
The gate must pass two runs of the same configuration (the sweep's 16-slot run against a run on the
session's server, also ``cpu-tiny`` with 16 slots) and fail the 4-slot run against the 16-slot one.

The gate's intervals hold the noise within each run, not the drift between two runs on a shared 2-core
box, and that drift is large: same-configuration pairs of this test measured p95 TTFT at 8 users -53%,
+32% and +16% apart (the first pair read the other way round, +115%), and p95 TPOT up to +79%. So the test allows what this box
drifts, 200% (the allowances are the gate's settings for exactly this; docs/gate.md), while 4 slots
against 16 moved the 8-user p95 TTFT by +500% or more here and its attainment by tens of points. On a
faster CI box the TTFT rise stayed within the 200% allowance, and on a slow box a window holds too few
requests for the gate to judge a p95 at all. So the test requires the attainment regression, which the
sweep's own verdict fixes (4 slots fail at 8 users, 16 pass), and the 8-user p95 TTFT at least 1.5x the
16-slot one in the gate's table, judged or not.
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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


@dataclass(frozen=True)
class _Timing:
    """Streamed requests of the scenario's workload on the session's server, ``n`` at once (seconds)."""

    ttft_s: list[float]
    e2e_s: list[float]


def _at_once(vllm_server, workload: dict, at_once: int, rounds: int = 3) -> _Timing:
    """TTFT and end-to-end time of the scenario's request, ``at_once`` of them together, ``rounds`` times
    (after one warm-up round), every request streamed as Envelope streams it."""
    model = vllm_server.served_model_name
    headers = {"Authorization": f"Bearer {vllm_server.api_key.get()}"}
    with httpx.Client(base_url=vllm_server.base_url, timeout=120, headers=headers) as http:
        def post(path: str, body: dict) -> dict:
            resp = http.post(path, json=body)
            resp.raise_for_status()
            return resp.json()

        def one(body: dict) -> tuple[float, float]:
            t0 = time.perf_counter()
            first, tokens = None, 0
            with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    usage = json.loads(line[len("data: "):]).get("usage") or {}
                    tokens = usage.get("completion_tokens", tokens)
                    if first is None and tokens >= 1:
                        first = time.perf_counter() - t0
            assert tokens == workload["output_tokens"] and first is not None
            return first, time.perf_counter() - t0

        factory = calibrate(TokenizerProbe(post, model))
        rng = random.Random(0)
        bodies = [{"model": model, "messages": factory.chat(workload["prompt_tokens"], rng).messages,
                   "max_tokens": workload["output_tokens"], "min_tokens": workload["output_tokens"],
                   "ignore_eos": True, "temperature": 0.0, "stream": True,
                   "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
                  for _ in range(at_once * (rounds + 1))]
        timing = _Timing(ttft_s=[], e2e_s=[])
        with ThreadPoolExecutor(at_once) as pool:
            list(pool.map(one, bodies[:at_once]))  # warm
            for r in range(1, rounds + 1):
                for ttft, e2e in pool.map(one, bodies[r * at_once:(r + 1) * at_once]):
                    timing.ttft_s.append(ttft)
                    timing.e2e_s.append(e2e)
        return timing


def _ttft_target_ms(vllm_server, workload: dict) -> float:
    """A p95 TTFT target between the 8-user stage's TTFT without a queue and with one (module docstring):
    a request's TTFT when it starts at once, plus half of what a queued one waits for a slot."""
    four = _at_once(vllm_server, workload, 4)
    ttft, e2e = statistics.median(four.ttft_s), statistics.median(four.e2e_s)
    target = ttft + e2e / 2
    print(f"4 at once: TTFT {ttft * 1000:.0f} ms, end to end {e2e * 1000:.0f} ms; "
          f"TTFT p95 target {target * 1000:.0f} ms")
    return target * 1000


def test_a_two_configuration_sweep_and_the_gate_on_cpu_tiny(vllm_server, tmp_path):
    scenario = yaml.safe_load(Path(SCENARIO).read_text())
    scenario["defaults"]["slos"]["ttft_p95_ms"] = round(_ttft_target_ms(vllm_server, scenario["defaults"]["workload"]))
    calibrated = tmp_path / "gate.yaml"
    calibrated.write_text(yaml.safe_dump(scenario, sort_keys=False))

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
    assert "chat / 8 users: attainment" in failed, failed
    assert int(suite.get("failures")) == len(failed) >= 1
    # The queue shows in the 8-user p95 TTFT too. Whether the gate judges it depends on the machine: beyond
    # even the 200% allowance here (+500%), within it on a faster CI box, and not judged at all on a slow
    # one (16-20 requests a window, the gate judges a p95 from 20). The gate's table gives both p95s anyway.
    row = re.search(r"^\| chat / 8 users: TTFT p95 \| ([\d.]+) ms \| ([\d.]+) ms \|",
                    (tmp_path / "bad" / "gate.md").read_text(), flags=re.M)
    assert row and float(row.group(2)) > 1.5 * float(row.group(1)), row

