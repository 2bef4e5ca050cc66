"""Clean windows (a step down in users) and per-request stall accounting, on records built by hand."""

from __future__ import annotations

import pytest

from analysis.envelope import envelope_sentence, find_envelope
from analysis.load import load_run
from analysis.table import WindowRule, envelope_table


def _step_down_run(builders, tmp_path, *, silent_departures: int = 0):
    """20 users for 60 s, then 6 users with a longer workload; the 14 departing users each send one more
    (long) request tagged with the new stage before Locust stops them, as Locust's users do."""
    make_stage, make_record, write_run = builders
    big = make_stage(0, 20, 1000.0, 1060.0, spawn_rate=20.0)
    small = make_stage(1, 6, 1060.0, 1120.0, spawn_rate=6.0)
    recs = []
    for u in range(20):
        t = 1000.0 + 0.05 * u
        while t < 1060.0:  # back to back, 1 s each (TTFT 0.5 s + 10 gaps of 50 ms)
            rec = make_record(big, t, 0.5)
            rec["user_id"] = f"h:1/{u}"
            recs.append(rec)
            t += 1.001
        if u >= 20 - silent_departures:  # stopped before it sent anything in the new stage
            continue
        if u >= 6:  # departing: one more request, already with the new stage's workload, then stopped
            rec = make_record(small, t, 4.0, tokens=21)
            rec["user_id"] = f"h:1/{u}"
            recs.append(rec)
            continue
        while t < 1120.0:
            rec = make_record(small, t, 0.2, tokens=21)
            rec["user_id"] = f"h:1/{u}"
            recs.append(rec)
            t += 1.201
    return load_run(write_run(tmp_path / "step", stages=[big, small], records=recs))


def test_a_step_down_window_holds_no_request_of_a_departing_user(builders, tmp_path):
    run = _step_down_run(builders, tmp_path)
    _, row = envelope_table(run, rule=WindowRule(settle_s=2.0))
    assert row.integrity.departing_user_requests == 14
    # the window opened when in flight fell to 6: after the departing users' last requests ended
    assert row.integrity.settled_at_s is not None and row.window.window_start_s >= row.integrity.settled_at_s
    assert row.window.window_start_s > 60.0 + 4.0  # their requests last ~5 s from the stage's start
    assert "opened when in flight fell to 6" in row.window.window_note
    assert row.window.mean_in_flight <= 6.0
    # so its latency is the six users' own: TTFT 200 ms, none of the departing users' 4 s
    assert row.latency.ttft_p99_ms == pytest.approx(200.0)
    assert row.trust.trustworthy, row.trust.untrustworthy_reasons


def test_departing_users_that_sent_nothing_new_do_not_make_staying_ones_departing(builders, tmp_path):
    """The last stage of a run: no later stage tells who stayed. Six of the 14 departing users were stopped
    before they sent in it, so only 8 requests are departing and the 6 staying users are measured."""
    run = _step_down_run(builders, tmp_path, silent_departures=6)
    _, row = envelope_table(run, rule=WindowRule(settle_s=2.0))
    assert row.integrity.departing_user_requests == 8
    assert row.counts.requests > 0 and row.latency.ttft_p99_ms == pytest.approx(200.0)


def test_without_user_ids_the_departing_requests_stay_and_the_window_says_so(builders, tmp_path):
    """Older records (no user_id): the departing requests cannot be told apart; in-flight settling still
    moves the window, and a window whose mean in flight exceeds its users is flagged."""
    make_stage, make_record, write_run = builders
    big = make_stage(0, 4, 1000.0, 1030.0, spawn_rate=4.0)
    small = make_stage(1, 1, 1030.0, 1040.0, spawn_rate=1.0)
    # three requests of the 4-user stage outlive their stage by 20 s (long requests), one user stays
    recs = [make_record(big, 1000.0 + i, 0.1, tokens=400, gap_s=0.1) for i in range(3)]
    recs += [make_record(small, 1030.0 + i, 0.1) for i in range(9)]
    run = load_run(write_run(tmp_path / "old", stages=[big, small], records=recs))
    _, row = envelope_table(run, rule=WindowRule(settle_s=1.0, min_window_s=1.0))
    assert row.integrity.departing_user_requests == 0
    assert row.integrity.settled_at_s is None  # in flight never fell to 1 inside the stage
    assert row.window.mean_in_flight > 1.5
    assert "mean in flight" in row.trust.untrustworthy_reasons and not row.trust.trustworthy


