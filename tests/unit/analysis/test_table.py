import io
import csv
import math

import pytest

from analysis.load import load_run
from analysis.table import (
    WindowRule,
    envelope_table,
    evaluate_slos,
    few_sample_percentiles,
    steady_window,
    write_table_csv,
    write_table_markdown,
)
from analysis.rows import TableRow
from envelope.stages import StageKind, StageRecord


def test_steady_window_rule():
    stage = StageRecord(stage_index=0, stage_name="s", start_unix_s=100.0, end_unix_s=160.0, target_users=10,
                        spawn_rate=2.0, kind=StageKind.USERS)
    assert steady_window(stage, rule=WindowRule(settle_s=5)) == (110.0, 160.0, "")
    rate = stage.replace(kind=StageKind.RATE)
    assert steady_window(rate, rule=WindowRule(settle_s=5))[:2] == (105.0, 160.0)
    short = stage.replace(end_unix_s=112.0)  # ramp+settle leaves 2 s < 5 s: second half
    assert steady_window(short, rule=WindowRule(settle_s=5)) == (106.0, 112.0, "short stage: second half used")


def test_known_table(known_run):
    run = load_run(known_run)
    (row,) = envelope_table(run, rule=WindowRule(settle_s=8.0))  # window [1010, 1060]
    assert (row["window_start_s"], row["window_end_s"], row["window_s"]) == (10.0, 60.0, 50.0)
    # 4 successes started in the window + 1 failure; the early record is outside
    assert (row["requests"], row["ok_requests"], row["errors"]) == (5, 4, 1)
    assert row["error_rate"] == pytest.approx(0.2)
    assert row["errors_by_category"] == "http_500:1"
    # TTFT 100/200/300/400 ms, numpy linear interpolation
    assert row["ttft_p50_ms"] == pytest.approx(250.0)
    assert row["ttft_p90_ms"] == pytest.approx(370.0)
    assert row["ttft_p95_ms"] == pytest.approx(385.0)
    assert row["ttft_p99_ms"] == pytest.approx(397.0)
    # E2E = TTFT + 10 gaps of 50 ms; TPOT = 500 ms / 10; every ITL 50 ms
    assert row["e2e_p50_ms"] == pytest.approx(750.0)
    assert row["tpot_p95_ms"] == pytest.approx(50.0)
    assert row["itl_p99_ms"] == pytest.approx(50.0)
    assert row["itl_samples"] == 40
    # 44 tokens streamed inside a 50 s window; the early request streamed before it
    assert row["aggregate_output_tokens_per_s"] == pytest.approx(44 / 50)
    # in flight: 0.6 + 0.7 + 0.8 + 0.9 s (successes) + 0.2 s (failure to t_done) over 50 s
    assert row["mean_in_flight"] == pytest.approx(3.2 / 50)
    assert row["per_user_output_tokens_per_s"] == pytest.approx(44 / 3.2)
    assert row["ok_requests"] == 4 and row.counts.ok_requests == 4
    assert row["few_samples"] == "p90,p95,p99"
    assert row["stage_records"] == 6 and row["stage_output_tokens"] == 55
    assert row["prompt_tokens_p50"] == 300 and row["output_tokens_p50"] == 11
    # SLOs: TTFT p95 385 <= 2000 passes; error rate 0.2 > 0.01 fails
    res = {r.key: r for r in row.slo.slo_results}
    assert res["ttft_p95_ms"].passed is True and res["ttft_p95_ms"].measured == pytest.approx(385.0)
    assert res["error_rate_max"].passed is False
    assert row["slo_pass"] is False


def test_straddling_request_counts_only_tokens_inside_window(builders, tmp_path):
    make_stage, make_record, write_run = builders
    st = make_stage(0, 1, 1000.0, 1060.0, spawn_rate=1.0)
    # settle 9 s: window [1010, 1060]; chunks at 1009.5 + 0.1*i, i = 0..9: 5 before, 5 inside
    rec = make_record(st, 1009.0, 0.5, tokens=10, gap_s=0.1)
    run = load_run(write_run(tmp_path / "s", stages=[st], records=[rec]))
    (row,) = envelope_table(run, rule=WindowRule(settle_s=9.0))
    assert row["aggregate_output_tokens_per_s"] == pytest.approx(5 / 50)
    assert row["ok_requests"] == 0 and math.isnan(row["ttft_p50_ms"])
    assert row.slo.slo_results[0].passed is False  # no data is not a pass


def test_evaluate_slos():
    row = TableRow.from_cells(ttft_p95_ms=2100.0, e2e_p99_ms=900.0, error_rate=0.0,
                              aggregate_output_tokens_per_s=400.0, few_samples="p99", ok_requests=50)
    out = evaluate_slos(row, {"ttft_p95_ms": 2000, "e2e_p99_ms": 1000, "error_rate_max": 0.01,
                              "min_output_tokens_per_s": 500, "bogus": 1})
    got = {r.key: r.passed for r in out}
    assert got == {"ttft_p95_ms": False, "e2e_p99_ms": True, "error_rate_max": True,
                   "min_output_tokens_per_s": False, "bogus": None}
    assert next(r for r in out if r.key == "e2e_p99_ms").note == "p99 from 50 samples"


