"""Server-side latency decomposition: histogram deltas over a window, worked out by hand."""

from __future__ import annotations

import math

import pytest

from analysis.load import load_run
from analysis.rows import ServerLatency
from analysis.server_latency import bucket_width_s, histogram_mean_s, server_latency, window_deltas
from analysis.table import WindowRule, envelope_table


def hist(total_s: float, count: float, cumulative: list[float], les=(0.1, 0.2, 0.5)) -> dict:
    return {"sum": total_s, "count": count, "buckets": [[le, c] for le, c in zip(les, cumulative)]}


# Before: 2 requests of 0.05 s. After: 10 more, 4 at <= 0.1 s, 4 in (0.1, 0.2], 2 in (0.2, 0.5], summing 1.5 s.
BEFORE = hist(0.1, 2, [2, 2, 2])
AFTER = hist(1.6, 12, [6, 10, 12])


def sample(ttft: dict | None, **others: dict | None) -> dict:
    return {"ttft_s": ttft, **others}


def test_mean_and_prometheus_percentiles_of_the_delta():
    deltas = window_deltas([100.0, 130.0], [sample(BEFORE), sample(AFTER)], 100.0, 130.0)
    assert deltas["ttft_s"] == {"sum": pytest.approx(1.5), "count": 10, "buckets": [[0.1, 4], [0.2, 8], [0.5, 10]]}
    cells = server_latency(deltas, client_ttft_mean_ms=180.0)
    assert cells.server_ttft_mean_ms == pytest.approx(150.0)  # 1.5 s / 10
    # p50: rank 5 lies in (0.1, 0.2], which holds ranks 5..8: 0.1 + 0.1 * (5 - 4) / 4
    assert cells.server_ttft_p50_ms == pytest.approx(125.0)
    # p95: rank 9.5 lies in (0.2, 0.5], which holds ranks 9..10: 0.2 + 0.3 * (9.5 - 8) / 2
    assert cells.server_ttft_p95_ms == pytest.approx(425.0)
    assert cells.server_ttft_mean_bucket_ms == pytest.approx(100.0)  # 0.15 s lies in (0.1, 0.2]
    assert cells.outside_engine_ttft_mean_ms == pytest.approx(30.0)  # 180 - 150
    # histograms the server did not expose stay None; no E2E histogram: no finished count
    assert cells.server_queue_mean_ms is None and cells.server_decode_p95_ms is None
    assert cells.server_requests_finished is None


def test_the_samples_at_or_before_each_edge_are_used():
    times = [90.0, 100.0, 110.0, 130.0, 140.0]
    later = hist(2.6, 14, [6, 12, 14])
    hists = [sample(hist(0, 0, [0, 0, 0])), sample(BEFORE), sample(hist(0.5, 5, [5, 5, 5])), sample(AFTER),
             sample(later)]
    # start 100 exactly: the 100 s sample; end 135: the 130 s one (not the first after it)
    assert window_deltas(times, hists, 100.0, 135.0)["ttft_s"]["count"] == 10
    assert window_deltas(times, hists, 105.0, 145.0)["ttft_s"]["count"] == 12
    assert window_deltas(times, hists, 80.0, 145.0) is None  # no sample at or before the start


def test_no_finished_request_gives_none():
    e2e = hist(0.4, 2, [0, 2, 2])
    deltas = window_deltas([100.0, 130.0], [sample(BEFORE, e2e_s=e2e), sample(BEFORE, e2e_s=e2e)], 100.0, 130.0)
    cells = server_latency(deltas, client_ttft_mean_ms=100.0)
    assert cells.server_ttft_mean_ms is None and cells.server_ttft_p50_ms is None
    assert cells.outside_engine_ttft_mean_ms is None
    assert cells.server_requests_finished == 0
    assert server_latency(None, client_ttft_mean_ms=100.0) == ServerLatency()


