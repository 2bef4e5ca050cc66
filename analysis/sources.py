"""The dataset and trace files a run drew from, as the report states them (``sources.json``).

An envelope holds only for traffic like the traffic it was measured with, so the report says what
that was: per file its entries, those skipped as too long for the server, and the token lengths of
the usable ones (see :class:`envelope.source_log.SourceEntry`). Pure functions; no file is read here.
"""

from __future__ import annotations

from typing import Sequence

from envelope.source_log import LengthSummary, SourceEntry

__all__ = ["SOURCE_COLUMNS", "SOURCES_NOTE", "source_table"]

SOURCE_COLUMNS = ("file", "kind", "format", "entries", "skipped (too long)", "prompt tokens p50 / p95 / max",
                  "output tokens p50 / p95 / max", "stages", "lengths")

SOURCES_NOTE = (
    "The envelope holds for traffic like this. Token lengths are of the entries that were usable (those "
    "skipped would not fit the server's max_model_len and were never sent), counted with the served model's "
    "tokenizer; \"estimated\" where the server could not count them (no /tokenize). Percentiles are nearest-rank."
)


def source_table(sources: Sequence[SourceEntry]) -> list[tuple[str, ...]]:
    """One row per source (header first)."""
    out = [SOURCE_COLUMNS]
    for s in sources:
        out.append((s.path, s.kind, s.format or "-", f"{s.entries:,}", f"{s.skipped_too_long:,}",
                    _lengths(s.prompt_tokens), _lengths(s.output_tokens), ", ".join(s.stages) or "-",
                    "exact" if s.exact else "estimated"))
    return out


def _lengths(summary: LengthSummary) -> str:
    if not summary.count:
        return "-"
    return " / ".join("?" if v is None else f"{v:,}" for v in (summary.p50, summary.p95, summary.max))
