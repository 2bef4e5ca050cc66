"""The LLM tab's live window (locustfiles.live): exact numbers from a table of request records."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from envelope import metrics
from envelope.records import RequestRecord
from locustfiles import live

T0 = 500.0  # perf_counter of the worker: unrelated to wall time


def record(wall: float, *, ttft_s: float | None = 0.1, e2e_s: float = 1.0, tokens: int = 50,
           error: str | None = None, chunks: int | None = None) -> dict:
    """One record as it is on disk: a RequestRecord, written as JSON and read back."""
    first = None if ttft_s is None else T0 + ttft_s
    end = None if ttft_s is None else T0 + e2e_s
    n = tokens if chunks is None else chunks
    offsets = () if ttft_s is None else tuple(ttft_s + (e2e_s - ttft_s) * i / max(n - 1, 1) for i in range(n))
    rec = RequestRecord(
        run_id="r", request_id=f"{wall}-{ttft_s}-{error}", worker_id="w:1", client="default", endpoint="chat",
        pass_name="p", stage_index=0, stage_name="s", wall_start_unix_s=wall, t_start_s=T0,
        t_first_token_s=first, t_last_token_s=end, t_done_s=T0 + e2e_s, chunk_offsets_s=offsets,
        chunk_tokens=None if chunks is None else tuple([tokens // chunks] * chunks),
        output_tokens=tokens, error_category=error,
    )
    return orjson.loads(rec.to_json_line())


# A table: (wall start, ttft s, e2e s, output tokens, error). The window below is (1010, 1020].
TABLE = [
    (1000.0, 0.10, 2.00, 40, None),  # ends 1002: before the window
    (1008.5, 0.12, 1.60, 60, None),  # ends 1010.1
    (1011.0, 0.30, 3.00, 90, None),  # ends 1014
    (1012.0, 0.05, 0.80, 16, None),  # ends 1012.8
    (1013.0, 0.20, 2.50, 70, None),  # ends 1015.5
    (1014.0, None, 0.40, 0, "http_503"),  # ends 1014.4, failed
    (1015.0, 0.25, 1.50, 1, None),  # ends 1016.5, a single token: no TPOT
    (1016.0, 0.40, 4.00, 12, "timeout_total"),  # ends 1020.0 (the edge is inside), failed mid-stream
    (1017.0, 0.10, 1.00, 7, "cancelled"),  # ends 1018, stopped by the load generator
    (1019.0, 0.15, 1.50, 30, None),  # ends 1020.5: after the window
]
END, WINDOW = 1020.0, 10.0


def table_records() -> list[dict]:
    return [record(w, ttft_s=t, e2e_s=e, tokens=n, error=err) for w, t, e, n, err in TABLE]


def test_window_matches_envelope_metrics_on_the_same_requests():
    recs = table_records()
    agg = live.LiveAggregator(window_s=WINDOW)
    assert agg.add(recs) == len(recs)
    win = agg.window(END)

    inside = [r for r in recs if END - WINDOW < live.completion_unix_s(r) <= END]
    assert [r["wall_start_unix_s"] for r in inside] == [1008.5, 1011.0, 1012.0, 1013.0, 1014.0, 1015.0, 1016.0,
                                                        1017.0]
    good = [r for r in inside if r["error_category"] is None]
    assert (win.requests, win.ok, win.errors, win.cancelled) == (8, 5, 2, 1)
    assert win.errors_by_category == {"http_503": 1, "timeout_total": 1}
    assert win.error_rate == pytest.approx(2 / 7)  # the cancelled one is not judged
    assert win.output_tokens == 60 + 90 + 16 + 70 + 1
    assert win.output_tokens_per_s == pytest.approx(237 / 10.0)
    for name, fn in (("ttft", metrics.ttft_s), ("tpot", metrics.tpot_s), ("e2e", metrics.e2e_s)):
        expected = metrics.percentiles([None if fn(r) is None else fn(r) * 1000.0 for r in good], qs=(50, 95))
        got = win.latency_ms[name]
        assert got["p50"] == pytest.approx(expected["p50"], rel=1e-12), name
        assert got["p95"] == pytest.approx(expected["p95"], rel=1e-12), name
    # by hand: TTFT of the five successes is 50, 120, 200, 250, 300 ms
    assert win.latency_ms["ttft"]["p50"] == pytest.approx(200.0)
    assert win.latency_ms["ttft"]["p95"] == pytest.approx(250.0 + 0.8 * 50.0)
    assert win.latency_ms["ttft"]["n"] == 5 and win.latency_ms["tpot"]["n"] == 4  # one request had one token
    rates = [metrics.request_output_tokens_per_s(r) for r in good]
    assert win.per_user_output_tokens_per_s == pytest.approx(float(np.median(rates)))


def test_an_empty_window_has_no_percentiles_and_zero_rate():
    agg = live.LiveAggregator(window_s=WINDOW)
    agg.add(table_records())
    win = agg.window(2000.0)
    assert (win.requests, win.output_tokens_per_s) == (0, 0.0)
    assert math.isnan(win.latency_ms["ttft"]["p95"]) and math.isnan(win.per_user_output_tokens_per_s)
    assert math.isnan(win.error_rate)
    assert agg.totals()["requests"] == len(TABLE)  # totals stay


def test_the_window_does_not_reach_back_before_the_first_request():
    agg = live.LiveAggregator(window_s=WINDOW)
    agg.add([record(1000.0, e2e_s=1.0, tokens=30), record(1001.0, e2e_s=1.0, tokens=30)])
    win = agg.window(1004.0)  # 4 s after the first request started: a 4 s window, not 10
    assert (win.start_unix_s, win.window_s, win.requests) == (1000.0, 4.0, 2)
    assert win.output_tokens_per_s == pytest.approx(60 / 4.0)
    assert math.isnan(agg.window(999.0).output_tokens_per_s)  # nothing had started yet
    assert live.LiveAggregator(window_s=WINDOW).window(5.0).requests == 0


def test_totals_and_latest_completion():
    agg = live.LiveAggregator(window_s=WINDOW)
    agg.add(table_records())
    totals = agg.totals()
    assert (totals["requests"], totals["ok"], totals["errors"], totals["cancelled"]) == (10, 7, 2, 1)
    assert totals["output_tokens"] == 40 + 60 + 90 + 16 + 70 + 1 + 30
    assert totals["errors_by_category"] == {"http_503": 1, "timeout_total": 1}
    assert agg.latest_end_unix_s == pytest.approx(1020.5)


def test_old_requests_leave_the_window_but_not_the_totals():
    agg = live.LiveAggregator(window_s=1.0, horizon_windows=3)
    agg.add([record(1000.0 + i, e2e_s=0.5) for i in range(50)])
    agg.add([record(2000.0, e2e_s=0.5)])
    assert agg.requests == 51 and len(agg._recent) == 1
    assert agg.window(2000.5).requests == 1


def test_records_arriving_out_of_order_still_count():
    agg = live.LiveAggregator(window_s=WINDOW)
    recs = table_records()
    agg.add(recs[5:])
    agg.add(recs[:5])  # another worker's file read later
    assert agg.window(END).requests == 8


def test_a_record_without_timestamps_is_counted_but_not_placed():
    agg = live.LiveAggregator(window_s=WINDOW)
    agg.add([{"error_category": "client_error", "output_tokens": None}])
    assert (agg.requests, agg.errors, agg.unplaced) == (1, 1, 1)
    assert live.summarize({"error_category": None}) is None


def test_itl_values_are_kept_only_when_asked():
    rec = record(1000.0, ttft_s=0.1, e2e_s=1.0, tokens=10)
    assert live.summarize(rec).itl_ms == ()
    kept = live.summarize(rec, keep_itl=True).itl_ms
    assert kept == pytest.approx([v * 1000.0 for v in metrics.itl_s(rec)])
    assert len(kept) == 9 and kept[0] == pytest.approx(100.0)


def test_slos_against_the_window():
    agg = live.LiveAggregator(window_s=WINDOW, keep_itl=True)
    agg.add(table_records())
    win = agg.window(END)
    results = {r["key"]: r for r in live.check_slos(win, {
        "ttft_p95_ms": 300.0, "ttft_p50_ms": 150.0, "error_rate_max": 0.5, "min_output_tokens_per_s": 30.0,
        "itl_p99_ms": 1000.0, "bogus_p50_ms": 1.0})}
    assert results["ttft_p95_ms"]["passed"] is True and results["ttft_p95_ms"]["measured"] == pytest.approx(290.0)
    assert results["ttft_p50_ms"]["passed"] is False
    assert results["error_rate_max"]["passed"] is True
    assert results["min_output_tokens_per_s"]["passed"] is False and results["min_output_tokens_per_s"]["op"] == ">="
    assert results["itl_p99_ms"]["measured"] == pytest.approx(win.percentile_ms("itl", 99))
    assert results["itl_p99_ms"]["measured"] > 0
    assert results["bogus_p50_ms"]["passed"] is None
    assert live.overall_slo(list(results.values())) is False
    # the percentile passes, but each request is judged too: 2 errors and one TTFT over 300 ms leave 4 good
    # of the 7 judged (the cancelled one is not), under the 95% attainment target
    p95, attained = live.check_slos(win, {"ttft_p95_ms": 300.0})
    assert p95["passed"] is True
    assert attained["key"] == "attainment_min" and attained["measured"] == pytest.approx(4 / 7)
    assert attained["passed"] is False and attained["note"].startswith("4 of 7 good (TTFT <= 300 ms)")
    assert live.overall_slo([p95, attained]) is False
    lenient = live.check_slos(win, {"ttft_p95_ms": 300.0, "attainment_min": 0.5})
    assert live.overall_slo(lenient) is True and lenient[-1]["threshold"] == 0.5
    assert live.overall_slo([]) is None


def test_slos_with_nothing_to_judge():
    agg = live.LiveAggregator(window_s=WINDOW)
    agg.add([record(1000.0, ttft_s=None, e2e_s=0.1, tokens=0, error="http_500")])
    failed, none_good = live.check_slos(agg.window(1001.0), {"ttft_p95_ms": 100.0})
    assert failed["passed"] is False  # requests completed, none succeeded
    assert none_good["measured"] == 0.0 and none_good["passed"] is False
    empty, unjudged = live.check_slos(agg.window(5000.0), {"ttft_p95_ms": 100.0})
    assert empty["passed"] is None and unjudged["passed"] is None


@pytest.mark.parametrize(
    ("samples", "start", "end", "expected"),
    [
        ([(0.0, 5.0), (2.0, 7.0), (4.0, 10.0)], 1.0, 4.0, 5.0),  # from 5 (at 0, before the start) to 10
        ([(0.0, 5.0), (2.0, 7.0), (4.0, 10.0)], 2.0, 3.0, 0.0),  # nothing new after the sample at 2
        ([(0.0, 5.0), (2.0, 1.0), (4.0, 3.0)], 0.0, 4.0, 3.0),  # restarted: 1 counts from zero, then +2
        ([(0.0, 5.0)], 0.0, 4.0, None),
        ([(3.0, 1.0), (4.0, 4.0)], 0.0, 4.0, 3.0),  # no sample before the start: from the first
    ],
)
def test_counter_increase(samples, start, end, expected):
    assert live.counter_increase(samples, start, end) == expected


def test_history_returns_points_after_a_number():
    h = live.History(max_points=3)
    points = [live.HistoryPoint(t_unix_s=float(i), users=i, in_flight=0, output_tokens_per_s=0.0,
                                ttft_p95_ms=math.nan, kv_cache_usage_ratio=None, requests_waiting=None,
                                slo_pass=None, stage_index=0, stage_name="s") for i in range(5)]
    for p in points:
        h.append(p)
    assert h.seq == 5 and len(h) == 3
    assert [p.users for p in h.since(0)] == [2, 3, 4]
    assert [p.users for p in h.since(3)] == [3, 4]  # points are numbered from 1
    assert [p.users for p in h.since(99)] == [2, 3, 4]  # a client numbering from before a restart


def test_json_safe_drops_nan_and_numpy_types():
    out = live.json_safe({"a": math.nan, "b": [np.float64(1.5), np.int64(2), math.inf], "c": np.bool_(True)})
    assert out == {"a": None, "b": [1.5, 2, None], "c": True}
    assert type(out["b"][1]) is int


def test_tab_rows_carry_units():
    agg = live.LiveAggregator(window_s=WINDOW)
    agg.add(table_records())
    snap = live.json_safe({"users": 3, "in_flight": 2, "window": agg.window(END).to_dict(), "totals": agg.totals(),
                           "server": {"ok": True, "requests_waiting": 4.0, "kv_cache_usage_ratio": 0.25,
                                      "preemptions_total": 0.0}})
    rows = {r["metric"]: r["value"] for r in live.tab_rows(snap)}
    assert rows["Output tokens/s, all users (last 10 s)"] == "23.7 tokens/s"
    assert rows["TTFT p50 / p95 (last 10 s)"] == "200 ms / 290 ms"
    assert rows["Server: KV-cache usage"] == "25.0 %"
    assert rows["Errors (last 10 s)"] == "http_503: 1, timeout_total: 1"
    short = live.tab_rows({"window": {"window_s": 7.24096}})
    assert short[2]["metric"] == "Output tokens/s, all users (last 7.2 s)"
    down = {r["metric"]: r["value"] for r in live.tab_rows({"server": {"ok": False, "error": "HTTP 404"}})}
    assert down["Server gauges (/metrics)"] == "HTTP 404"


@pytest.mark.parametrize(("value", "text"), [(1234.4, "1,234 tokens/s"), (12.34, "12.3 tokens/s"),
                                             (math.nan, "-"), (None, "-")])
def test_format_rate(value, text):
    assert live.format_rate(value) == text


@pytest.mark.parametrize(("value", "text"), [(1234.4, "1,234 ms"), (56.78, "56.8 ms"), (0.842, "0.84 ms")])
def test_format_ms(value, text):
    assert live.format_ms(value) == text
