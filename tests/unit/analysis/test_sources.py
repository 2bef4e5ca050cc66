"""The dataset and trace files a run drew from, as the report states them."""

from __future__ import annotations

from analysis.load import load_run
from analysis.report import write_report
from analysis.sources import SOURCE_COLUMNS, source_table
from envelope.source_log import LengthSummary, SourceEntry, write_source_log

SHAREGPT = SourceEntry(kind="dataset", path="data/sharegpt.json", format="sharegpt", entries=1000,
                       skipped_too_long=12, prompt_tokens=LengthSummary(count=988, p50=180, p95=900, max=3000),
                       output_tokens=LengthSummary(count=988, p50=200, p95=700, max=1500),
                       stages=("chat-2", "chat-4"), exact=True)
TRACE = SourceEntry(kind="trace", path="traces/day.jsonl", format="mooncake", entries=50, skipped_too_long=0,
                    prompt_tokens=LengthSummary(count=50, p50=4000, p95=12000, max=15000),
                    output_tokens=LengthSummary.of([]), stages=(), exact=False)


def test_source_table_rows():
    assert source_table([SHAREGPT, TRACE]) == [
        SOURCE_COLUMNS,
        ("data/sharegpt.json", "dataset", "sharegpt", "1,000", "12", "180 / 900 / 3,000", "200 / 700 / 1,500",
         "chat-2, chat-4", "exact"),
        ("traces/day.jsonl", "trace", "mooncake", "50", "0", "4,000 / 12,000 / 15,000", "-", "-", "estimated"),
    ]


def test_report_section_between_summary_and_run(known_run, tmp_path):
    write_source_log(known_run, [SHAREGPT, TRACE])
    run = load_run(known_run)
    assert run.sources == [SHAREGPT, TRACE]
    out = tmp_path / "report"
    write_report(run, out)
    md = (out / "envelope.md").read_text(encoding="utf-8")
    assert md.index("## Summary") < md.index("## Workload sources") < md.index("## Run")
    assert ("| data/sharegpt.json | dataset | sharegpt | 1,000 | 12 | 180 / 900 / 3,000 | 200 / 700 / 1,500 | "
            "chat-2, chat-4 | exact |") in md
    assert "| traces/day.jsonl | trace | mooncake | 50 | 0 | 4,000 / 12,000 / 15,000 | - | - | estimated |" in md


def test_no_sources_file_no_section(known_run, tmp_path):
    run = load_run(known_run)
    assert run.sources == []
    out = tmp_path / "report"
    write_report(run, out)
    assert "Workload sources" not in (out / "envelope.md").read_text(encoding="utf-8")
