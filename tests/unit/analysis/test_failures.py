"""Failed requests by category, Locust's count of them, and a server that stopped answering."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from analysis.broke import what_broke_first
from analysis.cli import main
from analysis.envelope import envelope_sentence, find_envelope
from analysis.failures import (
    MIN_STOP_REQUESTS,
    locust_failure_counts,
    failure_counts,
    run_server_stop,
    server_stop,
    server_stop_sentence,
    write_failures_csv,
)
from analysis.load import load_run
from analysis.table import envelope_table
from envelope.stages import StageRecord


def _stages(builders):
    make_stage = builders[0]
    return [make_stage(0, 1, 1000.0, 1030.0), make_stage(1, 2, 1030.0, 1060.0), make_stage(2, 4, 1060.0, 1090.0)]


def _dies_at_1045(builders, root, *, metrics=None):
    """Healthy requests until 1045 s (stage 1), a stream cut at 1045.0, then refused connections."""
    _, make_record, write_run = builders
    stages = _stages(builders)
    recs = [make_record(stages[0], 1006.0 + i, 0.1) for i in range(20)]  # each ends 0.6 s after its start
    recs += [make_record(stages[1], 1031.0 + i, 0.1) for i in range(14)]  # last ends at 1044.6
    recs.append(make_record(stages[1], 1002.0, 0.0, error="http_500", done_after_s=0.1))  # answered: an HTTP error
    recs.append(make_record(stages[1], 1044.7, 0.0, error="connection_reset", done_after_s=0.3))  # ends 1045.0
    recs += [make_record(stages[1], 1045.0 + 0.5 * i, 0.0, error="connect_error", done_after_s=0.001)
             for i in range(30)]  # 1045.0 .. 1059.5
    recs += [make_record(stages[2], 1060.0 + i, 0.0, error="connect_error", done_after_s=0.001) for i in range(30)]
    recs.append(make_record(stages[2], 1089.0, 0.0, error="cancelled", done_after_s=0.5))
    return write_run(root, stages=stages, records=recs, metrics=metrics)


def test_failure_counts_by_category_and_stage(builders, tmp_path):
    run = load_run(_dies_at_1045(builders, tmp_path / "run"))
    counts = failure_counts(run.frame, run.stages)
    got = [(f.category, f.requests, f.by_stage) for f in counts]
    assert got == [
        ("connect_error", 60, ((1, "sweep-2", 30), (2, "sweep-4", 30))),
        ("connection_reset", 1, ((1, "sweep-2", 1),)),
        ("http_500", 1, ((1, "sweep-2", 1),)),
        ("cancelled", 1, ((2, "sweep-4", 1),)),  # not a failure: listed last
    ]
    assert [f.is_failure for f in counts] == [True, True, True, False]
    sink = io.StringIO()
    write_failures_csv(counts, sink)
    assert sink.getvalue().splitlines() == [
        "category,stage_index,stage_name,requests", "connect_error,1,sweep-2,30", "connect_error,2,sweep-4,30",
        "connection_reset,1,sweep-2,1", "http_500,1,sweep-2,1", "cancelled,2,sweep-4,1",
    ]


def test_locust_failure_counts_read_the_category_from_the_error():
    csv = pd.DataFrame({
        "Method": ["E2E", "E2E", "E2E", "E2E", "TTFT", "E2E"],
        "Name": ["default"] * 6,
        "Error": ["LLMRequestError('http_500: Internal server error')",
                  "LLMRequestError(\"http_401: {'error': 'Unauthorized'}\")",
                  "LLMRequestError('malformed_sse: {\"id\":\"a\"')",
                  "LLMRequestError('malformed_sse: {\"id\":\"b\"')",
                  "LLMRequestError('http_500: x')",  # not an E2E entry: not a request
                  "incomplete_stream: stream ended without [DONE]"],  # a plain string (from a worker)
        "Occurrences": [3, 1, 2, 5, 7, 4],
    })
    assert locust_failure_counts(csv) == {"http_500": 3, "http_401": 1, "malformed_sse": 7, "incomplete_stream": 4}
    assert locust_failure_counts(None) is None
    bare = pd.DataFrame({"Method": ["E2E"], "Error": ["LLMRequestError('timeout_total')"], "Occurrences": [2]})
    assert locust_failure_counts(bare) == {"timeout_total": 2}


def test_server_stop_when_and_where(builders, tmp_path):
    metrics = [{"t_unix_s": 1000.0 + t, "ok": True, "requests_running": 1} for t in range(0, 45)]
    metrics += [{"t_unix_s": 1000.0 + t, "ok": False, "error": "ConnectError: [Errno 111] Connection refused"}
                for t in range(46, 91)]
    run = load_run(_dies_at_1045(builders, tmp_path / "run", metrics=metrics))
    stop = run_server_stop(run)
    assert stop is not None
    assert stop.t_unix_s == pytest.approx(1045.0)  # the cut stream ended there; the refusals from then on
    assert (stop.stage_index, stop.stage_name, stop.pass_name) == (1, "sweep-2", "sweep")
    assert stop.requests == 61  # the reset and 60 refusals; the cancelled request is not counted
    assert stop.categories == (("connect_error", 60), ("connection_reset", 1))
    assert stop.affected_stage_indices == (1, 2)
    # the last answered request (started 1044, 11 tokens at 0.1 + 0.05 i) ended at 1044.6
    assert stop.last_answer_unix_s == pytest.approx(1044.6)
    assert (stop.metrics_last_ok_unix_s, stop.metrics_failed_from_unix_s, stop.metrics_failed_samples) == (
        1044.0, 1046.0, 45)
    text = server_stop_sentence(stop, zero_unix_s=1000.0, stages=run.stages)
    assert text.startswith("The server stopped answering at 45.0 s (stage sweep-2): every one of the 61 requests")
    assert "(connect_error 60, connection_reset 1); the last response data arrived at 44.6 s." in text
    assert "Its /metrics failed from 46.0 s on (45 failed samples; first: ConnectError" in text
    assert text.endswith("The envelope above that point is unknown: sweep-2, sweep-4 are not judged.")


def test_table_and_envelope_leave_out_the_stages_after_the_stop(builders, tmp_path):
    run = load_run(_dies_at_1045(builders, tmp_path / "run"))
    rows = envelope_table(run)
    assert [r["server_stopped"] for r in rows] == [False, True, True]
    assert [r["slo_pass"] for r in rows] == [True, False, False]  # still computed, not judged
    finding = find_envelope(rows)
    assert finding.status == "all_pass" and finding.safe_row["stage_name"] == "sweep-1"
    assert finding.server_stopped_row["stage_name"] == "sweep-2"
    sentence = envelope_sentence(finding)
    assert sentence.startswith("Met every SLO up to 1 user at 11 output tokens")
    assert sentence.endswith("then the server stopped answering during sweep-2 (2 users), "
                             "so the envelope above 1 user is unknown.")
    first = what_broke_first(run, rows)
    assert [e.kind for e in first.events] == ["errors", "server_stopped"]  # the HTTP 500 came first
    assert first.events[1].t_s == pytest.approx(45.0) and first.events[1].stage_name == "sweep-2"
    assert first.sentence.endswith("Later the server stopped answering at 45 s (sweep-2): "
                                   "the envelope above that point is unknown.")


def test_report_says_when_the_server_stopped(builders, tmp_path):
    run_dir = _dies_at_1045(builders, tmp_path / "run")
    out = io.StringIO()
    assert main([str(run_dir)], err=io.StringIO(), out=out) == 0
    md = (run_dir / "report" / "envelope.md").read_text()
    section = md.split("## Server stopped answering", 1)[1].split("##", 1)[0]
    assert "The server stopped answering at 45.0 s (stage sweep-2)" in section
    assert "not judged: server stopped" in md  # the table's SLO cell of sweep-2 and sweep-4
    html = (run_dir / "report" / "envelope.html").read_text()
    assert "<h2>Server stopped answering</h2>" in html and "The server stopped answering at 45.0 s" in html
    printed = out.getvalue()
    assert "the envelope above 1 user is unknown" in printed
    assert "The server stopped answering at 45.0 s (stage sweep-2)" in printed
    failures_md = md.split("## Failed requests by category", 1)[1].split("##", 1)[0]
    assert "| connect_error | 60 | - | sweep-2: 30, sweep-4: 30 |" in failures_md
    assert "| all failures | 62 | - |  |" in failures_md
    assert (run_dir / "report" / "failures.csv").read_text().count("\n") == 6
    assert "<h2>Failed requests by category</h2>" in html
    assert "<tr><td>connect_error</td><td>60</td><td>-</td><td>sweep-2: 30, sweep-4: 30</td></tr>" in html
    assert "<h2>Token counts: server usage vs client estimate</h2>" in html


def test_no_stop_when_the_server_answers_again(builders, tmp_path):
    _, make_record, write_run = builders
    stages = _stages(builders)
    recs = [make_record(stages[1], 1031.0 + 0.1 * i, 0.0, error="connect_error", done_after_s=0.001)
            for i in range(50)]  # an outage...
    recs += [make_record(stages[2], 1061.0 + i, 0.1) for i in range(5)]  # ...that ended
    run = load_run(write_run(tmp_path / "run", stages=stages, records=recs))
    assert run_server_stop(run) is None
    assert not any(r["server_stopped"] for r in envelope_table(run))


@pytest.mark.parametrize("category", ["timeout_first_token", "http_503", "stream_error_event"])
def test_an_answering_but_failing_server_did_not_stop(builders, tmp_path, category):
    _, make_record, write_run = builders
    stages = _stages(builders)
    recs = [make_record(stages[0], 1006.0 + i, 0.1) for i in range(5)]
    recs += [make_record(stages[1], 1031.0 + i, 0.0, error=category, done_after_s=0.5) for i in range(20)]
    run = load_run(write_run(tmp_path / "run", stages=stages, records=recs))
    assert run_server_stop(run) is None


def test_too_few_unanswered_requests_is_not_a_stop(builders, tmp_path):
    _, make_record, write_run = builders
    stages = _stages(builders)
    recs = [make_record(stages[0], 1006.0 + i, 0.1) for i in range(5)]
    tail = [make_record(stages[2], 1080.0 + i, 0.0, error="connection_closed", done_after_s=0.001)
            for i in range(MIN_STOP_REQUESTS)]
    run = load_run(write_run(tmp_path / "few", stages=stages, records=recs + tail[:-1]))
    assert run_server_stop(run) is None
    run = load_run(write_run(tmp_path / "enough", stages=stages, records=recs + tail))
    stop = run_server_stop(run)
    assert stop is not None and stop.affected_stage_indices == (2,) and stop.stage_name == "sweep-4"


def test_a_stop_before_any_request_succeeded(builders, tmp_path):
    _, make_record, write_run = builders
    stages = _stages(builders)
    recs = [make_record(stages[0], 1001.0 + 0.2 * i, 0.0, error="connect_error", done_after_s=0.001)
            for i in range(10)]
    run = load_run(write_run(tmp_path / "run", stages=stages, records=recs))
    stop = run_server_stop(run)
    assert stop is not None and stop.last_answer_unix_s is None and stop.affected_stage_indices == (0, 1, 2)
    finding = find_envelope(envelope_table(run))
    assert finding.status == "server_stopped"
    assert envelope_sentence(finding) == ("The server stopped answering during sweep-1 (1 user), before any "
                                          "stage of this pass finished, so its envelope is unknown.")


def test_server_stop_on_a_bare_frame():
    frame = pd.DataFrame({"error_category": [None, "connect_error", "connect_error", "connect_error"],
                          "in_flight_end_unix_s": [10.0, 11.0, 12.0, 13.0], "wall_start_unix_s": [9.0, 11, 12, 13]})
    stop = server_stop(frame, [StageRecord(stage_index=0, stage_name="s", start_unix_s=0.0, end_unix_s=12.5)])
    assert stop is not None and (stop.t_unix_s, stop.stage_name, stop.requests) == (11.0, "s", 3)
    assert server_stop(frame.iloc[:0], []) is None
