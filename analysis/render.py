"""Render a Markdown document as one self-contained HTML page (the report's ``envelope.html``).

The report is written once, as Markdown (``envelope.md``, whose bytes are a recorded contract), and
the page is that same text rendered by markdown-it-py, so the two cannot say different things.
Jinja2 templates would have been a second description of every section, free to drift from the
first. CommonMark plus tables covers all the report writes; the rest is the page shell and the CSS.

Rendering choices, all for a page that works offline and shows the text as written:

- raw HTML in the text is not passed through (it shows as written, escaped);
- links, autolinks and link references are off: the report writes none, and a value that looks like
  one (a URL in the server's description) stays plain text, so the page never points at the network;
- every table sits in a ``div.scroll`` box that scrolls sideways, so a wide table stays readable on a
  laptop screen (~1280 px) without cutting off columns;
- an image names a PNG given to :func:`markdown_page` and is embedded as a ``data:`` URI, drawn as a
  figure with its alt text as caption.

What the page styles beyond plain Markdown is marked on the parsed tokens (see :class:`Marks`),
not written by a second builder.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

__all__ = ["Marks", "markdown_page", "PAGE_CSS"]

PAGE_CSS = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
    # a wide table scrolls inside its box instead of cutting off columns or widening the page
    ".scroll{overflow-x:auto;max-width:100%;margin:0.5em 0}.scroll table{margin:0}"
    "table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #ccc;padding:3px 6px;"
    "text-align:right}th{background:#eee}td.fail{color:#b00;font-weight:bold}img{max-width:100%}"
    ".sentence{font-size:1.1em;background:#f4f8ff;padding:0.6em;border-left:4px solid #36c}"
    ".banner{font-size:1.1em;background:#fff0f0;padding:0.6em;border-left:6px solid #b00;font-weight:bold}"
)

# Cells are written on one line per row (markdown-it puts every tag on its own line).
_INLINE_TABLE_TAGS = frozenset({"tr_open", "th_open", "th_close", "td_open", "td_close"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Marks:
    """Blocks the page styles with a CSS class, found by where they sit in the document.

    Always: a block quote is a banner, drawn as its paragraphs with class ``banner`` (the quote and a
    bold spanning its whole text are dropped: the class sets both).

    ``sentence_sections``: level-2 headings whose paragraphs get class ``sentence``.
    ``fail_cell``: ``(heading, column header, text)``: in a table under that level-2 heading, a cell
    of that column whose text is exactly ``text`` gets class ``fail``.
    """

    sentence_sections: tuple[str, ...] = ()
    fail_cell: tuple[str, str, str] | None = None


def markdown_page(markdown: str, *, title: str, images: Mapping[str, bytes], marks: Marks = Marks()) -> str:
    """``markdown`` as a complete HTML page titled ``title``.

    ``images``: PNG bytes by the file name the document's images use; each is embedded, so the page
    loads nothing. An image naming a file not given raises :class:`KeyError`.
    """
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table").disable(["link", "autolink", "reference"])
    pngs = {md.normalizeLink(name): png for name, png in images.items()}

    def figure(self: Any, tokens: Sequence[Any], idx: int, options: Any, env: Any) -> str:
        token = tokens[idx]
        alt = html.escape(self.renderInlineAsText(token.children or [], options, env))
        data = base64.b64encode(pngs[token.attrGet("src")]).decode("ascii")
        return (f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">'
                f"<figcaption>{alt}</figcaption></figure>\n")

    md.add_render_rule("image", figure)
    md.add_render_rule("table_open", lambda self, tokens, idx, options, env:
                       '<div class="scroll"><table>\n')
    md.add_render_rule("table_close", lambda self, tokens, idx, options, env: "</table></div>\n")
    tokens = md.parse(markdown)
    _mark(tokens, marks)
    body = md.renderer.render(tokens, md.options, {})
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n"
        f"<style>{PAGE_CSS}</style>\n"
        "</head><body>\n"
        f"{body}"
        "</body></html>\n"
    )


def _mark(tokens: Sequence[Any], marks: Marks) -> None:
    """Set the classes of :class:`Marks` on the block tokens, hide the wrappers the page does not draw,
    and keep each table row on one line."""
    section: str | None = None
    quotes = 0
    fail_column: int | None = None
    headers: list[str] = []
    column = 0
    for i, token in enumerate(tokens):
        kind = token.type
        if kind == "heading_open" and token.tag == "h2":
            section = tokens[i + 1].content
        elif kind in ("blockquote_open", "blockquote_close"):
            token.hidden = True
            quotes += 1 if kind == "blockquote_open" else -1
        elif kind == "paragraph_open" and not token.hidden:
            inline = tokens[i + 1]
            if quotes:
                token.attrSet("class", "banner")
                _unwrap_bold(inline)
            elif [k.type for k in _kids(inline)] == ["image"]:
                token.hidden = tokens[i + 2].hidden = True  # the figure stands alone, not inside a <p>
            elif section in marks.sentence_sections:
                token.attrSet("class", "sentence")
        elif kind == "table_open":
            headers, fail_column = [], None
        elif kind == "th_open":
            headers.append(tokens[i + 1].content)
        elif kind == "thead_close" and marks.fail_cell is not None and section == marks.fail_cell[0]:
            fail_column = headers.index(marks.fail_cell[1]) if marks.fail_cell[1] in headers else None
        elif kind == "tr_open":
            column = 0
        elif kind == "td_open":
            if column == fail_column and marks.fail_cell is not None and tokens[i + 1].content == marks.fail_cell[2]:
                token.attrSet("class", "fail")
            column += 1
        if kind in _INLINE_TABLE_TAGS:
            token.block = False


def _unwrap_bold(inline: Any) -> None:
    """Drop a bold that spans the whole of ``inline``'s text."""
    kids = _kids(inline)
    if len(kids) < 2 or kids[0].type != "strong_open" or kids[-1].type != "strong_close":
        return
    depth = 0
    for kid in kids[:-1]:
        depth += (kid.type == "strong_open") - (kid.type == "strong_close")
        if depth == 0:
            return  # the first bold closes before the end: "**a** b **c**"
    inline.children = kids[1:-1]


def _kids(inline: Any) -> list[Any]:
    """The children of an inline token, less the empty texts the parser leaves around markup."""
    return [k for k in inline.children or [] if k.type != "text" or k.content]
