"""The SLO search through our real locustfile against simulated servers whose boundary is known.

Two load models (see :class:`server.sim.SimConfig`): one where every output token
slows as the batch grows (TPOT = itl_s x (1 + alpha x (running - 1)), so with
``tpot_ms: 20.5`` 11 users pass at 20 ms and 12 fail at 21 ms), one where at most 6
requests run and the rest wait for a slot (with ``ttft_ms: 100``, 6 users pass at
30 ms and 7 users queue). The search must bracket that level, end by its own
rules, log every probe as an ordinary stage, and name the cause from the server's
own evidence.
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
    # name: (sim config, SLOs, true boundary, cause)
    "decode": (dict(ttft_s=0.03, itl_s=0.01, itl_batch_alpha=0.1, batch_limit=64),
               "{tpot_ms: 20.5}", 11, "decode_slowdown"),
    "batch": (dict(ttft_s=0.03, itl_s=0.01, itl_batch_alpha=0.02, batch_limit=6),
              "{ttft_ms: 100}", 6, "queueing"),
}


def _scenario(tmp_path, slos: str):
    path = tmp_path / "search.yaml"
    path.write_text(
        "name: search\n"
        "defaults:\n"
        "  workload: {prompt_tokens: 32, output_tokens: 32, fixed_output: true}\n"
        "  timeouts: {connect_s: 5, first_token_s: 20, total_s: 30}\n"
        f"  slos: {slos}\n"
        "passes:\n"
        "  - name: find\n"
        "    search: {start: 4, growth: 2, max: 64, probe_s: 6, settle_s: 1.5, min_requests: 20, budget_s: 90}\n"
    )
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_search_brackets_the_known_boundary(start_sim, tmp_path, case):
    config, slos, truth, cause = CASES[case]
    url = start_sim(**config)
    out = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVELOPE_")}
    # through `envelope run`, which also scrapes the server's /metrics: the cause comes from there
    proc = subprocess.run([sys.executable, "-m", "envelope.cli", "run", "--scenario", str(_scenario(tmp_path, slos)),
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