def _stall_run(builders, tmp_path, stalled: int):
    make_stage, make_record, write_run = builders
    st = make_stage(0, 4, 1000.0, 1210.0, spawn_rate=4.0)
    recs = []
    for i in range(200):
        rec = make_record(st, 1006.0 + i, 0.1)
        rec["client_stall_max_ms"] = 300.0 if i < stalled else 1.0
        if i < stalled:  # the stall delayed what the client saw
            rec["t_first_token_s"] += 0.3
            rec["chunk_offsets_s"] = [o + 0.3 for o in rec["chunk_offsets_s"]]
            rec["t_last_token_s"] += 0.3
        recs.append(rec)
    run = load_run(write_run(tmp_path / f"stall{stalled}", stages=[st], records=recs))
    (row,) = envelope_table(run, rule=WindowRule(settle_s=5.0))
    return row


def test_one_stalled_request_in_200_does_not_flag_the_stage(builders, tmp_path):
    row = _stall_run(builders, tmp_path, 1)
    assert (row.integrity.stalled_requests, row.integrity.stalled_share) == (1, 1 / 200)
    assert row.trust.trustworthy, row.trust.untrustworthy_reasons


def test_stalls_over_a_fifth_of_the_requests_flag_it_with_both_percentiles(builders, tmp_path):
    row = _stall_run(builders, tmp_path, 40)
    assert row.integrity.stalled_requests == 40 and row.integrity.stalled_share == pytest.approx(0.2)
    assert row.latency.ttft_p95_ms == pytest.approx(400.0) and row.integrity.ttft_p95_unstalled_ms == pytest.approx(100.0)
    assert not row.trust.trustworthy
    assert ("load generator stalled over 50 ms during 40 of 200 requests (20%, up to 300 ms): "
            "p95 TTFT 400 ms with them, 100 ms without") in row.trust.untrustworthy_reasons


def test_the_headline_says_when_it_rests_on_a_flagged_stage(builders, tmp_path):
    row = _stall_run(builders, tmp_path, 40)
    sentence = envelope_sentence(find_envelope([row]))
    assert "NOT TRUSTWORTHY" in sentence and "stalled" in sentence


def test_itl_from_chunks_read_together_is_marked(builders, tmp_path):
    """Half the chunk gaps are 0 (pairs of chunks in one read): the share is reported and ITL cells marked."""
    from analysis.table import row_cell

    make_stage, make_record, write_run = builders
    st = make_stage(0, 1, 1000.0, 1060.0)
    recs = []
    for i in range(20):
        rec = make_record(st, 1010.0 + 2 * i, 0.1, tokens=11)
        rec["chunk_offsets_s"] = [0.1 + 0.05 * (k // 2) for k in range(11)]  # 2 chunks per read
        rec["t_first_token_s"], rec["t_last_token_s"] = (rec["t_start_s"] + rec["chunk_offsets_s"][0],
                                                         rec["t_start_s"] + rec["chunk_offsets_s"][-1])
        recs.append(rec)
    (row,) = envelope_table(load_run(write_run(tmp_path / "reads", stages=[st], records=recs)))
    assert row.integrity.coalesced_chunk_share == pytest.approx(0.5)
    assert row_cell(row, "itl_p50_ms").endswith("(read-batched)") and row_cell(row, "ttft_p50_ms") == "100"
    assert any("chunk gaps were 0" in line for line in find_envelope([row]).limits)


def test_in_flight_that_falls_too_late_keeps_the_usual_window_and_flags_it(builders, tmp_path):
    make_stage, make_record, write_run = builders
    big = make_stage(0, 4, 1000.0, 1030.0, spawn_rate=4.0)
    small = make_stage(1, 1, 1030.0, 1050.0, spawn_rate=1.0)
    # three long requests of the 4-user stage end 2 s before the 1-user stage does
    recs = [make_record(big, 1029.0 + 0.1 * i, 0.1, tokens=190, gap_s=0.1) for i in range(3)]
    recs += [make_record(small, 1030.0 + i, 0.1) for i in range(19)]
    run = load_run(write_run(tmp_path / "late", stages=[big, small], records=recs))
    _, row = envelope_table(run, rule=WindowRule(settle_s=1.0, min_window_s=5.0))
    assert "before the end" in row.window.window_note and row.integrity.settled_at_s is None
    assert row.counts.ok_requests > 0  # still a window with requests in it ...
    assert not row.trust.trustworthy and "mean in flight" in row.trust.untrustworthy_reasons  # ... flagged
