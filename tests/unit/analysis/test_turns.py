"""TTFT by conversation turn over each stage's window, worked out by hand."""

from __future__ import annotations

import csv
import io
import math

import pytest

from analysis.load import load_run
from analysis.report import write_report
from analysis.table import window_samples
from analysis.turns import TurnRow, has_turns, turn_lines, turn_table, write_turns_csv


@pytest.fixture
def conversations(builders, tmp_path):
    """One stage (window [1007, 1060]); turns 0, 1, 2 of conversations c0 and c1."""
    make_stage, make_record, write_run = builders
    st = make_stage(0, 2, 1000.0, 1060.0, pass_name="chat")

    def rec(t, ttft, turn, conversation, prompt, **kw):
        r = make_record(st, t, ttft, prompt_tokens=prompt, **kw)
        r.update(turn_index=turn, conversation_id=conversation, source_index=7)
        return r

    recs = [
        rec(1002.0, 0.9, 0, "c9", 50),  # before the window: not counted
        rec(1010.0, 0.1, 0, "c0", 100), rec(1011.0, 0.3, 0, "c1", 120),
        rec(1020.0, 0.2, 1, "c0", 300), rec(1021.0, 0.4, 1, "c1", 340),
        rec(1030.0, 0.5, 2, "c0", 600), rec(1031.0, 0.0, 2, "c1", 650, error="http_500"),
        make_record(st, 1040.0, 0.25),  # a request without a turn (counted by the table, not here)
    ]
    return load_run(write_run(tmp_path / "conv", stages=[st], records=recs))


def test_the_frame_carries_where_each_request_came_from(conversations):
    frame = conversations.frame
    assert has_turns(frame)
    assert frame["turn_index"].tolist()[:3] == [0, 0, 0] and frame["turn_index"].isna().tolist()[-1]
    assert frame["conversation_id"].tolist()[1] == "c0" and frame["source_index"].tolist()[1] == 7


def test_per_turn_rows(conversations):
    turns = turn_table(conversations.frame, window_samples(conversations))
    assert [t.turn_index for t in turns] == [0, 1, 2]
    first, second, third = turns
    # turn 0: 100 and 300 ms (the 1002 s request is before the window): p50 200, p95 100 + 0.95 * 200
    assert (first.requests, first.ok_requests) == (2, 2)
    assert first.ttft_p50_ms == pytest.approx(200.0) and first.ttft_p95_ms == pytest.approx(290.0)
    assert first.prompt_tokens_p50 == pytest.approx(110.0)
    assert second.ttft_p50_ms == pytest.approx(300.0) and second.ttft_p95_ms == pytest.approx(390.0)
    assert second.prompt_tokens_p50 == pytest.approx(320.0)
    # turn 2: one success, one failure (counted, not in the percentiles)
    assert (third.requests, third.ok_requests) == (2, 1)
    assert third.ttft_p50_ms == pytest.approx(500.0) == third.ttft_p95_ms
    assert third.prompt_tokens_p50 == pytest.approx(600.0)
    assert (first.pass_name, first.stage_name, first.stage_index) == ("chat", "chat-2", 0)
    assert turn_lines(turns) == [
        "chat-2: TTFT p50 200 ms at turn 1 (110 prompt tokens, 2 requests) and 500 ms at turn 3 "
        "(600 prompt tokens, 1 request)."]


def test_turns_csv_and_report_section(conversations, tmp_path):
    out = tmp_path / "report"
    written = write_report(conversations, out)
    assert "turns.csv" in written and "clients.csv" not in written
    got = list(csv.DictReader(io.StringIO((out / "turns.csv").read_text(encoding="utf-8"))))
    assert [(r["turn_index"], r["requests"], r["ok_requests"], r["ttft_p95_ms"], r["prompt_tokens_p50"])
            for r in got] == [("0", "2", "2", "290.0", "110.0"), ("1", "2", "2", "390.0", "320.0"),
                              ("2", "2", "1", "500.0", "600.0")]
    md = (out / "envelope.md").read_text(encoding="utf-8")
    assert md.index("## Summary") < md.index("## By conversation turn") < md.index("## Run")
    assert "| chat | chat-2 | 1 | 2 | 2 | 200.0 | 290.0 | 110 |" in md
    assert "| chat | chat-2 | 3 | 2 | 1 | 500.0 | 500.0 | 600 |" in md


def test_no_turns_no_rows_no_section(known_run, tmp_path):
    run = load_run(known_run)
    assert not has_turns(run.frame)
    assert turn_table(run.frame, window_samples(run)) == []
    out = tmp_path / "report"
    written = write_report(run, out)
    assert "turns.csv" not in written and not (out / "turns.csv").exists()
    assert "By conversation turn" not in (out / "envelope.md").read_text(encoding="utf-8")


def test_turns_csv_writes_nan_as_empty():
    sink = io.StringIO()
    write_turns_csv([TurnRow(pass_name="p", stage_name="s", stage_index=0, turn_index=0, requests=1, ok_requests=0,
                             ttft_p50_ms=math.nan, ttft_p95_ms=math.nan, prompt_tokens_p50=math.nan)], sink)
    assert sink.getvalue().splitlines()[1] == "p,s,0,0,1,0,,,"
