"""``envelope sweep`` over simulated servers whose boundary is known: the search finds each, and the sweep
report ranks them.

Two simulated servers differ only in their batch limit (4 and 16 requests at once; the rest wait for a
slot). A request takes ~0.18 s (20 ms to the first token, then 32 tokens 5 ms apart). With TTFT <= 40 ms
for 95% of requests as the SLO, B users pass (nobody waits) and B + 1 fail: every request then waits for
the next of B running requests to end, over 20 ms for 15% of requests even at B = 16 ((1 - 20/180)^16). The sweep over them (``--host``, one configuration per server) must bracket each batch limit, find
boundaries that grow with it, name the largest the best, and give throughput and cost there.

Each probe is held until 73 requests are judged (the default ``min_requests``: the fewest that can pass 95%
with confidence), so a clean probe passes the first time instead of being repeated as unresolved; the
bracketing of a known boundary by the search itself is tested at length in test_search_sim.py.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from helpers.locust_runs import REPO

pytestmark = [pytest.mark.slow]

SCENARIO = """\
name: batch-limits
defaults:
  workload: {prompt_tokens: 32, output_tokens: 32, fixed_output: true}
  timeouts: {connect_s: 5, first_token_s: 20, total_s: 30}
  slos: {ttft_ms: 40}
passes:
  - name: find
    search: {start: 4, growth: 2, max: 32, probe_s: 2, settle_s: 0.5, budget_s: 20}
"""


def test_a_sweep_over_batch_limits_finds_growing_boundaries_and_names_the_best(start_sim, tmp_path):
    limits = (4, 16)
    urls = [start_sim(ttft_s=0.02, itl_s=0.005, batch_limit=b) for b in limits]
    scenario = tmp_path / "limits.yaml"
    scenario.write_text(SCENARIO)
    out = tmp_path / "sweeps"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVELOPE_")}
    argv = [sys.executable, "-m", "envelope.cli", "sweep", "--scenario", str(scenario), "--out", str(out),
            "--usd-per-hour", "2.50"]
    for u in urls:
        argv += ["--host", u]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep_dir,) = out.iterdir()
    doc = json.loads((sweep_dir / "sweep.json").read_text())
    assert doc["status"] == "complete"
    assert [c["host"] for c in doc["configs"]] == urls
    assert [c["status"] for c in doc["configs"]] == ["complete"] * len(limits)

    with open(sweep_dir / "sweep-table.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["configuration"] for r in rows] == urls
    passed = [float(r["passed_level"]) for r in rows]
    failed = [float(r["failed_level"]) for r in rows]
    for limit, lo, hi, r in zip(limits, passed, failed, rows):
        assert lo <= limit < hi, (limit, r)  # the bracket holds the true limit
        assert r["cause"] == "queueing", r  # named from the simulator's own queue metrics
        assert r["broke_first"] == "p95 TTFT" or r["broke_first"] == "SLO attainment", r
        assert float(r["output_tokens_per_s"]) > 0 and float(r["usd_per_million_output_tokens"]) > 0
    assert passed == sorted(passed) and passed[0] < passed[-1]  # boundaries grow with the batch limit
    # more users at the boundary, more output per dollar
    assert float(rows[-1]["usd_per_million_output_tokens"]) < float(rows[0]["usd_per_million_output_tokens"])

    md = (sweep_dir / "sweep.md").read_text()
    assert f"find: best is {urls[-1]}, meeting the SLOs up to {passed[-1]:g} users" in md
    assert "Every other configuration failed at or below that level." in md
    assert (sweep_dir / "sweep.png").stat().st_size > 10_000
    assert "<img" in (sweep_dir / "sweep.html").read_text()
    for c in doc["configs"]:  # each configuration is an ordinary run directory with its own report
        run_dir = sweep_dir / c["run_dir"]
        assert (run_dir / "report" / "envelope.md").is_file()
        assert json.loads((run_dir / "run.json").read_text())["options"]["sweep"]["label"] == c["label"]
    assert f"find: best is {urls[-1]}" in proc.stdout


def test_an_interrupted_sweep_keeps_what_it_measured_and_reports_it(start_sim, tmp_path):
    """Ctrl-C during the first configuration: its run ends partial with its records, the second is never
    started, and the sweep still writes sweep.json and its report, then exits 130."""
    import signal
    import time

    urls = [start_sim(ttft_s=0.02, itl_s=0.005) for _ in range(2)]
    scenario = tmp_path / "long.yaml"
    scenario.write_text("name: long\ndefaults:\n  workload: {prompt_tokens: 32, output_tokens: 16, fixed_output: true}\n"
                        "  slos: {ttft_p95_ms: 500}\npasses:\n  - name: p\n    stages: [{users: 2, duration_s: 120}]\n")
    out = tmp_path / "sweeps"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVELOPE_")}
    proc = subprocess.Popen([sys.executable, "-m", "envelope.cli", "sweep", "--scenario", str(scenario),
                             "--out", str(out), "--host", urls[0], "--host", urls[1]],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(out.glob("*/01-*/records/*.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # a few seconds of records
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    (sweep_dir,) = out.iterdir()
    doc = json.loads((sweep_dir / "sweep.json").read_text())
    assert doc["status"] == "partial"
    assert [c["status"] for c in doc["configs"]] == ["partial", "not_run"]
    first = sweep_dir / doc["configs"][0]["run_dir"]
    records = [line for f in (first / "records").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert len(records) > 5
    assert not (sweep_dir / doc["configs"][1]["run_dir"]).exists()
    md = (sweep_dir / "sweep.md").read_text()
    assert "This sweep is **partial**" in md and "| 2 | " in md and "not run" in md
    assert "Traceback" not in stderr
