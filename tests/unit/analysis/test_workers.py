"""A distributed run's load generators (workers.json): the report section, lost/left workers, placement tolerance."""

from __future__ import annotations

import csv
import io

import orjson
import pandas as pd
import pytest

from analysis.cli import main
from analysis.load import load_run
from analysis.report import summary_lines, write_report
from analysis.table import WindowRule, envelope_table, write_table_csv
from analysis.workers import placement_tolerance_s, read_workers, records_per_worker

W1, W2 = "w1:1234", "w2:5678"
RULE = WindowRule(settle_s=5.0)


def _worker(worker_id: str, *, status: str = "finished", ended: float | None = None, last_heard: float = 1089.0,
            received: int = 0, gaps: int = 0, in_flight: int = 0, offset_s: float | None = 0.0012,
            uncertainty_s: float | None = 0.0004) -> dict:
    host = worker_id.split(":")[0]
    return {
        "worker_id": worker_id, "node_id": f"{host}_3f2a", "host": host, "status": status,
        "first_seen_unix_s": 999.0, "last_heard_unix_s": last_heard, "ended_unix_s": ended,
        "stage_index_at_end": None, "records_received": received, "record_batches": 40, "record_gaps": gaps,
        "last_report": {"users": 1, "in_flight": in_flight, "open_loop": 0},
        "clock_offset_s": offset_s, "clock_uncertainty_s": uncertainty_s,
    }


def _write_workers(root, workers: list[dict]) -> None:
    (root / "workers.json").write_bytes(orjson.dumps({
        "schema_version": 1, "written_unix_s": 1090.5, "heartbeat_timeout_s": 10, "ship_interval_s": 0.25, "workers": workers,
    }))


def _run(builders, root, *, until: dict[str, float] | None = None):
    """Three 30 s stages from 1000 (sweep-1, -2, -4); each worker starts a request every 2 s, from 6 s into a stage.

    ``until``: a worker's last request starts before this time. Returns (run dir, records per worker).
    """
    make_stage, make_record, write_run = builders
    stages = [make_stage(0, 1, 1000.0, 1030.0), make_stage(1, 2, 1030.0, 1060.0), make_stage(2, 4, 1060.0, 1090.0)]
    until = until or {}
    recs, per_worker = [], {W1: 0, W2: 0}
    for st in stages:
        for t in range(int(st["start_unix_s"]) + 6, int(st["end_unix_s"]), 2):
            for wid in (W1, W2):
                if t < until.get(wid, float("inf")):
                    rec = make_record(st, float(t), 0.1)
                    rec["worker_id"] = wid
                    recs.append(rec)
                    per_worker[wid] += 1
    return write_run(root, stages=stages, records=recs), per_worker


def _report(run, rows, tmp_path) -> tuple[str, str]:
    write_report(run, tmp_path / "report", rule=RULE, rows=rows)
    return (tmp_path / "report" / "envelope.md").read_text(), (tmp_path / "report" / "envelope.html").read_text()


def test_two_finished_workers(builders, tmp_path):
    root, per_worker = _run(builders, tmp_path / "run")
    _write_workers(root, [_worker(W1, received=per_worker[W1], offset_s=-0.0012),
                          _worker(W2, received=per_worker[W2], offset_s=0.0007, uncertainty_s=0.0003)])
    run = load_run(root)
    assert [w["worker_id"] for w in run.workers] == [W1, W2]
    assert run.workers_info["ship_interval_s"] == 0.25
    assert not [m for m in run.missing if "workers.json" in m]
    assert run.placement_tolerance_s == pytest.approx(1.0004)
    assert run.records_outside_stage == 0
    rows = envelope_table(run, rule=RULE)
    assert [r["trustworthy"] for r in rows] == [True, True, True]
    assert all(r["load_generators_ended"] == () for r in rows)

    md, html = _report(run, rows, tmp_path)
    assert per_worker == {W1: 36, W2: 36}  # 12 starts per stage and worker
    section = md.split("## Load generators\n", 1)[1].split("## Table", 1)[0]
    assert ("2 load-generator worker processes on 2 hosts (w1, w2), driven by one master. Records per worker "
            "are counted from the records' worker_id: 72 in all.") in section
    assert "| w1:1234 | w1 | finished | 36 | 36 | 0 | -1.2 | 0.4 |" in section
    assert "| w2:5678 | w2 | finished | 36 | 36 | 0 | 0.7 | 0.3 |" in section
    assert "The largest offset corrected was 1.2 ms, known to within 0.4 ms." in section
    assert ("Records are placed in the stage the master announced when each was sent; their start times, on the "
            "master's clock, agree with the master's stage boundaries within \u00b11.00 s (0 outside).") in section
    assert "lost" not in section and "left at" not in section
    assert "<h2>Load generators</h2>" in html and "<td>w2:5678</td>" in html
    assert not any("Load generator" in line for line in summary_lines(run, rows))


