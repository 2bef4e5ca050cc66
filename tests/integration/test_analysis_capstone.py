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


def test_the_report_says_where_the_time_goes_in_every_stage(report_dir, capstone_run):
    # vLLM's own histograms, delta over each window: every stage has them, and the client never saw a mean TTFT
    # below the server's by more than the histogram can resolve (the bucket holding the server's mean)
    run_dir, _ = capstone_run
    rows = envelope_table(load_run(run_dir))
    text = (report_dir / "envelope.md").read_text()
    section = text.split("## Where the time goes (server-side, per stage)\n", 1)[1].split("\n## ", 1)[0]
    for r in rows:
        s = r.server_latency
        print(f"{r.stage_name}: client mean TTFT {r.latency.ttft_mean_ms:.1f} ms, server {s.server_ttft_mean_ms} ms "
              f"(bucket {s.server_ttft_mean_bucket_ms} ms), queue {s.server_queue_mean_ms}, prefill "
              f"{s.server_prefill_mean_ms}, decode {s.server_decode_mean_ms}, E2E client "
              f"{r.latency.e2e_mean_ms:.1f} server {s.server_e2e_mean_ms}, finished {s.server_requests_finished}")
        assert f"### {r.pass_name} / {r.stage_name} (" in section, r.stage_name
        assert s.server_requests_finished, r.stage_name
        for stem in ("ttft", "queue", "prefill", "decode", "e2e"):
            assert getattr(s, f"server_{stem}_mean_ms") is not None, (r.stage_name, stem)
        if not r.counts.ok_requests:
            continue  # no client mean TTFT to compare (the long-context stage can end with none in its window)
        assert s.outside_engine_ttft_mean_ms is not None, r.stage_name
        assert s.outside_engine_ttft_mean_ms >= -s.server_ttft_mean_bucket_ms, (
            f"{r.stage_name}: client mean TTFT {r.latency.ttft_mean_ms:.1f} ms is below the server's "
            f"{s.server_ttft_mean_ms:.1f} ms by more than its {s.server_ttft_mean_bucket_ms:.0f} ms bucket")
    assert section.count("| TTFT mean |") == len(rows)
