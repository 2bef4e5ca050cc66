"""A run that did not finish (status partial, running or failed; a torn last record) is reported as partial."""

from __future__ import annotations

import io

import orjson
import pytest

from analysis.cli import main
from analysis.load import completeness, load_run


def _run(builders, root, *, status, planned=None, last_end=True, torn=False):
    make_stage, make_record, write_run = builders
    stages = [make_stage(0, 1, 1000.0, 1030.0), make_stage(1, 2, 1030.0, 1060.0)]
    if not last_end:
        stages[1]["end_unix_s"] = None
    recs = [make_record(stages[0], 1006.0 + i, 0.1) for i in range(20)]
    recs += [make_record(stages[1], 1036.0 + i, 0.1) for i in range(10)]
    root = write_run(root, stages=stages, records=recs)
    info = orjson.loads((root / "run.json").read_bytes())
    if status is None:
        del info["status"]
    else:
        info["status"] = status
    if planned is not None:
        info["planned_stages"] = planned
    (root / "run.json").write_bytes(orjson.dumps(info))
    if torn:
        line = orjson.dumps(make_record(stages[1], 1047.0, 0.1))
        with open(root / "records" / "h_1.jsonl", "ab") as fh:
            fh.write(line[: len(line) // 2])  # killed mid-write: no newline, half an object
    return root


@pytest.mark.parametrize(
    "status,planned,partial,label",
    [("complete", None, False, "complete run"), ("completed", 2, False, "complete run"),
     ("partial", None, True, "partial run"), ("running", None, True, "partial run"),
     ("failed", None, True, "failed run"), ("complete", 4, True, "partial run"),
     (None, None, False, "run status unknown")],
)
def test_completeness(builders, tmp_path, status, planned, partial, label):
    c = completeness(load_run(_run(builders, tmp_path / "run", status=status, planned=planned)))
    assert (c.status, c.partial, c.label) == (status, partial, label)
    assert bool(c.reasons) == (partial or status is None)
    if planned == 4:
        assert "2 of 4 planned stages ran." in c.reasons


def test_killed_locust_running_status_and_torn_last_line(builders, tmp_path):
    """What a killed Locust leaves: run.json says running, the last stage never ended, half a record."""
    run_dir = _run(builders, tmp_path / "run", status="running", last_end=False, torn=True)
    run = load_run(run_dir)
    assert len(run.frame) == 30  # the torn line is skipped, every whole record kept
    assert any("unreadable record line skipped" in m for m in run.missing)
    c = completeness(run)
    assert c.partial and c.status == "running"
    assert any("sweep-2 has no recorded end" in r for r in c.reasons)

    out, err = io.StringIO(), io.StringIO()
    assert main([str(run_dir)], err=err, out=out) == 0
    md = (run_dir / "report" / "envelope.md").read_text()
    assert md.startswith("# Service envelope: run (partial run)\n")
    banner = md.splitlines()[2]
    assert banner.startswith("> **Partial run. run.json still says \"running\"")
    assert "covers only what was recorded before the run stopped" in banner
    html = (run_dir / "report" / "envelope.html").read_text()
    assert "<title>Service envelope: run (partial run)</title>" in html
    assert '<p class="banner">Partial run. run.json still says &quot;running&quot;' in html
    printed = out.getvalue().splitlines()
    assert printed[0].startswith('PARTIAL RUN: run.json still says "running"')
    assert "traceback" not in err.getvalue().lower()


def test_complete_run_is_not_marked(builders, tmp_path):
    run_dir = _run(builders, tmp_path / "run", status="complete")
    out = io.StringIO()
    assert main([str(run_dir)], err=io.StringIO(), out=out) == 0
    md = (run_dir / "report" / "envelope.md").read_text()
    assert md.startswith("# Service envelope: run\n") and "partial" not in md.lower()
    assert "partial" not in (run_dir / "report" / "envelope.html").read_text().lower()
    assert "PARTIAL" not in out.getvalue()


def test_failed_run_says_why(builders, tmp_path):
    run_dir = _run(builders, tmp_path / "run", status="failed")
    info = orjson.loads((run_dir / "run.json").read_bytes())
    info["failure"] = "vLLM exited with code 1 during start-up"
    (run_dir / "run.json").write_bytes(orjson.dumps(info))
    out = io.StringIO()
    assert main([str(run_dir)], err=io.StringIO(), out=out) == 0
    md = (run_dir / "report" / "envelope.md").read_text()
    assert md.startswith("# Service envelope: run (failed run)\n")
    assert 'run.json says "failed": vLLM exited with code 1 during start-up.' in md
    assert out.getvalue().startswith("FAILED RUN: ")


def test_a_record_line_that_is_not_an_object_is_skipped(builders, tmp_path):
    run_dir = _run(builders, tmp_path / "run", status="complete")
    with open(run_dir / "records" / "h_1.jsonl", "ab") as fh:
        fh.write(b"12\n[1, 2]\n")
    run = load_run(run_dir)
    assert len(run.frame) == 30
    assert any("not a JSON object" in m for m in run.missing)