def test_counter_reset_gives_none_without_crashing():
    restarted = hist(0.05, 1, [1, 1, 1])  # the server restarted between the samples
    deltas = window_deltas([100.0, 130.0], [sample(AFTER, e2e_s=AFTER), sample(restarted, e2e_s=AFTER)],
                           100.0, 130.0)
    assert deltas["ttft_s"] is None
    cells = server_latency(deltas, client_ttft_mean_ms=100.0)
    assert cells.server_ttft_mean_ms is None and cells.outside_engine_ttft_mean_ms is None
    assert cells.server_requests_finished == 0  # the E2E histogram itself did not move
    # other bucket bounds (another server) and a malformed sample: None too
    other = hist(3.0, 20, [20, 20, 20], les=(1.0, 2.0, 5.0))
    assert window_deltas([1.0, 2.0], [sample(BEFORE), sample(other)], 1.0, 2.0)["ttft_s"] is None
    assert window_deltas([1.0, 2.0], [float("nan"), sample(AFTER)], 1.0, 2.0)["ttft_s"] is None


def test_mean_and_bucket_width_helpers():
    assert histogram_mean_s(hist(0, 0, [0, 0, 0])) is None
    assert histogram_mean_s(None) is None
    assert histogram_mean_s(hist(3.0, 4, [1, 2, 4])) == 0.75
    h = hist(0, 0, [0, 0, 0])
    assert bucket_width_s(h, 0.05) == pytest.approx(0.1)  # the first bucket starts at 0
    assert bucket_width_s(h, 0.1) == pytest.approx(0.1)  # le is inclusive
    assert bucket_width_s(h, 0.3) == pytest.approx(0.3)
    assert bucket_width_s(h, 0.7) == math.inf
    assert bucket_width_s(None, 0.1) is None


def _metrics_sample(t: float, ttft: dict, queue: dict, prefill: dict, decode: dict, e2e: dict) -> dict:
    return {"t_unix_s": t, "ok": True, "requests_running": 1.0, "requests_waiting": 0.0,
            "histograms": {"ttft_s": ttft, "itl_s": hist(0.1, 1, [1, 1, 1]), "queue_s": queue,
                           "prefill_s": prefill, "decode_s": decode, "e2e_s": e2e}}


def test_table_row_from_a_run_directory(tmp_path, builders):
    make_stage, make_record, write_run = builders
    st = make_stage(0, 2, 1000.0, 1060.0, spawn_rate=1.0)  # window [1010, 1060] with settle 8 s
    recs = [make_record(st, 1010.0 + 10 * i, ttft) for i, ttft in enumerate((0.1, 0.2, 0.3, 0.4))]
    zero = hist(0, 0, [0, 0, 0])
    q_after = hist(0.2, 10, [10, 10, 10])  # 20 ms queue on average
    pre_after = hist(1.0, 10, [2, 10, 10])
    dec_after = hist(3.0, 10, [0, 0, 10])
    e2e_after = hist(5.0, 10, [0, 0, 10])
    metrics = [
        _metrics_sample(1005.0, zero, zero, zero, zero, zero),
        _metrics_sample(1009.5, BEFORE, zero, zero, zero, BEFORE),  # the last at or before the start
        _metrics_sample(1030.0, BEFORE, zero, zero, zero, BEFORE),
        _metrics_sample(1059.9, AFTER, q_after, pre_after, dec_after, hist(5.1, 12, [2, 2, 12])),
        _metrics_sample(1070.0, hist(9.9, 99, [99, 99, 99]), zero, zero, zero, zero),  # after the end
    ]
    run = load_run(write_run(tmp_path / "run", stages=[st], records=recs, metrics=metrics))
    # only the histograms the decomposition reads are kept
    assert set(run.telemetry["metrics"]["histograms"].iloc[0]) == {"ttft_s", "queue_s", "prefill_s", "decode_s",
                                                                   "e2e_s"}
    (row,) = envelope_table(run, rule=WindowRule(settle_s=8.0))
    assert row["ttft_mean_ms"] == pytest.approx(250.0)  # client: 100, 200, 300, 400 ms
    assert row["e2e_mean_ms"] == pytest.approx(750.0)  # TTFT + 10 gaps of 50 ms
    assert row["server_ttft_mean_ms"] == pytest.approx(150.0)
    assert row["server_ttft_p50_ms"] == pytest.approx(125.0)
    assert row["server_queue_mean_ms"] == pytest.approx(20.0)
    assert row["server_prefill_mean_ms"] == pytest.approx(100.0)
    assert row["server_decode_mean_ms"] == pytest.approx(300.0)
    assert row["server_e2e_mean_ms"] == pytest.approx(500.0)
    assert row["server_requests_finished"] == 10
    assert row["outside_engine_ttft_mean_ms"] == pytest.approx(100.0)  # 250 - 150


