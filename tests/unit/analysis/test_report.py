"""envelope.html is envelope.md rendered: one source, a self-contained page, and the few marks its CSS styles."""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path

import pytest

from analysis.render import Marks, markdown_page

RUN = Path(__file__).resolve().parents[2] / "fixtures" / "golden_run"
PNG = b"\x89PNG\r\n\x1a\n-not-really-a-png"


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    from analysis.load import load_run
    from analysis.report import write_report

    run_dir = tmp_path_factory.mktemp("report") / "golden_run"
    shutil.copytree(RUN, run_dir)
    out = run_dir / "report"
    write_report(load_run(run_dir), out)
    return (out / "envelope.md").read_text(encoding="utf-8"), (out / "envelope.html").read_text(encoding="utf-8")


def _page_text(page: str) -> str:
    """The text a reader sees in the page's body, tags dropped, whitespace collapsed."""
    body = re.sub(r"</?(strong|em|code)>", "", page.split("<body>", 1)[1])  # inline: no word break
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


def _plain(markdown_line: str) -> str:
    """The text of one Markdown line of the report: its list, quote and bold markers and backticks dropped."""
    text = re.sub(r"^(- |> )", "", markdown_line).replace("**", "").replace("`", "")
    return " ".join(html.unescape(text).split())


def _cells(table_line: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", table_line.strip())[1:-1]]


def test_the_page_says_what_the_markdown_says_in_the_same_order(golden):
    md, page = golden
    assert re.findall(r"^# (.*)$", md, re.M) == re.findall(r"<h1>(.*?)</h1>", page)
    headings = re.findall(r"^## (.*)$", md, re.M)
    assert len(headings) >= 10
    assert headings == [html.unescape(h) for h in re.findall(r"<h2>(.*?)</h2>", page)]

    text = _page_text(page)
    at = 0
    checked = 0
    for line in md.splitlines():
        if not line.strip() or line.startswith("#") or re.fullmatch(r"\|(---\|)+", line):
            continue
        if line.startswith("!["):  # a graph: its title is the figure's caption
            pieces = [re.match(r"!\[(.*)\]\((.*)\)$", line).group(1)]
        elif line.startswith("|"):
            pieces = _cells(line)
        else:
            pieces = [_plain(line)]
        for piece in (p for p in pieces if p):
            found = text.find(piece, at)
            assert found >= 0, f"{piece!r} (from envelope.md: {line!r}) is not in envelope.html after {text[at:at + 80]!r}"
            at = found + len(piece)
            checked += 1
    assert checked > 150


def test_the_page_embeds_every_graph_and_loads_nothing(golden):
    md, page = golden
    graphs = re.findall(r"^!\[(.*)\]\((.*\.png)\)$", md, re.M)
    assert len(graphs) == 5
    assert re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,', page) == [title for title, _ in graphs]
    assert re.findall(r"<figcaption>(.*?)</figcaption>", page) == [title for title, _ in graphs]
    assert not re.search(r"""(src|href)=["'](?!data:image/png;base64,)""", page)
    assert "<link" not in page and "<script" not in page and "@import" not in page


def test_the_page_marks_sentences_and_failing_slo_cells(golden):
    md, page = golden
    envelope = md.split("## Envelope\n", 1)[1].split("\n## ", 1)[0]
    paragraphs = [p for p in envelope.split("\n\n") if p.strip()]
    assert len(paragraphs) == 3  # chat, open, what broke first
    assert page.count('<p class="sentence">') == len(paragraphs)
    assert '<p class="sentence"><strong>chat</strong>: No tested concurrency' in page

    table = md.split("## Table\n", 1)[1].strip().split("\n\n", 1)[0].splitlines()
    slo = _cells(table[0]).index("SLOs")
    verdicts = [_cells(line)[slo] for line in table[2:]]
    assert verdicts == ["FAIL", "FAIL", "pass"]
    assert page.count('<td class="fail">FAIL</td>') == 2 and page.count('class="fail"') == 2
    # one row per line, cells side by side
    assert re.search(r"<tr><td>chat</td><td>chat-1u</td><td>1</td>.*<td class=\"fail\">FAIL</td>.*</tr>\n", page)


def test_markdown_page_marks_by_position():
    text = "\n".join([
        "# Title",
        "",
        '> **Partial run. It said "running".**',
        "",
        "## Verdict",
        "",
        "**a**: first sentence",
        "",
        "## Numbers",
        "",
        "plain paragraph",
        "",
        "| stage | SLOs |",
        "|---|---|",
        "| one | FAIL |",
        "| two | not judged: server stopped |",
        "| three | pass |",
        "",
        "| other | SLOs |",
        "|---|---|",
        "| x | FAIL |",
        "",
        "## Graphs",
        "",
        "![A graph](a_graph.png)",
        "",
    ])
    page = markdown_page(text, title='Run "x" <y>', images={"a_graph.png": PNG},
                         marks=Marks(sentence_sections=("Verdict",), fail_cell=("Numbers", "SLOs", "FAIL")))
    assert "<title>Run &quot;x&quot; &lt;y&gt;</title>" in page
    assert '<p class="banner">Partial run. It said &quot;running&quot;.</p>' in page
    assert "<blockquote>" not in page
    assert '<p class="sentence"><strong>a</strong>: first sentence</p>' in page
    assert "<p>plain paragraph</p>" in page
    # only the SLO column, only an exact FAIL; both tables sit under "Numbers"
    assert "<tr><td>one</td><td class=\"fail\">FAIL</td></tr>" in page
    assert "<tr><td>two</td><td>not judged: server stopped</td></tr>" in page
    assert "<tr><td>x</td><td class=\"fail\">FAIL</td></tr>" in page
    assert page.count('class="fail"') == 2
    data = "data:image/png;base64,iVBORw0KGgotbm90LXJlYWxseS1hLXBuZw=="
    assert f'<figure><img alt="A graph" src="{data}"><figcaption>A graph</figcaption></figure>' in page
    assert "<p><figure>" not in page


def test_a_bold_banner_word_keeps_its_bold():
    page = markdown_page("> **a** b **c**\n", title="t", images={})
    assert '<p class="banner"><strong>a</strong> b <strong>c</strong></p>' in page


def test_markdown_page_shows_links_and_html_as_written():
    text = "see [docs](http://example.com) <http://example.org> http://127.0.0.1:8000 <b>bold</b> &lt;i&gt;\n"
    page = markdown_page(text, title="t", images={})
    assert "href" not in page and "<b>" not in page
    assert ("<p>see [docs](http://example.com) &lt;http://example.org&gt; http://127.0.0.1:8000 "
            "&lt;b&gt;bold&lt;/b&gt; &lt;i&gt;</p>") in page


def test_an_image_without_its_png_is_an_error():
    with pytest.raises(KeyError):
        markdown_page("![x](missing.png)\n", title="t", images={})


# --- Cost and capacity ---------------------------------------------------------------------------

def _cost_section(md: str) -> str:
    return md.split("## Cost and capacity\n", 1)[1].split("\n## ", 1)[0]


def test_without_a_price_the_cost_section_says_how_to_get_one(golden):
    from analysis.costing import NO_PRICE_LINE

    md, _ = golden
    assert _cost_section(md).strip() == NO_PRICE_LINE
    assert "$" not in _cost_section(md)
    assert md.index("## Run") < md.index("## Cost and capacity") < md.index("## Table")


@pytest.fixture(scope="module")
def priced(tmp_path_factory):
    from analysis.cost import Price
    from analysis.load import load_run
    from analysis.report import write_report

    run_dir = tmp_path_factory.mktemp("priced") / "golden_run"
    shutil.copytree(RUN, run_dir)
    out = run_dir / "report"
    write_report(load_run(run_dir), out, price=Price(usd_per_hour=2.5, source="--usd-per-hour"), power_w=400.0,
                 target_rate_per_s=20.0)
    return (out / "envelope.md").read_text(encoding="utf-8"), (out / "envelope.html").read_text(encoding="utf-8")


def test_priced_cost_section_has_plan_table_and_formulas(priced):
    md, page = priced
    section = _cost_section(md)
    assert "Price: $2.50/h per box (--usd-per-hour). Stated power: 400 W (--power-w" in section
    # open: 8 requests/s per box, target 20/s -> ceil(2.5) = 3 boxes, 20% headroom, 3 x $2.50 x 730 h = $5,475
    assert ("**open**: To serve 20 requests/s at these SLOs you need 3 boxes (8 requests/s each at the tested "
            "boundary, 20% headroom): $5,475 a month at $2.50/h (730 h).") in section
    assert "**chat**: no plan (no boundary: no level met the SLOs)." in section
    header = next(line for line in section.splitlines() if line.startswith("| pass |"))
    assert _cells(header) == ["pass", "stage", "load", "out tok/s", "ok req/s", "$ per 1M output tokens",
                              "$ per request", "J per output token"]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| pass |")]
    assert len(rows) == 3 and all(_cells(r)[-1].endswith("(stated)") for r in rows)
    formulas = [line for line in section.splitlines() if line.startswith("- ")]
    assert any(line.startswith("- open / open-8rps: ") and "successful requests / " in line
               and "$2.50/h / 3600 s/h / " in line and "stated, not measured: --power-w" in line for line in formulas)
    plan = "- open plan: boxes = ceil(20 requests/s / 8 requests/s per box) = 3"
    assert any(line.startswith(plan) for line in formulas)
    assert "$5,475 a month" in _page_text(page)
