"""What broke first, on hand-made telemetry frames and table rows."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest

from analysis.broke import (
    BrokeFirst,
    break_events,
    broke_sentence,
    counter_increase,
    cross_check_text,
    saturated_stage_indices,
    token_cross_check,
    what_broke_first,
)
from analysis.rows import SloResult, TableRow
from envelope.stages import StageRecord

T0 = 1000.0
# three 60 s stages: 1 user [1000, 1060), 5 users [1060, 1120), 20 users [1120, 1180)
STAGES = [
    StageRecord(stage_index=i, stage_name=name, pass_name=name.split("-")[0], start_unix_s=T0 + 60 * i,
                end_unix_s=T0 + 60 * (i + 1), target_users=users)
    for i, (name, users) in enumerate((("alive-1u", 1), ("batching-5u", 5), ("queueing-20u", 20)))
]


def row(i: int, *, slo_pass: bool | None = True, slo_results: list | None = None) -> TableRow:
    """A table row whose steady-state window is [start + 10, end) of stage i, relative to T0."""
    return TableRow.from_cells(stage_index=i, stage_name=STAGES[i].stage_name, pass_name=STAGES[i].pass_name,
                               window_start_s=60.0 * i + 10.0, window_end_s=60.0 * (i + 1),
                               slo_pass=slo_pass, slo_results=tuple(slo_results or ()))


TTFT_FAIL = SloResult(key="ttft_p95_ms", threshold=1000.0, measured=1412.0, passed=False, op="<=")
E2E_FAIL = SloResult(key="e2e_p95_ms", threshold=15000.0, measured=16000.0, passed=False, op="<=")
ROWS_TTFT_FAILS_AT_20 = [row(0), row(1), row(2, slo_pass=False, slo_results=[E2E_FAIL, TTFT_FAIL])]


def metrics(n: int = 180, **overrides) -> pd.DataFrame:
    """One ok sample per second from T0; ``overrides`` maps column -> {second: value} (else quiet defaults)."""
    base = {"requests_waiting": 0.0, "requests_running": 1.0, "kv_cache_usage_ratio": 0.1,
            "preemptions_total": 3.0, "generation_tokens_total": 0.0}
    rows = []
    for s in range(n):
        r = {"t_unix_s": T0 + s, "ok": True, **base}
        for col, at in overrides.items():
            for when, v in at.items():
                if s >= when:
                    r[col] = v
        rows.append(r)
    return pd.DataFrame(rows)


def events(rows=ROWS_TTFT_FAILS_AT_20, m=None, frame=None, host=None):
    return break_events(stages=STAGES, rows=rows, frame=frame, metrics=m, host=host, run_start_unix_s=T0)


def result(evts, server=True) -> BrokeFirst:
    res = BrokeFirst(events=tuple(evts), first=evts[0] if evts else None, server_metrics=server,
                     saturated_stages=(), sentence="")
    return res


def test_queueing_before_slo_failure_in_the_same_stage():
    evts = events(m=metrics(requests_waiting={131: 2.0}))
    assert [e.kind for e in evts] == ["queueing", "slo"]
    q, slo = evts
    assert (q.t_s, q.stage_name, q.value) == (131.0, "queueing-20u", 2.0)
    # the SLO event sits at its stage's start (120 s) but sorts after the queue that formed in the stage
    assert (slo.t_s, slo.stage_name, slo.key, slo.value, slo.limit) == (120.0, "queueing-20u", "ttft_p95_ms", 1412.0, 1000.0)
    assert broke_sentence(result(evts)) == (
        "Requests began waiting in the server queue at 131 s (queueing-20u), then p95 TTFT exceeded its "
        "1,000 ms SLO (1,412 ms) in the same stage: queueing broke first."
    )


def test_kv_pressure_first_then_queueing_then_preemption():
    m = metrics(kv_cache_usage_ratio={70: 0.95}, requests_waiting={75: 1.0}, preemptions_total={80: 5.0})
    evts = events(m=m)
    assert [(e.kind, e.t_s) for e in evts] == [
        ("kv_cache", 70.0), ("queueing", 75.0), ("preemption", 80.0), ("slo", 120.0)]
    assert evts[0].stage_name == "batching-5u" and evts[0].value == 0.95
    assert evts[2].value == 2.0  # 3 -> 5 preemptions
    text = broke_sentence(result(evts))
    assert text.startswith("The KV cache reached 95% use at 70 s (batching-5u), then p95 TTFT exceeded")
    assert "in queueing-20u (from 120 s): the KV cache broke first." in text


def test_preemptions_already_counted_before_the_run_are_not_an_event():
    assert events(rows=[row(0)], m=metrics()) == []  # preemptions_total is 3 throughout


def test_errors_first_with_category_and_failure_time():
    frame = pd.DataFrame({
        "ok": [True, False, False, False],
        "error_category": [None, "http_500", "timeout_total", "cancelled"],
        "wall_start_unix_s": [T0 + 1, T0 + 65, T0 + 62, T0 + 10],
        "in_flight_end_unix_s": [T0 + 2, T0 + 66, T0 + 100, T0 + 11],
    })
    evts = events(frame=frame, m=metrics(requests_waiting={131: 1.0}))
    assert [e.kind for e in evts] == ["errors", "queueing", "slo"]
    err = evts[0]
    # the first failure to *happen*, not the first to start; "cancelled" is the load generator's own doing
    assert (err.t_s, err.stage_name, err.key) == (66.0, "batching-5u", "http_500")
    assert broke_sentence(result(evts)).startswith("Requests began failing (http_500) at 66 s (batching-5u)")
    assert broke_sentence(result(evts)).endswith(": errors broke first.")


def test_slo_first_when_nothing_else_happened_and_the_worst_slo_is_named():
    evts = events(m=metrics())
    assert [e.kind for e in evts] == ["slo"]
    # TTFT is 41% over its limit, E2E 7%: TTFT is named
    assert evts[0].key == "ttft_p95_ms"
    assert broke_sentence(result(evts)) == (
        "P95 TTFT exceeded its 1,000 ms SLO (1,412 ms) in queueing-20u (from 120 s), before any server "
        "pressure or error was seen: TTFT broke first."
    )


def test_absent_telemetry_orders_only_client_side():
    evts = events(m=None)
    assert [e.kind for e in evts] == ["slo"]
    text = broke_sentence(result(evts, server=False))
    assert "no server metrics were recorded, so only client-side SLOs can be ordered" in text
    assert broke_sentence(result([], server=False)) == (
        "Nothing broke on the client side (no SLO failed, no request failed); no server metrics were "
        "recorded, so only client-side SLOs can be ordered."
    )
    # failed samples only count as absent telemetry too
    failed = pd.DataFrame([{"t_unix_s": T0 + s, "ok": False, "error": "x"} for s in range(5)])
    assert events(rows=[row(0)], m=failed) == []


def test_nothing_broke_with_server_metrics():
    assert broke_sentence(result(events(rows=[row(0), row(1)], m=metrics()))).startswith("Nothing broke: no SLO failed")


def test_client_saturation_flags_only_samples_inside_the_window():
    host = pd.DataFrame([
        {"t_unix_s": T0 + 61, "cpu_core_ratio": 0.97, "processes": [{"pid": 1, "cpu_core_ratio": 0.97}]},  # ramp
        {"t_unix_s": T0 + 75, "cpu_core_ratio": 0.5, "processes": [{"pid": 1, "cpu_core_ratio": 0.5}]},
        # two processes at 0.5 each sum to 1.0 but neither is saturated
        {"t_unix_s": T0 + 100, "cpu_core_ratio": 1.0,
         "processes": [{"pid": 1, "cpu_core_ratio": 0.5}, {"pid": 2, "cpu_core_ratio": 0.5}]},
        {"t_unix_s": T0 + 140, "cpu_core_ratio": 0.95, "processes": [{"pid": 1, "cpu_core_ratio": 0.95}]},
    ])
    sat = saturated_stage_indices(ROWS_TTFT_FAILS_AT_20, host, run_start_unix_s=T0)
    assert sat == {2: (T0 + 140, 0.95)}
    evts = events(host=host)
    assert [(e.kind, e.t_s) for e in evts] == [("client_saturated", 140.0), ("slo", 120.0)]
    assert broke_sentence(result(evts)).endswith("the load generator broke first.")


def test_counter_increase_with_a_reset():
    assert counter_increase([100.0, 150.0, 150.0, 400.0]) == (300.0, 0)
    # 100 -> 250 (+150), restart, 0 -> 40 counts 40, 40 -> 90 (+50)
    assert counter_increase([100.0, 250.0, 40.0, float("nan"), 90.0]) == (240.0, 1)
    assert counter_increase([]) == (0.0, 0)


def test_token_cross_check_arithmetic():
    frame = pd.DataFrame({"output_tokens": [128, 128, 40, None]})  # a failed request that streamed 40 tokens counts
    m = pd.DataFrame([
        {"t_unix_s": T0 - 1, "ok": False},
        {"t_unix_s": T0, "ok": True, "generation_tokens_total": 1000.0},
        {"t_unix_s": T0 + 1, "ok": True, "generation_tokens_total": 1200.0},
        {"t_unix_s": T0 + 2, "ok": True, "generation_tokens_total": 98.0},  # restart: 98 more
        {"t_unix_s": T0 + 3, "ok": False},
    ])
    check = token_cross_check(frame, m)
    assert check.client_output_tokens == 296
    assert check.server_generation_tokens == 298.0
    assert check.difference_tokens == -2.0
    assert check.difference_ratio == pytest.approx(2 / 298)
    assert check.counter_resets == 1 and check.samples == 3
    text = cross_check_text(check)
    assert "296 output tokens" in text and "rose by 298" in text and "-2 tokens (0.67%)" in text
    none = token_cross_check(frame, None)
    assert none.server_generation_tokens is None and none.difference_ratio is None
    assert "no server counter" in cross_check_text(none)


def test_what_broke_first_on_a_loaded_run(builders, tmp_path):
    from analysis.load import load_run
    from analysis.table import WindowRule, envelope_table

    make_stage, make_record, write_run = builders
    st = [make_stage(0, 1, 1000.0, 1030.0, slos={"ttft_p95_ms": 500}),
          make_stage(1, 2, 1030.0, 1060.0, slos={"ttft_p95_ms": 500})]
    recs = [make_record(st[0], 1010.0 + i, 0.1) for i in range(10)]
    recs += [make_record(st[1], 1040.0 + i, 0.9) for i in range(10)]
    m = [{"t_unix_s": 1000.0 + s, "ok": True, "requests_waiting": 1.0 if s >= 35 else 0.0,
          "generation_tokens_total": 5.0 + (11 * 20 if s >= 59 else 0)} for s in range(60)]
    run = load_run(write_run(tmp_path / "r", stages=st, records=recs, metrics=m))
    rows = envelope_table(run, rule=WindowRule(settle_s=2.0))
    res = what_broke_first(run, rows)
    assert [(e.kind, e.t_s, e.stage_name) for e in res.events] == [
        ("queueing", 35.0, "sweep-2"), ("slo", 30.0, "sweep-2")]
    assert res.first.kind == "queueing" and res.server_metrics
    assert res.sentence.endswith("in the same stage: queueing broke first.")
    check = token_cross_check(run.frame, run.telemetry["metrics"])
    assert (check.client_output_tokens, check.server_generation_tokens, check.difference_ratio) == (220, 220.0, 0.0)
    assert not math.isnan(check.difference_ratio)


def test_report_has_the_sections_and_flags_a_saturated_stage(builders, tmp_path):
    import orjson

    from analysis.load import load_run
    from analysis.report import write_report
    from analysis.table import WindowRule, envelope_table, steady_window

    make_stage, make_record, write_run = builders
    st = [make_stage(0, 1, 1000.0, 1030.0), make_stage(1, 2, 1030.0, 1060.0)]
    recs = [make_record(st[0], 1010.0 + i, 0.1) for i in range(10)]
    recs += [make_record(st[1], 1040.0 + i, 0.1) for i in range(10)]
    m = [{"t_unix_s": 1000.0 + s, "ok": True, "requests_waiting": 0.0, "generation_tokens_total": 220.0 * (s >= 59)}
         for s in range(60)]
    root = write_run(tmp_path / "r", stages=st, records=recs, metrics=m)
    host = [{"t_unix_s": 1000.0 + s, "cpu_core_ratio": 0.97 if s == 50 else 0.3,
             "processes": [{"pid": 7, "cpu_core_ratio": 0.97 if s == 50 else 0.3}]} for s in range(60)]
    (root / "telemetry" / "host.jsonl").write_bytes(b"".join(orjson.dumps(h) + b"\n" for h in host))
    # the run started 40 s before the load (a server launch): event times, table windows and graphs all
    # count from the run's start, the one zero the report states
    (root / "run.json").write_bytes(orjson.dumps({"run_id": "r", "status": "complete", "started_unix_s": 960.0}))
    run = load_run(root)
    rows = envelope_table(run, rule=WindowRule(settle_s=2.0))
    assert [r["client_saturated"] for r in rows] == [False, True]
    res = what_broke_first(run, rows)
    assert [(e.kind, e.t_s) for e in res.events] == [("client_saturated", 90.0)]
    # the table's windows count from the same zero
    assert rows[1].window.window_start_s == steady_window(run.stages[1], rule=WindowRule(settle_s=2.0))[0] - 960.0
    assert res.saturated_stages == (1,)
    write_report(run, root / "report", rule=WindowRule(settle_s=2.0), rows=rows)
    md = (root / "report" / "envelope.md").read_text()
    section = md.split("## What broke first\n", 1)[1].split("\n## ", 1)[0]
    assert res.sentence in section and "the load generator" in res.sentence
    assert "at 90 s, sweep-2: a load-generator process used 97% of a CPU core" in section
    assert "- times: every \"at N s\", table window and graph counts seconds from the run's start, " \
           "1970-01-01 00:16:00 UTC" in md
    assert "rose by 220 " in md and "(0.00%)" in md
    table_md = (root / "report" / "table.md").read_text().splitlines()
    assert table_md[2].endswith("| ok |") and table_md[3].endswith("| NOT TRUSTWORTHY: load generator CPU-saturated |")
    assert [r["trustworthy"] for r in rows] == [True, False]
    assert "What broke first" in (root / "report" / "envelope.html").read_text()


def test_the_server_histograms_explain_the_first_slo_failure():
    # one pass this time: 5 users passed with a 2 ms server queue, 20 users failed with 900 ms of queue
    stages = [s.replace(pass_name="sweep") for s in STAGES]
    rows = [r.replace(pass_name="sweep", target_users=u, kind="users")
            for r, u in zip(ROWS_TTFT_FAILS_AT_20, (1, 5, 20))]
    rows[1] = rows[1].replace(server_queue_mean_ms=2.0)
    rows[2] = rows[2].replace(server_queue_mean_ms=900.0)
    run = SimpleNamespace(stages=stages, frame=pd.DataFrame(), telemetry={"metrics": metrics()},
                          info=SimpleNamespace(started_unix_s=T0), failures=None)
    res = what_broke_first(run, rows)
    assert res.server_evidence == ("server queue time mean 2 -> 900 ms from 5 users",)
    assert res.sentence == (
        "P95 TTFT exceeded its 1,000 ms SLO (1,412 ms) in queueing-20u (from 120 s), before any server "
        "pressure or error was seen: TTFT broke first. Server side in queueing-20u: server queue time mean "
        "2 -> 900 ms from 5 users."
    )
    # without the histograms the sentence is the one it always was
    plain = what_broke_first(run, [r.replace(server_queue_mean_ms=None) for r in rows])
    assert plain.server_evidence == ()
    assert plain.sentence == broke_sentence(result(events(m=metrics())))
