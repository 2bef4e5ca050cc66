"""Live progress: incremental tailing of record files and the sliding window."""

from __future__ import annotations

import io
import math

import orjson
import pytest

from envelope.progress import LiveWindow, ProgressDisplay, RecordTailer, current_stage, format_line


def rec(wall: float, *, ttft_s: float | None = 0.2, e2e_s: float = 2.0, tokens: int = 100,
        error: str | None = None) -> dict:
    t0 = 50.0  # perf_counter, unrelated to wall time
    r = {"wall_start_unix_s": wall, "t_start_s": t0, "t_done_s": t0 + e2e_s, "output_tokens": tokens,
         "error_category": error}
    if ttft_s is not None:
        r["t_first_token_s"] = t0 + ttft_s
    return r


def test_window_counts_and_rates():
    w = LiveWindow(window_s=10.0)
    # ends at 1002, 1005, 1009, 1011 (error with 40 streamed tokens), 1014
    w.add([rec(1000.0, ttft_s=0.1), rec(1003.0, ttft_s=0.2), rec(1007.0, ttft_s=0.3),
           rec(1009.0, ttft_s=None, tokens=40, error="timeout_total"), rec(1012.0, ttft_s=0.5)])
    snap = w.snapshot(1012.0)  # window (1002, 1012]: ends 1005, 1009, 1011
    assert (snap.requests, snap.errors, snap.window_requests) == (5, 1, 3)
    assert snap.output_tokens_per_s == pytest.approx((100 + 100 + 40) / 10.0)
    # p95 of TTFT 200 and 300 ms (the failure has none): 200 + 0.95 * 100
    assert snap.ttft_p95_ms == pytest.approx(295.0)
    later = w.snapshot(1030.0)
    assert later.window_requests == 0 and later.output_tokens_per_s == 0.0 and math.isnan(later.ttft_p95_ms)
    assert later.requests == 5  # totals stay


def test_window_drops_old_entries_but_keeps_totals():
    w = LiveWindow(window_s=1.0)
    w.add([rec(1000.0 + i) for i in range(100)])
    w.add([rec(2000.0)])
    assert w.requests == 101
    assert w.snapshot(2002.0).window_requests == 1
    assert len(w._recent) == 1


def test_tailer_reads_only_complete_lines_incrementally(tmp_path):
    d = tmp_path / "records"
    d.mkdir()
    a, b = d / "h_1.jsonl", d / "h_2.jsonl"
    line1, line2 = orjson.dumps({"n": 1}) + b"\n", orjson.dumps({"n": 2}) + b"\n"
    a.write_bytes(line1 + line2[:5])  # the second line is half written
    t = RecordTailer(d)
    assert t.poll() == [{"n": 1}]
    assert t.poll() == []
    with open(a, "ab") as fh:
        fh.write(line2[5:] + b"not json\n")
    b.write_bytes(orjson.dumps({"n": 3}) + b"\n")
    assert sorted(r["n"] for r in t.poll()) == [2, 3]
    assert t.skipped_lines == 1
    assert t.poll() == []


def test_tailer_without_directory(tmp_path):
    assert RecordTailer(tmp_path / "absent").poll() == []


def test_current_stage_and_line(tmp_path):
    assert current_stage(tmp_path) is None
    stages = [{"pass_name": "alive", "stage_name": "alive-1u", "target_users": 1, "start_unix_s": 1000.0,
               "duration_s": 24.0, "end_unix_s": 1024.0},
              {"pass_name": "queueing", "stage_name": "queueing-20u", "target_users": 20, "start_unix_s": 1024.0,
               "duration_s": 48.0, "end_unix_s": None}]
    (tmp_path / "stages.json").write_bytes(orjson.dumps(stages))
    stage = current_stage(tmp_path)
    assert (stage.stage_name, stage.stage_number, stage.target_users) == ("queueing-20u", 2, 20)
    w = LiveWindow(window_s=10.0)
    w.add([rec(1030.0, ttft_s=0.25, e2e_s=1.0)])
    line = format_line(w.snapshot(1034.0), stage, now_unix_s=1034.0, elapsed_s=40.0)
    assert line == ("[   40 s] | queueing / queueing-20u (10/48 s) | target 20 users | 1 requests, 0 errors | "
                    "last 10 s: 10 out tok/s, p95 TTFT 250 ms")
    stages[-1]["end_unix_s"] = 1072.0
    (tmp_path / "stages.json").write_bytes(orjson.dumps(stages))
    done = format_line(w.snapshot(1080.0), current_stage(tmp_path), now_unix_s=1080.0, elapsed_s=86.0)
    assert "schedule done after queueing / queueing-20u" in done


def test_a_search_probe_shows_its_number_and_the_answer_so_far(tmp_path):
    from envelope.search_log import ProbeEntry, SearchEntry, write_search_log

    stages = [{"pass_name": "find", "stage_name": f"find-{n}u", "target_users": n, "start_unix_s": 1000.0 + 20 * i,
               "duration_s": 20.0 if i < 2 else 60.0, "end_unix_s": 1020.0 + 20 * i if i < 2 else None}
              for i, n in enumerate((4, 8, 6))]
    (tmp_path / "stages.json").write_bytes(orjson.dumps(stages))
    probe = dict(good=80, judged=80, duration_s=20.0, attainment=1.0, attainment_low=0.95, attainment_high=1.0)
    write_search_log(tmp_path, [SearchEntry(
        pass_name="find", over="users", spec={}, target=0.95, thresholds={"ttft_ms": 100},
        probes=(ProbeEntry(stage_index=0, stage_name="find-4u", level=4, verdict="pass", **probe),
                ProbeEntry(stage_index=1, stage_name="find-8u", level=8, verdict="fail", **probe)),
        running_level=6, highest_pass=4, lowest_fail=8)])
    stage = current_stage(tmp_path)
    line = format_line(LiveWindow(window_s=10.0).snapshot(1045.0), stage, now_unix_s=1045.0, elapsed_s=50.0)
    # the probe's 60 s is only the longest it may be held: not shown as its length
    assert "find / find-6u (5 s, probe 3 of the search; so far between 4 and 8 users) | target 6 users" in line


def test_plain_display_prints_at_most_every_interval(tmp_path):
    out = io.StringIO()
    display = ProgressDisplay(tmp_path, stream=out, tty=False, plain_interval_s=10.0)
    display.start()
    display.update(1000.0)
    display.update(1005.0)
    display.update(1010.0)
    display.update(1011.0, force=True)
    display.stop()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and all("waiting for the first stage" in line for line in lines)
