"""The analysis on a real quick capstone run against the CPU vLLM."""

from __future__ import annotations

import csv
import subprocess
import sys

import matplotlib.image
import pytest

from analysis.envelope import find_envelope
from analysis.load import load_run
from analysis.table import envelope_table
from helpers.locust_runs import REPO, records

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report_dir(capstone_run):
    run_dir, _ = capstone_run
    proc = subprocess.run([sys.executable, "-m", "analysis", str(run_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return run_dir / "report"


def test_report_files_exist(report_dir):
    for name in ("envelope.md", "envelope.html", "table.csv", "table.md"):
        assert (report_dir / name).stat().st_size > 0, name


def test_every_graph_is_a_valid_png(report_dir):
    pngs = sorted(report_dir.glob("*.png"))
    assert len(pngs) >= 4
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_SIGNATURE, png
        height, width = matplotlib.image.imread(png).shape[:2]
        assert width >= 300 and height >= 200, png


def test_table_output_tokens_match_the_records(report_dir, capstone_run):
    run_dir, _ = capstone_run
    with open(report_dir / "table.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["pass_name"] for r in rows] == ["alive", "batching", "queueing", "long-context"]
    table_tokens = sum(int(float(r["stage_output_tokens"])) for r in rows)
    assert table_tokens == sum(r["output_tokens"] for r in records(run_dir))


def test_the_sentence_names_a_concurrency_that_was_tested(report_dir, capstone_run):
    run_dir, _ = capstone_run
    rows = envelope_table(load_run(run_dir))
    tested = {int(r["target_users"]) for r in rows}
    finding = find_envelope(rows)
    named = finding.safe_row or finding.broke_row
    assert named is not None, finding
    assert int(named["target_users"]) in tested
    text = (report_dir / "envelope.md").read_text()
    assert f"{int(named['target_users'])} concurrent" in text or f"{int(named['target_users'])} user" in text
