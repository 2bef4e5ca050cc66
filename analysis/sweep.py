"""The sweep report: one table and one graph over a sweep's configurations.

For every configuration (a run directory under the sweep directory, listed in
``sweep.json``; see :mod:`envelope.sweep`) and every workload (a pass with SLOs;
the search passes when the scenario has any), the row gives the boundary with
its interval (the highest level that met the SLOs and the lowest that did not,
from :mod:`analysis.boundary`), the output throughput and the cost there, and
what broke first and why. A configuration that did not start or failed is
listed with its reason and its server log's last lines. For each workload the
best configuration is named: the highest level that passed, ties broken by
throughput there; when its bracket overlaps the next best's, the report says the
two are not told apart by this measurement. With a price, every configuration
is also planned for one common target (``--target-users``/``--target-rate``, else
10x the highest boundary of the sweep): how many boxes and what they cost a month.

Writes ``sweep.md``, ``sweep.html`` (graph embedded), ``sweep.png`` and
``sweep-table.csv`` into the sweep directory; returns a :class:`SweepSummary`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from analysis.boundary import PassBoundary, pass_boundaries, row_level
from analysis.common import finite, plain_number
from analysis.cost import CapacityPlan
from analysis.costing import ok_requests_per_s, run_price
from envelope.sweep import SweepEntry, read_sweep

__all__ = ["SweepCell", "SweepRow", "CurvePoint", "BestChoice", "SweepPlan", "SweepSummary", "sweep_rows",
           "best_choices", "sweep_plans", "write_sweep_report", "SWEEP_GRAPH", "ENVELOPES_GRAPH"]

SWEEP_GRAPH = "sweep.png"
ENVELOPES_GRAPH = "sweep_envelopes.png"


@dataclass(frozen=True, slots=True, kw_only=True)
class CurvePoint:
    """One tested load level of one configuration's workload: the envelope's curve, point by point."""

    level: float
    unit: str
    output_tokens_per_s: float | None
    ttft_p95_ms: float | None
    tpot_p95_ms: float | None
    slo_pass: bool | None
    requests: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepCell:
    """One configuration's result for one workload (pass)."""

    pass_name: str
    kind: str  # search | stages
    unit: str
    passed_level: float | None
    failed_level: float | None
    status: str
    output_tokens_per_s: float | None  # at the passed level (its stage's window)
    usd_per_million_output_tokens: float | None  # at the passed level, when the run has a price
    usd_per_hour: float | None = None  # the run's price, for the sweep's common capacity plan
    broke_first: str | None
    cause: str | None
    flagged: bool  # the boundary rests on a stage flagged NOT TRUSTWORTHY


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepRow:
    """One configuration: how its run ended and its cells by pass name."""

    label: str
    settings: dict[str, Any]
    host: str | None
    run_dir: str
    status: str
    failure: str | None
    log_tail: str | None
    cells: dict[str, SweepCell] = field(default_factory=dict)
    price_source: str | None = None
    # every tested level per workload, in load order (a level probed twice: the probe with more requests)
    curves: dict[str, tuple[CurvePoint, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class BestChoice:
    """The configuration with the largest envelope for one workload."""

    pass_name: str
    label: str | None  # None when no configuration passed any level
    passed_level: float | None
    unit: str
    runner_up: str | None
    clear: bool  # the runner-up failed at or below the level the best passed: told apart by the measurement
    sentence: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepSummary:
    rows: tuple[SweepRow, ...]
    workloads: tuple[str, ...]
    best: tuple[BestChoice, ...]
    plans: tuple["SweepPlan", ...]
    text: str  # what the terminal shows


def _level(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    return f"{plain_number(v)} {('user' if v == 1 else 'users') if unit == 'users' else 'req/s'}"


def _cell(b: PassBoundary, price: Any) -> SweepCell:
    row = b.safe_row
    tps = row.throughput.aggregate_output_tokens_per_s if row is not None else None
    usd = None
    if price is not None and row is not None:
        from analysis.cost import stage_cost

        cost = stage_cost(price, output_tokens_per_s=tps, requests_per_s=ok_requests_per_s(row))
        usd = cost.usd_per_million_output_tokens if cost is not None else None
    flagged = any(r is not None and r.trust.trustworthy is False for r in (b.safe_row, b.fail_row))
    return SweepCell(pass_name=b.pass_name, kind=b.kind, unit=b.unit, passed_level=b.passed_level,
                     failed_level=b.failed_level, status=b.status,
                     output_tokens_per_s=float(tps) if finite(tps) else None,
                     usd_per_million_output_tokens=usd, broke_first=b.broke_first, cause=b.cause, flagged=flagged,
                     usd_per_hour=price.usd_per_hour if price is not None else None)


def _row(sweep_dir: Path, e: SweepEntry) -> SweepRow:
    common = dict(label=e.label, settings=dict(e.settings), host=e.host, run_dir=e.run_dir, failure=e.failure,
                  log_tail=e.log_tail)
    run_dir = sweep_dir / e.run_dir
    if e.status in ("failed_to_start", "pending", "not_run", "running") or not run_dir.is_dir():
        return SweepRow(status=e.status, **common)
    from analysis.load import RunDirError, load_run
    from analysis.search import search_findings
    from analysis.table import envelope_table

    try:
        run = load_run(run_dir)
    except RunDirError as exc:
        return SweepRow(status="failed", **{**common, "failure": e.failure or str(exc)})
    if run.frame.empty:
        return SweepRow(status=e.status, **{**common, "failure": e.failure or "no requests were recorded"})
    rows = envelope_table(run)
    price = run_price(run)
    cells = {b.pass_name: _cell(b, price) for b in pass_boundaries(rows, search_findings(rows, run.searches))}
    return SweepRow(status=e.status, cells=cells, price_source=price.source if price is not None else None,
                    curves=_curves(rows), **common)


def _curves(rows: Sequence[Any]) -> dict[str, tuple[CurvePoint, ...]]:
    best: dict[tuple[str, float], CurvePoint] = {}
    for r in rows:
        level, unit = row_level(r)
        if level is None or r.trust.server_stopped:
            continue
        point = CurvePoint(level=level, unit=unit, output_tokens_per_s=_number(r.throughput.aggregate_output_tokens_per_s),
                           ttft_p95_ms=_number(r.latency.ttft_p95_ms), tpot_p95_ms=_number(r.latency.tpot_p95_ms),
                           slo_pass=r.slo.slo_pass, requests=int(r.counts.requests))
        key = (r.pass_name, level)
        if key not in best or point.requests > best[key].requests:
            best[key] = point
    out: dict[str, list[CurvePoint]] = {}
    for (name, _), point in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        out.setdefault(name, []).append(point)
    return {name: tuple(points) for name, points in out.items()}


def sweep_rows(sweep_dir: str | Path) -> tuple[dict[str, Any], list[SweepRow]]:
    """``sweep.json``'s fields and one :class:`SweepRow` per configuration, in sweep order."""
    root = Path(sweep_dir)
    doc, entries = read_sweep(root)
    return doc, [_row(root, e) for e in entries]


def _workloads(rows: Sequence[SweepRow]) -> list[str]:
    names: list[str] = []
    cells = [c for r in rows for c in r.cells.values()]
    searched = any(c.kind == "search" for c in cells)
    for c in cells:
        if searched and c.kind != "search":
            continue
        if c.status in ("no_slos", "no_data", "server_stopped", "empty"):
            continue
        if c.pass_name not in names:
            names.append(c.pass_name)
    return names


def best_choices(rows: Sequence[SweepRow], workloads: Sequence[str]) -> list[BestChoice]:
    """Per workload the configuration that passed the highest level (ties: more output tokens/s there)."""
    out = []
    for name in workloads:
        ranked = []
        for r in rows:
            c = r.cells.get(name)
            if c is not None and c.passed_level is not None:
                ranked.append((c.passed_level, c.output_tokens_per_s or 0.0, r, c))
        unit = next((r.cells[name].unit for r in rows if name in r.cells), "users")
        if not ranked:
            out.append(BestChoice(pass_name=name, label=None, passed_level=None, unit=unit, runner_up=None,
                                  clear=False, sentence=f"{name}: no configuration met the SLOs at any tested level."))
            continue
        ranked.sort(key=lambda t: (t[0], t[1]), reverse=True)
        level, _, best, cell = ranked[0]
        runner = ranked[1] if len(ranked) > 1 else None
        # every other configuration that started: the best is clear of each one that failed at or below its level
        others = [r.cells.get(name) for r in rows if r is not best and r.cells.get(name) is not None]
        close = [r for r in rows if r is not best and (c := r.cells.get(name)) is not None
                 and not (c.failed_level is not None and c.failed_level <= level)]
        clear = not close
        head = (f"{name}: best is {best.label}, meeting the SLOs up to {_level(level, cell.unit)}"
                + (f" (failed at {_level(cell.failed_level, cell.unit)})" if cell.failed_level is not None
                   else " (no tested level failed)"))
        if clear and others:
            tail = " Every other configuration failed at or below that level."
        elif not others:
            tail = " No other configuration has a result for this workload."
        else:
            names = ", ".join(r.label for r in close)
            tail = (f" Not told apart from {names}: their brackets overlap with this one's, so a finer search or "
                    f"more requests per level would be needed to rank them.")
        if cell.flagged:
            tail += " Caution: this rests on a stage flagged NOT TRUSTWORTHY."
        out.append(BestChoice(pass_name=name, label=best.label, passed_level=level, unit=cell.unit,
                              runner_up=runner[2].label if runner else None, clear=clear, sentence=head + "." + tail))
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepPlan:
    """One workload's capacity plan for every configuration, at one common target.

    ``target``: ``--target-users``/``--target-rate`` of the sweep, else 10x the highest boundary any
    configuration reached; ``plans``: by configuration label, None where it has no boundary or no price.
    """

    pass_name: str
    unit: str
    target: float
    target_source: str
    plans: dict[str, CapacityPlan | None]
    sentence: str


def sweep_plans(rows: Sequence[SweepRow], workloads: Sequence[str], *, target_users: float | None = None,
                target_rate_per_s: float | None = None) -> list[SweepPlan]:
    """Per workload, how many boxes each configuration needs for the same target, and what they cost."""
    from analysis.cost import DEFAULT_TARGET_MULTIPLE, Price, capacity_plan, format_usd

    out = []
    for name in workloads:
        cells = [(r, r.cells[name]) for r in rows if name in r.cells]
        priced = [(r, c) for r, c in cells if c.passed_level is not None and c.usd_per_hour is not None]
        if not priced:
            continue
        unit = priced[0][1].unit
        given = target_users if unit == "users" else target_rate_per_s
        if given is not None:
            target = float(given)
            source = f"--target-{'users' if unit == 'users' else 'rate'} {plain_number(target)}"
        else:
            target = DEFAULT_TARGET_MULTIPLE * max(c.passed_level for _, c in priced)
            source = f"default: {DEFAULT_TARGET_MULTIPLE:g}x the highest boundary of the sweep"
        plans: dict[str, CapacityPlan | None] = {}
        for r, c in cells:
            plan = None
            if c.passed_level is not None and c.usd_per_hour is not None:
                high = c.failed_level if c.failed_level is not None and c.failed_level > c.passed_level else None
                plan = capacity_plan(Price(usd_per_hour=c.usd_per_hour, source=r.price_source or "?"),
                                     per_box=c.passed_level, per_box_high=high, unit=unit, target=target,
                                     target_source=source)
            plans[r.label] = plan
        made = sorted(((p.usd_per_month, label, p) for label, p in plans.items() if p is not None),
                      key=lambda t: (t[0], t[1]))
        amount = f"{plain_number(target)} {'concurrent users' if unit == 'users' else 'requests/s'}"
        parts = [f"{label} needs {p.boxes} {'box' if p.boxes == 1 else 'boxes'} ({format_usd(p.usd_per_month)} a month)"
                 for _, label, p in made]
        sentence = f"{name}: to serve {amount} ({source}), " + ", ".join(parts) + "."
        out.append(SweepPlan(pass_name=name, unit=unit, target=target, target_source=source, plans=plans,
                             sentence=sentence))
    return out


def _bracket_text(c: SweepCell | None) -> str:
    if c is None:
        return "-"
    if c.passed_level is None and c.failed_level is None:
        return f"({c.status})"
    if c.passed_level is None:
        # a search's lower levels may be unresolved, not failed; fixed stages have no such third verdict
        why = "none passed with confidence" if c.kind == "search" else "failed at the lowest"
        return f"below {_level(c.failed_level, c.unit)} ({why})"
    if c.failed_level is None:
        return f"≥ {_level(c.passed_level, c.unit)} (nothing failed)"
    return f"{_level(c.passed_level, c.unit)} [failed at {plain_number(c.failed_level)}]"


def _broke_text(c: SweepCell | None) -> str:
    if c is None or c.broke_first is None:
        return "-"
    return c.broke_first + (f" ({c.cause.replace('_', ' ')})" if c.cause and c.cause != "unknown" else "")


def _money(v: float | None) -> str:
    if v is None:
        return "-"
    from analysis.cost import format_usd

    return format_usd(v)


def _table(rows: Sequence[SweepRow], name: str, plan: SweepPlan | None = None) -> list[list[str]]:
    head = ["configuration", "run", "boundary [first failure]", "output tok/s there", "$ per 1M output tokens"]
    if plan is not None:
        head.append(f"boxes for {plain_number(plan.target)} {'users' if plan.unit == 'users' else 'req/s'}, $ a month")
    head.append("what broke first")
    out = [head]
    for r in rows:
        c = r.cells.get(name)
        boxes = []
        if plan is not None:
            p = plan.plans.get(r.label)
            boxes = ["-" if p is None else f"{p.boxes}, {_money(p.usd_per_month)}"]
        if c is None:
            out.append([r.label, r.status.replace("_", " "), "-", "-", "-", *boxes, r.failure or "-"])
            continue
        tps = "-" if c.output_tokens_per_s is None else f"{c.output_tokens_per_s:,.0f}"
        out.append([r.label, r.status.replace("_", " "), _bracket_text(c) + (" ⚠" if c.flagged else ""), tps,
                    _money(c.usd_per_million_output_tokens), *boxes, _broke_text(c)])
    return out


def _md(table: Sequence[Sequence[str]]) -> str:
    esc = [[str(x).replace("|", "\\|") for x in row] for row in table]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in esc[0]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in esc[1:]]
    return "\n".join(lines)


def _plain(table: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in table)


def _draw(axes: Any, rows: Sequence[SweepRow], workloads: Sequence[str]) -> None:
    """Top row: each configuration's bracket per workload; bottom row: output tokens/s at the boundary."""
    n = len(workloads)
    labels = [r.label for r in rows]
    xs = list(range(len(rows)))
    for j, name in enumerate(workloads):
        top, bottom = axes[j], axes[n + j]
        unit = "users"
        seen: set[str] = set()

        def once(label: str) -> str | None:
            if label in seen:
                return None
            seen.add(label)
            return label

        for x, r in zip(xs, rows):
            c = r.cells.get(name)
            if c is None:
                top.annotate(r.status.replace("_", " "), (x, 0), ha="center", va="bottom", fontsize=7, rotation=90)
                continue
            unit = c.unit
            lo = c.passed_level if c.passed_level is not None else 0.0
            if c.failed_level is not None:
                top.vlines(x, lo, c.failed_level, colors="tab:orange", linewidth=8, alpha=0.45,
                           label=once("the boundary lies in here"))
                top.plot([x], [c.failed_level], marker="v", color="tab:red", linestyle="none",
                         label=once("lowest level that failed"))
            if c.passed_level is not None:
                top.plot([x], [c.passed_level], marker="o", color="tab:green", linestyle="none",
                         label=once("highest level that met the SLOs"))
                top.annotate(plain_number(c.passed_level), (x, c.passed_level), xytext=(6, -3),
                             textcoords="offset points", fontsize=8)
                if c.failed_level is None:
                    top.plot([x], [c.passed_level], marker="^", color="tab:green", markersize=10, alpha=0.5,
                             linestyle="none", label=once("nothing failed: the limit is higher"))
            if c.output_tokens_per_s is not None:
                bottom.bar([x], [c.output_tokens_per_s], color="tab:blue", alpha=0.7, width=0.5)
                bottom.annotate(f"{c.output_tokens_per_s:,.0f}", (x, c.output_tokens_per_s), xytext=(0, 2),
                                textcoords="offset points", ha="center", fontsize=8)
        top.set_title(f"{name}: boundary per configuration", fontsize=9)
        top.set_ylabel("concurrent users" if unit == "users" else "requests/s")
        top.set_ylim(bottom=0, top=top.get_ylim()[1] * 1.1)
        top.grid(True, axis="y", alpha=0.3)
        if seen:
            top.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        bottom.set_title("output tokens/s at the boundary", fontsize=9)
        bottom.set_ylabel("tokens/s")
        bottom.grid(True, axis="y", alpha=0.3)
        for ax in (top, bottom):
            ax.set_xticks(xs)
            ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=7)
            ax.set_xlim(-0.6, len(rows) - 0.4)


def _draw_envelopes(axes: Any, rows: Sequence[SweepRow], workloads: Sequence[str]) -> None:
    """Every configuration's envelope on one set of axes per workload: output tokens/s (top), p95 TTFT
    and p95 TPOT (below) against the load; a filled marker met the SLOs, a cross did not."""
    import matplotlib

    n = len(workloads)
    colors = matplotlib.colormaps["tab10"]
    for j, name in enumerate(workloads):
        tp, ttft, tpot = axes[j], axes[n + j], axes[2 * n + j]
        unit = "users"
        for i, r in enumerate(rows):
            points = r.curves.get(name) or ()
            if not points:
                continue
            unit = points[0].unit
            color = colors(i % 10)
            xs = [p.level for p in points]
            for ax, values in ((tp, [p.output_tokens_per_s for p in points]),
                               (ttft, [p.ttft_p95_ms for p in points]), (tpot, [p.tpot_p95_ms for p in points])):
                pairs = [(x, v) for x, v in zip(xs, values) if v is not None]
                if not pairs:
                    continue
                ax.plot([x for x, _ in pairs], [v for _, v in pairs], color=color, alpha=0.8,
                        label=r.label if ax is tp else None)
                for p, (x, v) in zip([p for p, v in zip(points, values) if v is not None], pairs):
                    ax.plot([x], [v], color=color, linestyle="none",
                            marker="o" if p.slo_pass is not False else "x", markersize=6 if p.slo_pass else 7)
        tp.set_title(f"{name}: the envelopes on one set of axes (o met the SLOs, x did not)", fontsize=9)
        tp.set_ylabel("output tokens/s")
        ttft.set_ylabel("p95 TTFT (ms)")
        tpot.set_ylabel("p95 TPOT (ms)")
        for ax in (ttft, tpot):
            ax.set_yscale("log")
        for ax in (tp, ttft, tpot):
            ax.set_xscale("log", base=2)
            ax.grid(True, alpha=0.3, which="both")
        tpot.set_xlabel("concurrent users" if unit == "users" else "requests/s")
        if tp.get_legend_handles_labels()[0]:
            tp.legend(fontsize=7, loc="upper left")


def write_sweep_report(sweep_dir: str | Path) -> SweepSummary:
    """Write the sweep report files into ``sweep_dir`` and return what they say."""
    from analysis import render
    from analysis.report import render_figure_png

    root = Path(sweep_dir)
    doc, rows = sweep_rows(root)
    workloads = _workloads(rows)
    best = best_choices(rows, workloads)
    options = doc.get("options") or {}
    plans = {p.pass_name: p for p in sweep_plans(rows, workloads, target_users=_positive(options.get("target_users")),
                                                 target_rate_per_s=_positive(options.get("target_rate")))}
    scenario = doc.get("scenario", "?")
    status = doc.get("status", "?")
    lines = [f"# Sweep: {scenario} over {len(rows)} server configurations", ""]
    if status != "complete":
        lines += [f"> This sweep is **{status}**: not every configuration ran to completion (see the table).", ""]
    profile = doc.get("profile")
    lines += [f"Scenario `{doc.get('scenario_path', scenario)}`"
              + (f", configurations made from profile `{profile}`" if profile else ", one running server each")
              + f". Each configuration's full report is in its run directory (`<run>/report/envelope.md`).", ""]
    if best:
        lines += ["## Best configuration", ""] + [f"- {b.sentence}" for b in best]
        lines += [f"- {p.sentence}" for p in plans.values()] + [""]
    elif not any(r.cells for r in rows):
        lines += ["No configuration recorded any requests, so there is no boundary to compare.", ""]
    else:
        lines += ["No configuration produced a boundary: the scenario's passes set no SLOs.", ""]
    lines += [f"![Boundary and throughput per configuration]({SWEEP_GRAPH})", ""] if workloads else []
    curves = any(r.curves for r in rows)
    lines += [f"![Every configuration's envelope on one set of axes]({ENVELOPES_GRAPH})", ""] if curves else []
    for name in workloads:
        lines += [f"## {name}", "", _md(_table(rows, name, plans.get(name))), ""]
    prices = sorted({r.price_source for r in rows if r.price_source})
    if prices:
        lines += [f"Cost at the boundary: price from {', '.join(prices)}; the formula is in each run's report. "
                  "Boxes: ceil(target / the configuration's boundary), each box run at its boundary, "
                  "x $/h x 730 h a month.", ""]
    elif workloads:
        lines += ["No price was given, so no cost: pass --usd-per-hour to `envelope sweep` (or set usd_per_hour "
                  "in the profile).", ""]
    lines += ["## Configurations", "", _md([["#", "configuration", "settings", "run directory", "status", "note"]]
              + [[str(i + 1), r.label, ", ".join(f"{k}={v}" for k, v in r.settings.items()) or (r.host or "-"),
                  f"`{r.run_dir}`", r.status.replace("_", " "), r.failure or "-"] for i, r in enumerate(rows)]), ""]
    for r in rows:
        if r.log_tail:
            lines += [f"### {r.label}: the server log's last lines", "", "```", r.log_tail, "```", ""]
    lines += ["Method: the boundary is the highest load that met every SLO (a search: with confidence, from its "
              "probes' attainment intervals; fixed stages: each stage's verdict) and the first failure the lowest "
              "load that did not. The best configuration is the one with the highest such load; two configurations "
              "are told apart only when the lower one failed at or below the level the higher one passed.", ""]
    document = "\n".join(lines)
    images: dict[str, bytes] = {}
    if workloads:
        png = render_figure_png(lambda axes: _draw(axes if isinstance(axes, list) else [axes], rows, workloads),
                                ncols=len(workloads), nrows=2, size_in=(max(8.0, 5.5 * len(workloads)), 7.0))
        (root / SWEEP_GRAPH).write_bytes(png)
        images[SWEEP_GRAPH] = png
    if workloads and curves:
        png = render_figure_png(lambda axes: _draw_envelopes(axes if isinstance(axes, list) else [axes], rows,
                                                             workloads),
                                ncols=len(workloads), nrows=3, size_in=(max(8.0, 6.0 * len(workloads)), 9.0),
                                sharex=True)
        (root / ENVELOPES_GRAPH).write_bytes(png)
        images[ENVELOPES_GRAPH] = png
    (root / "sweep.md").write_text(document, encoding="utf-8")
    (root / "sweep.html").write_text(render.markdown_page(document, title=f"Sweep: {scenario}", images=images),
                                     encoding="utf-8")
    with open(root / "sweep-table.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["configuration", "run_dir", "status", "workload", "unit", "passed_level", "failed_level",
                    "boundary_status", "output_tokens_per_s", "usd_per_million_output_tokens", "broke_first", "cause",
                    "plan_target", "plan_boxes", "plan_usd_per_month"])
        for r in rows:
            for name in workloads or [""]:
                c = r.cells.get(name)
                sp = plans.get(name)
                p = sp.plans.get(r.label) if sp is not None else None
                w.writerow([r.label, r.run_dir, r.status, name] + ([""] * 8 if c is None else [
                    c.unit, _num(c.passed_level), _num(c.failed_level), c.status, _num(c.output_tokens_per_s),
                    _num(c.usd_per_million_output_tokens), c.broke_first or "", c.cause or ""])
                    + ([_num(sp.target) if sp else "", "", ""] if p is None else
                       [_num(sp.target), str(p.boxes), _num(p.usd_per_month)]))
    text = [f"Sweep of {scenario}: {len(rows)} configurations ({status})."]
    for name in workloads:
        text += ["", _plain(_table(rows, name, plans.get(name)))]
    text += [""] + [b.sentence for b in best] + [p.sentence for p in plans.values()]
    failed = [r for r in rows if r.status in ("failed_to_start", "failed")]
    for r in failed:
        text.append(f"{r.label}: {r.status.replace('_', ' ')}" + (f": {r.failure}" if r.failure else ""))
    return SweepSummary(rows=tuple(rows), workloads=tuple(workloads), best=tuple(best),
                        plans=tuple(plans.values()), text="\n".join(text))


def _number(v: Any) -> float | None:
    return float(v) if finite(v) else None


def _positive(v: Any) -> float | None:
    return float(v) if finite(v) and v > 0 else None


def _num(v: float | None) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:g}"