def test_a_run_without_histograms_has_empty_cells(known_run):
    (row,) = envelope_table(load_run(known_run), rule=WindowRule(settle_s=8.0))
    assert row.server_latency == ServerLatency()
    assert row["ttft_mean_ms"] == pytest.approx(250.0)


def _report(run_dir, tmp_path) -> str:
    from analysis.report import write_report

    run = load_run(run_dir)
    write_report(run, tmp_path / "report", rows=envelope_table(run, rule=WindowRule(settle_s=8.0)))
    return (tmp_path / "report" / "envelope.md").read_text(encoding="utf-8")


def _hand_run(tmp_path, builders, server_ttft_after: dict, server_ttft_before: dict = BEFORE):
    make_stage, make_record, write_run = builders
    st = make_stage(0, 2, 1000.0, 1060.0, spawn_rate=1.0)
    recs = [make_record(st, 1010.0 + 10 * i, ttft) for i, ttft in enumerate((0.1, 0.2, 0.3, 0.4))]
    zero = hist(0, 0, [0, 0, 0])
    metrics = [_metrics_sample(1009.5, server_ttft_before, zero, zero, zero, BEFORE),
               _metrics_sample(1059.9, server_ttft_after, zero, zero, zero, hist(5.1, 12, [2, 2, 12]))]
    return write_run(tmp_path / "run", stages=[st], records=recs, metrics=metrics)


def test_report_section_per_stage(tmp_path, builders):
    text = _report(_hand_run(tmp_path, builders, AFTER), tmp_path)
    section = text.split("## Where the time goes (server-side, per stage)\n", 1)[1].split("\n## ", 1)[0]
    assert "interpolated within the histogram's buckets" in section
    assert "### sweep / sweep-2 (2 users)" in section
    assert "| TTFT mean | 250.0 | 150.0 | 100.0 |" in section
    assert "| TTFT p50 | 250.0 | 125.0 | - |" in section
    assert "| E2E mean | 750.0 | 500.0 | 250.0 |" in section
    assert "| queue mean | - | - | - |" in section  # no request in the queue histogram's delta
    assert "The server finished 10 request(s) in the window, the client counted 4 successful ones." in section
    assert "Outside the engine: 100.0 ms of mean TTFT (40% of the client's mean TTFT)." in section
    assert "misaligned: " not in section and "the two are misaligned." not in section


def test_report_flags_a_client_mean_below_the_server_mean(tmp_path, builders):
    les = (0.1, 0.2, 0.5, 0.6)
    before = hist(0.1, 2, [2, 2, 2, 2], les=les)
    # within the bucket: 10 requests of 0.45 s (mean 450 ms in (0.2, 0.5], 300 ms wide) vs the client's 250 ms
    text = _report(_hand_run(tmp_path / "a", builders, hist(4.6, 12, [2, 2, 12, 12], les=les), before), tmp_path / "a")
    assert "Outside the engine: -200.0 ms of mean TTFT (-80% of the client's mean TTFT)." in text
    # beyond it: 10 requests of 0.55 s (mean 550 ms in (0.5, 0.6], 100 ms wide): 300 ms below says misaligned
    text = _report(_hand_run(tmp_path / "b", builders, hist(5.6, 12, [2, 2, 2, 12], les=les), before), tmp_path / "b")
    assert ("Outside the engine: -300.0 ms of mean TTFT (-120% of the client's mean TTFT); the client's mean is "
            "below the server's by more than the 100 ms bucket holding the server's mean: the two are "
            "misaligned.") in text


def test_no_section_without_histograms(known_run, tmp_path):
    assert "Where the time goes" not in _report(known_run, tmp_path)
