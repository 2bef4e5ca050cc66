"""The SLO search through our real locustfile against simulated servers whose boundary is known.

A load model where every output token slows as the batch grows (TPOT = itl_s x
(1 + alpha x (running - 1)), so with ``tpot_ms: 20.5`` 11 users pass at 20 ms and
12 fail at 21 ms; see :class:`server.sim.SimConfig`). The search must bracket that
level, end by its own rules, log every probe as an ordinary stage, and name the
cause from the server's own evidence. The SLO asks 90% of requests to meet it: in this model nearly
all of a level's requests pass (11 users: 100%) or fail (12 users: 0-6%), so the target does not move the
boundary, and each probe is held until 35 requests are judged (the default ``min_requests``, the fewest
that can pass 90% with confidence), which a clean 6 s probe reaches. (At 95%, 73 a probe: with 20, every
passing level was probed twice; with 73, the first probes ran 11 s.) The other load model, a batch limit
(requests beyond it wait for a slot: cause "queueing"), is searched at two limits by the sweep test
(tests/integration/test_sweep_sim.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from analysis.load import load_run
from analysis.search import search_findings
from analysis.table import envelope_table
from helpers.locust_runs import REPO

pytestmark = [pytest.mark.slow]

CASES = {
    # name: (sim config, SLOs, first level, true boundary, cause)
    "decode": (dict(ttft_s=0.03, itl_s=0.01, itl_batch_alpha=0.1, batch_limit=64),
               "{tpot_ms: 20.5, attainment_min: 0.9}", 4, 11, "decode_slowdown"),
}


def _scenario(tmp_path, slos: str, start: int):
    path = tmp_path / "search.yaml"
    path.write_text(
        "name: search\n"
        "defaults:\n"
        "  workload: {prompt_tokens: 32, output_tokens: 32, fixed_output: true}\n"
        "  timeouts: {connect_s: 5, first_token_s: 20, total_s: 30}\n"
        f"  slos: {slos}\n"
        "passes:\n"
        "  - name: find\n"
        f"    search: {{start: {start}, growth: 2, max: 64, probe_s: 6, settle_s: 1.5, budget_s: 90}}\n"
    )
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_search_brackets_the_known_boundary(start_sim, tmp_path, case):
    config, slos, start, truth, cause = CASES[case]
    url = start_sim(**config)
    out = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVELOPE_")}
    # through `envelope run`, which also scrapes the server's /metrics: the cause comes from there
    proc = subprocess.run([sys.executable, "-m", "envelope.cli", "run", "--scenario", str(_scenario(tmp_path, slos, start)),
                           "--host", url, "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = out.iterdir()

    log = json.loads((run_dir / "search.json").read_text())["searches"]
    (live,) = log
    assert live["done"], live
    assert live["highest_pass"] is not None and live["lowest_fail"] is not None, live
    assert live["highest_pass"] <= truth < live["lowest_fail"], live
    assert len(live["probes"]) <= 15

    stages = json.loads((run_dir / "stages.json").read_text())["stages"]
    assert [s["stage_name"] for s in stages] == [p["stage_name"] for p in live["probes"]]
    assert all(s["end_unix_s"] is not None for s in stages)
    assert [s["target_users"] for s in stages] == [p["level"] for p in live["probes"]]

    run = load_run(run_dir)
    rows = envelope_table(run)
    (finding,) = search_findings(rows, run.searches)
    b = finding.bracket
    assert b.highest_pass is not None and b.lowest_fail is not None, b
    assert b.highest_pass <= truth < b.lowest_fail, b
    assert finding.cause == cause, (finding.cause, finding.evidence)
    assert all(r.goodput.attainment is not None for r in rows)


def test_a_rate_search_across_two_processes_then_stages_under_and_over_capacity(start_sim, tmp_path):
    """Open loop, two worker processes: each probe's rate is split between them, every record carries the
    probe the master announced, and the search brackets the rate where requests start to queue. Then two
    fixed stages run after the search: 5/s is steady, 20/s builds a queue through its window, and only that
    one is flagged over capacity.

    At most 4 requests run (32 tokens every 10 ms: ~0.35 s each, ~11 requests/s); TTFT <= 150 ms holds
    well under that rate and fails above it (requests wait for a slot). The search starts at 8/s, under the
    capacity (constant arrivals: no request waits there), so it still doubles to a failing level and bisects
    back; from 4/s its first probe took 11 s to collect its 36 requests. (The over-capacity stages were a
    test of their own against the same simulated server, one process; the flag is computed from the
    records, whichever process sent them.)"""
    from helpers.locust_runs import records, run_locust

    url = start_sim(ttft_s=0.03, itl_s=0.01, batch_limit=4)
    path = tmp_path / "rate.yaml"
    path.write_text(
        "name: rate\n"
        "defaults:\n"
        "  workload: {prompt_tokens: 32, output_tokens: 32, fixed_output: true}\n"
        "  timeouts: {connect_s: 5, first_token_s: 60, total_s: 60}\n"
        "  slos: {ttft_ms: 150, attainment_min: 0.9}\n"
        "passes:\n"
        "  - name: find\n"
        "    search: {over: rate, start: 8, growth: 2, max: 32, precision_rel: 0.25, arrival: constant,\n"
        "             probe_s: 6, settle_s: 1.5, min_requests: 36, budget_s: 50}\n"
        "  - name: p\n"
        "    stages:\n"
        "      - {name: under, rate_per_s: 5, arrival: constant, duration_s: 10}\n"
        "      - {name: over, rate_per_s: 20, arrival: constant, duration_s: 10}\n"
    )
    run_dir = tmp_path / "run"
    proc = run_locust(url, None, path, run_dir, "--processes", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (live,) = json.loads((run_dir / "search.json").read_text())["searches"]
    stages = json.loads((run_dir / "stages.json").read_text())["stages"]
    probes = [s for s in stages if s["pass_name"] == "find"]
    assert [s["stage_name"] for s in probes] == [p["stage_name"] for p in live["probes"]]
    assert [s["target_rate_per_s"] for s in probes] == [p["level"] for p in live["probes"]]
    # the fixed stages ran after the search
    assert len(probes) >= 3 and [s["stage_name"] for s in stages[-2:]] == ["under", "over"]
    assert stages[-1]["stage_index"] == len(stages) - 1
    recs = records(run_dir)
    by_stage = {}
    for r in recs:
        by_stage.setdefault((r["stage_index"], r["stage_name"]), set()).add(r["worker_id"])
    names = {s["stage_index"]: s["stage_name"] for s in stages}
    assert all(names[index] == name for index, name in by_stage)  # workers stamped the master's probes
    assert all(len(workers) == 2 for workers in by_stage.values())
    assert live["highest_pass"] is not None and live["lowest_fail"] is not None, live
    assert live["highest_pass"] < 11.5 <= live["lowest_fail"] * 1.5, live  # capacity ~11/s lies at or above the pass

    rows = {r.stage_name: r for r in envelope_table(load_run(run_dir))}
    under, over = rows["under"], rows["over"]
    assert under.goodput.over_capacity is False, under.goodput.over_capacity_note
    assert over.goodput.over_capacity is True, over.goodput.over_capacity_note
    assert over.goodput.over_capacity_note.startswith("over capacity: in flight rose")