def test_few_sample_percentiles():
    assert few_sample_percentiles(1) == ["p50", "p90", "p95", "p99"]
    assert few_sample_percentiles(19) == ["p95", "p99"]
    assert few_sample_percentiles(20) == ["p99"]
    assert few_sample_percentiles(100) == []


def test_writers(known_run):
    rows = envelope_table(load_run(known_run), rule=WindowRule(settle_s=8.0))
    buf = io.StringIO()
    write_table_csv(rows, buf)
    (parsed,) = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert float(parsed["ttft_p50_ms"]) == 250.0
    assert parsed["slo_pass"] == "False"
    assert "error_rate_max<=0.01:FAIL(0.2)" in parsed["slo_results"]
    md = io.StringIO()
    write_table_markdown(rows, md)
    lines = md.getvalue().splitlines()
    assert len(lines) == 3 and "| FAIL |" in lines[2] and "20.00%" in lines[2]


def test_cancelled_requests_are_not_server_errors(tmp_path, builders):
    """Requests the load generator stopped itself are counted apart, not in the error rate."""
    make_stage, make_record, write_run = builders
    st = make_stage(0, 2, 1000.0, 1060.0, spawn_rate=1.0)
    recs = [make_record(st, 1010.0 + 10 * i, 0.1) for i in range(4)]
    recs.append(make_record(st, 1050.0, 0.0, error="cancelled"))
    recs.append(make_record(st, 1051.0, 0.0, error="http_500"))
    row = envelope_table(load_run(write_run(tmp_path / "c", stages=[st], records=recs)))[0]
    assert row["cancelled"] == 1
    assert row["requests"] == 5 and row["errors"] == 1  # 4 ok + 1 server error; the cancelled one apart
    assert row["error_rate"] == pytest.approx(1 / 5)
    assert row["errors_by_category"] == "http_500:1"


def test_attainment_and_goodput_count_errors_as_not_good_and_leave_cancellations_out(builders, tmp_path):
    """Window [1010, 1060): 6 successes (TTFT 100..600 ms), 1 error, 1 cancelled; threshold TTFT <= 350 ms."""
    make_stage, make_record, write_run = builders
    st = make_stage(0, 2, 1000.0, 1060.0, slos={"ttft_ms": 350, "attainment_min": 0.5})
    recs = [make_record(st, 1010.0 + 5 * i, 0.1 * (i + 1)) for i in range(6)]
    recs.append(make_record(st, 1045.0, 0.0, error="http_500"))
    recs.append(make_record(st, 1050.0, 0.0, error="cancelled"))
    run = load_run(write_run(tmp_path / "att", stages=[st], records=recs))
    (row,) = envelope_table(run, rule=WindowRule(settle_s=8.0))
    g = row.goodput
    assert (g.good_requests, row.counts.requests, row.counts.cancelled) == (3, 7, 1)
    assert g.attainment == pytest.approx(3 / 7)
    assert g.attainment_low < 3 / 7 < g.attainment_high
    assert g.goodput_requests_per_s == pytest.approx(3 / 50)
    assert g.goodput_output_tokens_per_s == pytest.approx(3 * 11 / 50)
    (result,) = [r for r in row.slo.slo_results if r.key == "attainment_min"]
    assert result.passed is False and result.op == ">=" and "95% CI" in result.note
    assert {r.key for r in row.slo.slo_results} == {"attainment_min"}  # ttft_ms is a threshold, not a check


def test_a_search_probe_counts_only_requests_that_ended_inside_it_from_its_own_settle_time(builders, tmp_path):
    """A probe [1000, 1020) with settle_s 4: requests from 1004 s count (not the 5 s ramp-and-settle rule),
    and one that started at 1019 s but ran into the next probe (a heavier level) does not."""
    from envelope.search_log import SearchEntry, write_search_log

    make_stage, make_record, write_run = builders
    st = make_stage(0, 1, 1000.0, 1020.0, pass_name="find", slos={"ttft_ms": 350})
    nxt = make_stage(1, 2, 1020.0, 1040.0, pass_name="find", slos={"ttft_ms": 350})
    recs = [make_record(st, 1004.5 + i, 0.1) for i in range(14)]  # 1004.5 .. 1017.5 s, each ends 0.6 s later
    recs.append(make_record(st, 1019.0, 0.1, tokens=40))  # ends at 1021 s, inside the next probe
    recs += [make_record(nxt, 1025.0 + i, 0.1) for i in range(10)]
    root = write_run(tmp_path / "probe", stages=[st, nxt], records=recs)
    write_search_log(root, [SearchEntry(pass_name="find", over="users", spec={"probe_s": 20, "settle_s": 4},
                                        target=0.95, thresholds={"ttft_ms": 350})])
    first, _ = envelope_table(load_run(root))
    assert first.window.window_start_s == pytest.approx(4.0)
    assert (first.counts.requests, first.goodput.good_requests) == (14, 14)
