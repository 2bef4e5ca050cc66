"""Side-by-side comparison of two runs' envelope tables.

Stages are paired by pass name and load level (target users, else target rate,
else stage name); unpaired stages appear with one side empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import IO, Any, Sequence

from analysis.envelope import level_text
from analysis.rows import TableRow
from analysis.table import format_cell

__all__ = ["ComparedStage", "compare_rows", "write_compare_markdown", "plot_compare", "COMPARE_METRICS"]

COMPARE_METRICS: tuple[tuple[str, str], ...] = (
    ("aggregate_output_tokens_per_s", "out tok/s"),
    ("ttft_p50_ms", "TTFT p50 ms"),
    ("ttft_p95_ms", "TTFT p95 ms"),
    ("tpot_p50_ms", "TPOT p50 ms"),
    ("e2e_p95_ms", "E2E p95 ms"),
    ("error_rate", "error rate"),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ComparedStage:
    """One stage of run A paired with the same load in run B (either side None when unpaired).

    ``changes``: per column of :data:`COMPARE_METRICS`, (B - A) / A, or None when either side is missing.
    """

    pass_name: str
    level: str
    a: TableRow | None
    b: TableRow | None
    changes: dict[str, float | None] = field(default_factory=dict)


def _key(row: TableRow) -> tuple[str, str]:
    for k, v in (("target_users", row.window.target_users), ("target_rate_per_s", row.window.target_rate_per_s)):
        if v is not None:
            return row.pass_name, f"{k}={float(v):g}"
    return row.pass_name, f"stage={row.stage_name}"


def _cell(row: TableRow | None, column: str) -> Any:
    return None if row is None else row.value(column)


def compare_rows(a: Sequence[TableRow], b: Sequence[TableRow]) -> list[ComparedStage]:
    """Pair the rows of two tables by pass and load level, in order of first appearance."""
    keys: list[tuple[str, str]] = []
    by_a, by_b = {}, {}
    for rows, into in ((a, by_a), (b, by_b)):
        for r in rows:
            k = _key(r)
            into.setdefault(k, r)
            if k not in keys:
                keys.append(k)
    out = []
    for k in keys:
        ra, rb = by_a.get(k), by_b.get(k)
        changes: dict[str, float | None] = {}
        for col, _ in COMPARE_METRICS:
            va, vb = _cell(ra, col), _cell(rb, col)
            ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (va, vb))
            changes[col] = (vb - va) / va if ok and va else None
        out.append(ComparedStage(pass_name=k[0], level=level_text(ra or rb), a=ra, b=rb, changes=changes))
    return out


def write_compare_markdown(pairs: Sequence[ComparedStage], sink: IO[str], *, name_a: str, name_b: str,
                           sentences: tuple[str, str] | None = None) -> None:
    """Write the comparison as Markdown (A value, B value, relative change per metric)."""
    sink.write(f"# Comparison: A = {name_a}, B = {name_b}\n\n")
    if sentences:
        sink.write(f"- **A**: {sentences[0]}\n- **B**: {sentences[1]}\n\n")
    head = ["pass", "load"]
    for _, label in COMPARE_METRICS:
        head += [f"{label} A", f"{label} B", "change"]
    sink.write("| " + " | ".join(head) + " |\n|" + "|".join("---" for _ in head) + "|\n")
    for p in pairs:
        cells = [p.pass_name, p.level]
        for col, _ in COMPARE_METRICS:
            ch = p.changes.get(col)
            cells += [format_cell(col, _cell(p.a, col)), format_cell(col, _cell(p.b, col)),
                      "-" if ch is None else f"{100 * ch:+.1f}%"]
        sink.write("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |\n")
    sink.write("\nPercentiles are exact, from each run's per-request records.\n")


def plot_compare(axes: Sequence[Any], a: Sequence[TableRow], b: Sequence[TableRow], *,
                 name_a: str, name_b: str) -> None:
    """Throughput (``axes[0]``) and p95 TTFT (``axes[1]``) vs concurrency for both runs."""
    from analysis import plots

    plots.plot_throughput_vs_concurrency(axes[0], list(a), label_prefix=f"A {name_a} ")
    plots.plot_throughput_vs_concurrency(axes[0], list(b), label_prefix=f"B {name_b} ")
    axes[0].set_title("Aggregate output throughput: A vs B")
    for rows, tag in ((a, f"A {name_a} "), (b, f"B {name_b} ")):
        plots.plot_latency_vs_concurrency(axes[1], list(rows), "ttft", slos={}, label_prefix=tag)
    axes[1].set_title("TTFT percentiles: A vs B")
