"""The analysis on a real quick capstone run against the CPU vLLM."""

from __future__ import annotations

import csv
import subprocess
import sys

import matplotlib.image
import pytest

from analysis.envelope import _seconds, envelope_sentence, find_envelopes, level_text
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


def test_the_envelope_sentence_agrees_with_the_table(report_dir, capstone_run):
    """Each pass's sentence has the table's verdict and numbers: every stage up to the safe level met its
    SLOs, the stage named as broken failed one, and the figures quoted are that row's cells."""
    run_dir, _ = capstone_run
    rows = envelope_table(load_run(run_dir))
    report = (report_dir / "envelope.md").read_text()
    for finding in find_envelopes(rows):
        sentence = envelope_sentence(finding)
        assert sentence in report
        mine = sorted((r for r in rows if r.pass_name == finding.pass_name and not r.trust.server_stopped),
                      key=lambda r: r.window.target_users)
        assert finding.status in ("all_pass", "broke", "none_pass"), finding  # the capstone sets SLOs
        if finding.status == "all_pass":
            assert all(r.slo.slo_pass is True for r in mine)
            assert finding.safe_row is mine[-1]  # the limit is above the highest tested level
        if finding.safe_row is not None:
            safe = finding.safe_row
            assert all(r.slo.slo_pass is True for r in mine if r.window.target_users <= safe.window.target_users)
            assert f"{safe.throughput.aggregate_output_tokens_per_s:.0f} output tokens/s" in sentence
            assert f"p95 TTFT {_seconds(safe.latency.ttft_p95_ms)} s" in sentence
            assert level_text(safe) in sentence
        if finding.broke_row is not None:
            broke = finding.broke_row
            assert broke.slo.slo_pass is False and level_text(broke) in sentence
            assert finding.broke_slo in broke.slo.slo_results and finding.broke_slo.passed is False