def test_lost_worker_mid_stage(builders, tmp_path):
    # w1 went silent at 1032.0 (stage sweep-2); the master declared it lost at 1035.2
    root, per_worker = _run(builders, tmp_path / "run", until={W1: 1032.0})
    _write_workers(root, [_worker(W1, status="lost", last_heard=1032.0, ended=1035.2, received=per_worker[W1],
                                  in_flight=3),
                          _worker(W2, received=per_worker[W2])])
    run = load_run(root)
    rows = envelope_table(run, rule=RULE)
    assert [r["trustworthy"] for r in rows] == [True, False, True]
    assert rows[1]["untrustworthy_reasons"] == (
        "load generator w1:1234 was lost at +35.2 s; the offered load fell for the rest of the stage")
    (item,) = rows[1]["load_generators_ended"]
    assert (item["worker"], item["status"], item["silent_t_s"]) == (W1, "lost", None)
    assert item["t_s"] == pytest.approx(35.2)
    sink = io.StringIO()
    write_table_csv(rows, sink)
    cells = [r["load_generators_ended"] for r in csv.DictReader(io.StringIO(sink.getvalue()))]
    assert cells == ["", "w1:1234 lost at +35.2 s", ""]

    md, html = _report(run, rows, tmp_path)
    assert per_worker[W1] == 12  # 1006..1028 in sweep-1; sweep-2's first start (1036) came after it went silent
    sentence = next(line for line in md.splitlines() if line.startswith("- Load generator w1:1234"))
    assert sentence.startswith(
        "- Load generator w1:1234 was lost at 1970-01-01 00:17:15 UTC (+35.2 s, during stage sweep-2): the master "
        "last heard from it at +32.0 s and declared it lost after 3.2 s of silence. "
        f"{per_worker[W1]} of its records are in the run. Not in the run: the 3 request(s) it had in flight at its "
        "last report and the records it made in its last 0.25 s before going silent, which it never shipped "
        # its records ended at 1022.6, 1024.6, 1026.6, 1028.6 (start + 0.6 s E2E): 4 in the 10 s before 1032.0
        "(at the 0.4 records/s it made over the 10 s before, about 0.1).")
    assert "the offered load of sweep-2 fell from then on: that stage is marked not trustworthy." in sentence
    assert "Load generator w1:1234 was lost at 1970-01-01 00:17:15 UTC (+35.2 s, during stage sweep-2)" in html
    assert "| w1:1234 | w1 | lost | 12 |" in md
    lines = summary_lines(run, rows)
    assert ("Load generator w1:1234 was lost at 1970-01-01 00:17:15 UTC (+35.2 s, during stage sweep-2); the offered "
            "load of sweep-2 fell from then on (stage not trustworthy); 3 request(s) in flight on it are not in "
            "the run.") in lines


def test_lost_worker_silent_across_a_stage_boundary_flags_both_stages(builders, tmp_path):
    # silent from 1028.0 (sweep-1), declared lost at 1038.0 (sweep-2): both stages lost its load
    root, per_worker = _run(builders, tmp_path / "run", until={W1: 1028.0})
    _write_workers(root, [_worker(W1, status="lost", last_heard=1028.0, ended=1038.0, received=per_worker[W1]),
                          _worker(W2, received=per_worker[W2])])
    run = load_run(root)
    rows = envelope_table(run, rule=RULE)
    assert [r["trustworthy"] for r in rows] == [False, False, True]
    assert rows[0]["untrustworthy_reasons"] == ("load generator w1:1234 went silent at +28.0 s (declared lost at "
                                                "+38.0 s); the offered load fell for the rest of the stage")
    assert rows[1]["untrustworthy_reasons"].startswith("load generator w1:1234 was lost at +38.0 s;")
    md, _ = _report(run, rows, tmp_path)
    assert ("- Load generator w1:1234 was lost at 1970-01-01 00:17:18 UTC (+38.0 s, during stage sweep-2): the "
            "master last heard from it at +28.0 s and declared it lost after 10.0 s of silence.") in md
    assert ("so the offered load of sweep-1, sweep-2 fell from when it went silent: those stages are marked not "
            "trustworthy.") in md
    assert ("Load generator w1:1234 was lost at 1970-01-01 00:17:18 UTC (+38.0 s, during stage sweep-2); the offered "
            "load of sweep-1, sweep-2 fell from when it went silent (stages not trustworthy).") in summary_lines(
        run, rows)


