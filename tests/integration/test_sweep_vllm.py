"""``envelope sweep`` and ``envelope compare --gate`` against the real CPU vLLM (the tiny model).

The sweep launches the ``cpu-tiny`` profile twice, with ``max_num_seqs`` 4 and 16, and runs
``scenarios/gate.yaml`` (4 users, then 8, 12 s each) against each. With 4 batch slots the 8-user
stage queues (every request waits about one request's length for a slot: 8 users on 4 slots take
twice a request's time, Little's law), with 16 it does not.

Whether that wait breaks a fixed TTFT target depends on the machine: the scenario's 400 ms failed
4 slots at 8 users on one box and passed them on a faster CI machine. So the test sets its targets
from the machine (tests/helpers/calibration.py), measured on the session's server just before the
sweep, 4 streamed requests at once: the TTFT target is their TTFT plus half their end-to-end time,
between a request that gets a slot at once and one that waits a whole request for it.
The margin on each side is then half a request, and the test makes it large against the noise of a
2-core box, whose speed has changed 2x within minutes: its copy of the scenario asks for 64-token
prompts and 128 output tokens instead of 256 and 64.
With the scenario's own workload an AVX2-only box spent half a request in prefill (TTFT 0.8-0.9 s of
1.4-1.7 s, 4 at once), so the 16-slot 8-user p95 TTFT (1.0-1.4 s, 12 requests: their slowest) and the
target (1.7-1.8 s) were less than one such change apart: one CI run failed the 16-slot configuration
and could not name a best one. Short prompts also keep prefill steps from stretching TPOT (p95 55 ms
against 10 ms at once, there); the TPOT target is the scenario's 100 ms, or 5x the measured TPOT if
that is more. With them, on that box: 4 at once TTFT 0.24 s and 1.76 s end to end, target 1,123 ms;
the 8-user p95 TTFT was 261 ms with 16 slots and 2,313 ms with 4.
The gate must pass two runs of the same configuration (the sweep's 16-slot run against a run on the
session's server, also ``cpu-tiny`` with 16 slots) and fail the 4-slot run against the 16-slot one.

The gate's intervals hold the noise within each run, not the drift between two runs on a shared 2-core
box, and that drift is large: same-configuration pairs of this test measured p95 TTFT at 8 users -53%,
+32% and +16% apart (the first pair read the other way round, +115%), and p95 TPOT up to +79%. So the test allows what this box
drifts, 200% (the allowances are the gate's settings for exactly this; docs/gate.md). A window of a
12 s stage holds 8-20 requests on a slow box, fewer than the 20 a side the gate judges a p95 from, so
the test requires the attainment regression, which the sweep's own verdict fixes (4 slots fail at 8
users, 16 pass), and the 8-user p95 TTFT at least 1.5x the 16-slot one in the gate's table, judged or not.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from helpers.calibration import at_once
from helpers.locust_runs import REPO

pytestmark = [pytest.mark.slow]

SCENARIO = str(REPO / "scenarios" / "gate.yaml")
# the test's workload: short prompts, long answers, so that a wait for a slot dwarfs a prefill (docstring)
PROMPT_TOKENS, OUTPUT_TOKENS = 64, 128


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVELOPE_")}
    env.update(extra)
    return env


def _envelope(*args: str, env: dict[str, str] | None = None, timeout_s: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "envelope.cli", *args], cwd=REPO, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout_s)


def _calibrated(vllm_server, tmp_path: Path) -> Path:
    """gate.yaml with the test's workload and SLOs set from 4 of its requests at once on the session's server."""
    scenario = yaml.safe_load(Path(SCENARIO).read_text())
    workload = scenario["defaults"]["workload"]
    workload.update(prompt_tokens=PROMPT_TOKENS, output_tokens=OUTPUT_TOKENS)
    four = at_once(vllm_server, prompt_tokens=PROMPT_TOKENS, output_tokens=OUTPUT_TOKENS, n=4)
    slos = scenario["defaults"]["slos"]
    slos["ttft_p95_ms"] = round(four.queue_target_ms())
    slos["tpot_p95_ms"] = max(slos["tpot_p95_ms"], round(5 * four.tpot_median_s * 1000))
    print(f"{four.describe()}; TTFT p95 target {slos['ttft_p95_ms']} ms, TPOT p95 target {slos['tpot_p95_ms']} ms")
    calibrated = tmp_path / "gate.yaml"
    calibrated.write_text(yaml.safe_dump(scenario, sort_keys=False))
    return calibrated


def test_a_two_configuration_sweep_and_the_gate_on_cpu_tiny(vllm_server, tmp_path):
    calibrated = _calibrated(vllm_server, tmp_path)

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
    assert "chat: best is max_num_seqs=16" in md and (sweep_dir / "sweep.png").is_file(), md
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
    # The queue shows in the 8-user p95 TTFT too. Whether the gate judges it depends on the machine (a slow
    # one leaves fewer than the 20 requests a window it judges a p95 from); its table gives both p95s anyway.
    row = re.search(r"^\| chat / 8 users: TTFT p95 \| ([\d.]+) ms \| ([\d.]+) ms \|",
                    (tmp_path / "bad" / "gate.md").read_text(), flags=re.M)
    assert row and float(row.group(2)) > 1.5 * float(row.group(1)), row

