"""Clean windows and stall accounting through our real locustfile against the simulated server."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.load import load_run
from analysis.table import WindowRule, envelope_table, steady_window
from helpers.locust_runs import REPO, run_locust

pytestmark = [pytest.mark.slow]

PLUGIN = REPO / "tests" / "helpers" / "stall_plugin.py"


def _scenario(tmp_path, stages: str, output_tokens: int = 16):
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: s\n"
        "defaults:\n"
        f"  workload: {{prompt_tokens: 32, output_tokens: {output_tokens}}}\n"
        "  timeouts: {connect_s: 5, first_token_s: 10, total_s: 20}\n"
        "passes:\n"
        "  - name: p\n"
        "    stages:\n" + stages
    )
    return path


def test_a_step_down_stage_measures_only_its_own_users(start_sim, tmp_path):
    """8 users, then 3 with a longer workload: the departing users' requests of the second stage are left
    out, the window waits for in flight to fall to 3, and no request in it is from a departing user."""
    url = start_sim(ttft_s=0.01, itl_s=0.005)
    scenario = _scenario(tmp_path, "      - {users: 8, spawn_rate: 8, duration_s: 4}\n"
                                   "      - {users: 3, spawn_rate: 1, duration_s: 14, workload: {output_tokens: 64}}\n")
    run_dir = tmp_path / "run"
    proc = run_locust(url, None, scenario, run_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = load_run(run_dir)
    rule = WindowRule(settle_s=2.0)
    _, row = envelope_table(run, rule=rule)
    frame = run.frame
    second = frame[frame["stage_index"] == 1]
    stayed = set(frame.loc[frame["stage_index"] == 0, "user_id"]) & set(second["user_id"])
    assert len(set(second["user_id"])) > 3  # Locust's departing users did send with the new workload
    assert row.integrity.departing_user_requests > 0
    ws = run.info.started_unix_s + row.window.window_start_s  # the table's windows count from the run's start
    in_window = second[(second["wall_start_unix_s"] >= ws)]
    assert set(in_window["user_id"]) <= stayed and len(set(in_window["user_id"])) == 3
    assert row.window.mean_in_flight <= 3.0 + 1e-9
    assert row.trust.trustworthy, row.trust.untrustworthy_reasons
    assert row.window.window_start_s >= steady_window(run.stages[1], rule=rule)[0] - run.info.started_unix_s


# The window is the stage from 6 s on (1 s ramp + 5 s settle); about 11 requests a second go through it.
@pytest.mark.parametrize("stalls, duration_s, flagged", [
    # one stall at 10 s, inside a 14 s window: 150 requests or so, of which at most 2 may be stalled
    ({"STALL_TEST_FIRST_S": "10", "STALL_TEST_S": "0.3", "STALL_TEST_COUNT": "1"}, 20, False),
    # stalls from 2 s on, every 0.4 s, for the whole run: the share is the same in any window
    ({"STALL_TEST_FIRST_S": "2", "STALL_TEST_S": "0.15", "STALL_TEST_EVERY_S": "0.4", "STALL_TEST_COUNT": "100"},
     12, True),
])
def test_stalls_of_the_load_generator_are_counted_per_request(start_sim, tmp_path, monkeypatch, stalls, duration_s,
                                                             flagged):
    url = start_sim(ttft_s=0.01, itl_s=0.005)
    for k, v in stalls.items():
        monkeypatch.setenv(k, v)
    run_dir = tmp_path / "run"
    proc = run_locust(url, None, _scenario(tmp_path, f"      - {{users: 1, duration_s: {duration_s}}}\n"), run_dir,
                      "-f", f"{REPO / 'locustfiles' / 'llm.py'},{PLUGIN}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = load_run(run_dir)
    (row,) = envelope_table(run)
    stall = run.frame["client_stall_max_ms"].to_numpy(dtype=float)
    assert not np.isnan(stall).any()  # every record says
    assert row.integrity.stalled_requests >= 1 and row.integrity.stall_max_ms >= 100.0
    if flagged:
        assert row.integrity.stalled_share > 0.2, row.integrity.stalled_share
        assert not row.trust.trustworthy and "load generator stalled over 50 ms" in row.trust.untrustworthy_reasons
    else:
        assert row.counts.requests >= 100 and row.integrity.stalled_requests <= 2
        assert row.trust.trustworthy, row.trust.untrustworthy_reasons