def test_left_worker_and_records_lost_in_transit(builders, tmp_path):
    root, per_worker = _run(builders, tmp_path / "run", until={W2: 1070.5})
    _write_workers(root, [_worker(W1, received=per_worker[W1]),
                          _worker(W2, status="left", last_heard=1070.5, ended=1070.5, received=per_worker[W2] + 2,
                                  gaps=2)])
    run = load_run(root)
    rows = envelope_table(run, rule=RULE)
    assert [r["trustworthy"] for r in rows] == [True, True, False]
    assert rows[2]["untrustworthy_reasons"] == (
        "load generator w2:5678 left at +70.5 s; the offered load fell for the rest of the stage")
    md, _ = _report(run, rows, tmp_path)
    assert per_worker[W2] == 24 + 3  # sweep-1, sweep-2, then 1066, 1068, 1070 in sweep-4
    assert ("- Load generator w2:5678 left at 1970-01-01 00:17:50 UTC (+70.5 s, during stage sweep-4): it quit "
            "before the schedule ended. 27 of its records are in the run; none are expected missing because it "
            "left.") in md
    assert "| w2:5678 | w2 | left | 27 | 29 | 2 |" in md
    assert ("- 2 record(s) from w2:5678 were lost in transit: they are missing from its batch sequence, "
            "and not in the run.") in md
    lines = summary_lines(run, rows)
    assert ("Load generator w2:5678 left at 1970-01-01 00:17:50 UTC (+70.5 s, during stage sweep-4); the offered "
            "load of sweep-4 fell from then on (stage not trustworthy).") in lines
    assert "2 record(s) from load generator w2:5678 were lost in transit (not in the run)." in lines


def test_no_workers_json_says_nothing(builders, tmp_path):
    root, _ = _run(builders, tmp_path / "run")
    run = load_run(root)
    assert run.workers == [] and run.workers_info == {}
    assert run.placement_tolerance_s == 1.0
    assert not [m for m in run.missing if "workers" in m]
    rows = envelope_table(run, rule=RULE)
    md, html = _report(run, rows, tmp_path)
    assert "Load generators" not in md and "Load generators" not in html
    assert "load-generator worker" not in md


@pytest.mark.parametrize("content, note", [
    (b"{not json", "workers.json: unreadable ("),
    (b"[1, 2]", 'workers.json: not an object with a "workers" list'),
])
def test_unreadable_workers_json_is_one_note(builders, tmp_path, content, note):
    root, _ = _run(builders, tmp_path / "run")
    (root / "workers.json").write_bytes(content)
    run = load_run(root)
    notes = [m for m in run.missing if "workers.json" in m]
    assert len(notes) == 1 and notes[0].startswith(note)
    err, out = io.StringIO(), io.StringIO()
    assert main([str(root)], err=err, out=out) == 0
    md = (root / "report" / "envelope.md").read_text()
    assert "## Load generators" not in md
    assert f"- {notes[0]}" in md
    assert "traceback" not in err.getvalue().lower()


def test_wrong_values_are_ignored_with_one_note(tmp_path):
    w = _worker(W1, status="lost", ended=1035.2)
    w.update(clock_uncertainty_s="big", record_gaps=-1, last_report=[])
    _write_workers(tmp_path, [w, "not an object"])
    missing: list[str] = []
    workers, info = read_workers(tmp_path, missing)
    assert info["heartbeat_timeout_s"] == 10.0
    assert workers[0]["clock_uncertainty_s"] is None and workers[0]["record_gaps"] is None
    assert workers[0]["last_report"] is None and workers[0]["ended_unix_s"] == 1035.2
    assert missing == ["workers.json: 1 worker entry(ies) not a JSON object; skipped",
                       "workers.json: 3 value(s) of the wrong type ignored (first: workers[0].clock_uncertainty_s)"]


def test_placement_tolerance_grows_with_clock_uncertainty(builders, tmp_path):
    make_stage, make_record, write_run = builders
    stages = [make_stage(0, 1, 1000.0, 1030.0), make_stage(1, 2, 1030.0, 1060.0)]
    recs = [make_record(stages[0], 1010.0, 0.1), make_record(stages[1], 1040.0, 0.1),
            make_record(stages[1], 1028.8, 0.1),   # 1.2 s before its stage: inside 1.25 s, outside 1 s
            make_record(stages[1], 1028.6, 0.1)]   # 1.4 s before: outside either way
    root = write_run(tmp_path / "run", stages=stages, records=recs)
    plain = load_run(root)
    assert (plain.placement_tolerance_s, plain.records_outside_stage) == (1.0, 2)
    assert any(m.startswith("2 record(s) started outside their stage's wall-clock boundaries by more than 1.00 s")
               for m in plain.missing)

    _write_workers(root, [_worker("h:1", uncertainty_s=0.25), _worker("h:2", uncertainty_s=0.01)])
    run = load_run(root)
    assert run.placement_tolerance_s == pytest.approx(1.25)
    assert run.records_outside_stage == 1
    assert placement_tolerance_s(run.workers) == pytest.approx(1.25)
    md, _ = _report(run, envelope_table(run, rule=RULE), tmp_path)
    assert "agree with the master's stage boundaries within \u00b11.25 s (1 outside)." in md
    assert "- 1 record(s) started outside their stage's wall-clock boundaries by more than 1.25 s" in md
    assert "known to within 250 ms" in md


def test_records_per_worker_falls_back_to_workers_json():
    workers = [_worker(W1, received=5), _worker(W2, received=7)]
    assert records_per_worker(pd.DataFrame({"x": [1]}), workers) == ({W1: 5, W2: 7}, "workers.json")
    frame = pd.DataFrame({"worker_id": [W1, W1, W2, None]})
    assert records_per_worker(frame, workers) == ({W1: 2, W2: 1}, "records")
