"""The report of a fixed recorded run directory does not change when the code around it is reshaped.

``tests/fixtures/golden_run`` is a real run against the simulator (``server.sim`` with a fixed
seed, an injected ``http_500`` every 17th request; two closed-loop stages and one open-loop stage),
recorded with the code as it stood before the typed-seams rework. ``tests/fixtures/golden_expected``
holds what the analysis wrote for it then: the table (CSV and Markdown), the Markdown report,
the failures CSV and the terminal summary. Every cell and every line must come out the same.

One deliberate change since: every "at N s" of the write-up counts from the run's start, the zero of
the table's windows (it counted from the first stage's start, 2 s later in this run), and the header
states that zero. ``envelope.md`` and ``summary.txt`` were regenerated for that alone (the table
files were not: their cells have not changed). And one added section: ``envelope.md`` gained "Where the
time goes (server-side, per stage)" from the simulator's latency histograms, and nothing else changed.
And the open pass's envelope sentence now ends with a caution naming its stage flagged NOT TRUSTWORTHY
(the open-loop stage sent 11% fewer requests than asked): a headline no longer hides the flag; and the
method notes say how step-down windows and load-generator stalls are handled.

Deliberate changes with the SLO search (all expected files regenerated, checked by hand first):

- ``slo_results``: every stage gains the attainment SLO (``attainment_min>=0.95``, the share of requests
  that met every per-request threshold); the SLOs it held before read the same.
- ``table.csv``: the columns added since it was recorded are appended (``ttft_mean_ms`` ... and the goodput
  columns ``good_requests`` ... ``over_capacity_note``); now every column is compared cell by cell,
  those that existed before with the values they had.
- ``envelope.md``: reordered so that the first screen answers the question: the envelope sentences, then a
  compact summary table (load, output tokens/s, p50 TTFT, p95 E2E, errors, attainment with its interval,
  verdict), then the run metadata (now under "Run"), then the detail as before. The method notes gained
  one line defining attainment and goodput (and how a search probe's window is cut). Goodput was then
  redefined as the throughput column's output rate times the good requests' share of the successful
  requests' output tokens (it had been a second count over the window), so its two columns moved.

With the cost plan: ``envelope.md`` gained a "Cost and capacity" section after "Run"; this run has no
price, so it is the one line that says how to give one, and nothing else changed.

With the second engine: ``envelope.md`` gained a "Server capabilities" section after "Run"; this run was
recorded before the capability probe, so it names the engine (the simulator's vLLM version) and says the
requests assumed a vLLM server, and nothing else changed.

Columns renamed since then are mapped in ``RENAMED`` (old name -> new name); a column dropped
because another one already said the same is mapped to that one, so its values are still checked.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
RUN = FIXTURES / "golden_run"
EXPECTED = FIXTURES / "golden_expected"

# old column -> the column that carries the same value now
RENAMED: dict[str, str] = {
    "samples": "ok_requests",  # it counted successful requests in the window: ok_requests says so
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from analysis.load import load_run
    from analysis.report import summary_lines, write_report
    from analysis.table import envelope_table

    run_dir = tmp_path_factory.mktemp("golden") / "golden_run"
    shutil.copytree(RUN, run_dir)
    run = load_run(run_dir)
    rows = envelope_table(run)
    out = run_dir / "report"
    write_report(run, out, rows=rows)
    return out, summary_lines(run, rows)


def _csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_table_csv_is_identical_cell_by_cell(report):
    out, _ = report
    expected = _csv_rows((EXPECTED / "table.csv").read_text(encoding="utf-8"))
    got = _csv_rows((out / "table.csv").read_text(encoding="utf-8"))
    assert len(got) == len(expected) == 3
    for i, (old, new) in enumerate(zip(expected, got)):
        for column, value in old.items():
            now = RENAMED.get(column, column)
            assert now in new, f"row {i}: column {column!r} (now {now!r}) is gone from table.csv"
            assert new[now] == value, f"row {i}, column {column!r}: {new[now]!r} != {value!r}"


def test_markdown_table_and_report_are_identical(report):
    out, _ = report
    assert (out / "table.md").read_text(encoding="utf-8") == (EXPECTED / "table.md").read_text(encoding="utf-8")
    assert (out / "envelope.md").read_text(encoding="utf-8") == (
        EXPECTED / "envelope.md").read_text(encoding="utf-8")
    assert (out / "failures.csv").read_text(encoding="utf-8") == (
        EXPECTED / "failures.csv").read_text(encoding="utf-8")


def test_terminal_summary_is_identical(report):
    _, lines = report
    assert lines == (EXPECTED / "summary.txt").read_text(encoding="utf-8").splitlines()


def test_html_carries_every_table_cell_and_embeds_its_graphs(report):
    """The HTML says what the Markdown says (same cells) and works offline (graphs inline, no links out)."""
    out, _ = report
    import html as html_mod

    page = html_mod.unescape((out / "envelope.html").read_text(encoding="utf-8"))
    table_md = (EXPECTED / "table.md").read_text(encoding="utf-8").splitlines()
    for line in table_md[2:]:
        for cell in (c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")):
            assert cell in page, f"table cell {cell!r} missing from envelope.html"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 5
    assert page.count("data:image/png;base64,") == len(pngs)
    assert not re.search(r"""(src|href)=["']https?://""", page), "the page must not load anything from the network"
