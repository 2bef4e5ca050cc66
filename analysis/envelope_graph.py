"""The envelope graph of a search pass: where the server meets its SLOs, where it bends, where it is over.

:func:`plot_envelope` draws on three Axes it is given (sharing x: the level, users or requests/s):

1. p95 latency of each probe (TTFT, and TPOT or E2E where that metric has a threshold), one point per
   probe and a line through the mean of the probes at each level, the per-request thresholds as
   dashed lines;
2. aggregate and goodput output tokens/s, the same way, with the knee marked;
3. attainment of each level (its probes pooled) with its Wilson interval as error bars, and the target.

Every panel is shaded: *safe* up to the highest level that passed, *bending* between it and the
lowest level that failed, *over* from there on. The title names the workload and the SLOs, so the
picture explains itself. Nothing here opens a figure or picks a backend.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from analysis import envelope as env
from analysis.common import finite
from analysis.rows import TableRow
from analysis.search import SearchFinding

__all__ = ["plot_envelope", "envelope_title", "PROBE_LABEL", "ZONE_COLOURS"]

PROBE_LABEL = "probes"  # the gid of the per-probe p95 TTFT points (tests count them)
ZONE_COLOURS = {"safe": "#d8f0d8", "bending": "#fff2c4", "over": "#f8d6d6"}


def _level(row: TableRow, over: str) -> float:
    v = row.window.target_users if over == "users" else row.window.target_rate_per_s
    return float(v) if finite(v) else math.nan


def _means(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    """Mean of the finite ``ys`` at each distinct ``x``, sorted by x (the line through pooled levels)."""
    sums: dict[float, list[float]] = {}
    for x, y in zip(xs, ys):
        if finite(x) and finite(y):
            sums.setdefault(x, []).append(y)
    keys = sorted(sums)
    return keys, [sum(sums[k]) / len(sums[k]) for k in keys]


def envelope_title(finding: SearchFinding) -> str:
    """``find: ~32-token prompts, 32 output tokens; SLOs TTFT <= 100 ms for >= 95% of requests``."""
    pf = env.find_envelope(finding.rows, pass_name=finding.pass_name)
    work = []
    if pf.prompt_tokens is not None:
        work.append(f"~{pf.prompt_tokens:.0f}-token prompts")
    if pf.output_tokens is not None:
        work.append(f"{pf.output_tokens:.0f} output tokens")
    slos = finding.thresholds.describe() or "no latency thresholds"
    return (f"Envelope of {finding.pass_name or 'the search'}: {', '.join(work) or 'workload unknown'}\n"
            f"SLOs {slos} for >= {finding.target * 100:g}% of requests")


def _zones(ax: Any, finding: SearchFinding, lo: float, hi: float, *, labelled: bool) -> None:
    hp, lf = finding.bracket.highest_pass, finding.bracket.lowest_fail

    def label(text: str) -> str | None:
        return text if labelled else None

    if hp is not None:
        ax.axvspan(lo, hp, color=ZONE_COLOURS["safe"], zorder=0, label=label("safe (passed)"))
    if hp is not None and lf is not None:
        ax.axvspan(hp, lf, color=ZONE_COLOURS["bending"], zorder=0, label=label("bending (the limit is here)"))
    if lf is not None:
        ax.axvspan(lf, hi, color=ZONE_COLOURS["over"], zorder=0, label=label("over (failed)"))


def plot_envelope(axes: Sequence[Any], finding: SearchFinding) -> None:
    """Draw the envelope of ``finding`` on ``axes`` (three, sharing x; see the module docstring)."""
    ax_lat, ax_tps, ax_att = axes[0], axes[1], axes[2]
    over, unit = finding.over, finding.unit
    rows = finding.rows
    xs = [_level(r, over) for r in rows]
    finite_xs = [x for x in xs if finite(x)] or [1.0]
    span = max(finite_xs) - min(finite_xs) or max(finite_xs)
    lo, hi = max(0.0, min(finite_xs) - 0.08 * span), max(finite_xs) + 0.08 * span
    for ax in axes[:3]:
        _zones(ax, finding, lo, hi, labelled=ax is ax_att)
        ax.set_xlim(lo, hi)
        ax.grid(True, alpha=0.3)

    t = finding.thresholds
    metrics = [("ttft", t.ttft_ms, "tab:red")]
    if t.tpot_ms is not None or t.e2e_ms is None:
        metrics.append(("tpot", t.tpot_ms, "tab:blue"))
    if t.e2e_ms is not None:
        metrics.append(("e2e", t.e2e_ms, "tab:purple"))
    for metric, limit, colour in metrics:
        name = metric.upper()
        ys = [r.value(f"{metric}_p95_ms") for r in rows]
        pts = [(x, y) for x, y in zip(xs, ys) if finite(x) and finite(y)]
        ax_lat.scatter([p[0] for p in pts], [p[1] for p in pts], color=colour, s=22, zorder=3,
                       gid=PROBE_LABEL if metric == "ttft" else None, label=f"p95 {name} per probe")
        lx, ly = _means(xs, ys)
        ax_lat.plot(lx, ly, color=colour, linewidth=1.2, zorder=2)
        if limit is not None:
            ax_lat.axhline(limit, color=colour, linestyle="--", linewidth=1, label=f"{name} threshold {limit:g} ms")
    if any(ax_lat.get_children()):
        ax_lat.set_yscale("log")
    ax_lat.set_ylabel("p95 latency (ms, log)")
    ax_lat.set_title(envelope_title(finding), fontsize="medium")
    ax_lat.legend(loc="upper left", fontsize="x-small", ncol=2)

    for column, label, colour in (("aggregate_output_tokens_per_s", "output tokens/s (all requests)", "tab:green"),
                                  ("goodput_output_tokens_per_s", "goodput output tokens/s (good requests)",
                                   "tab:olive")):
        ys = [r.value(column) for r in rows]
        pts = [(x, y) for x, y in zip(xs, ys) if finite(x) and finite(y)]
        ax_tps.scatter([p[0] for p in pts], [p[1] for p in pts], color=colour, s=22, zorder=3)
        lx, ly = _means(xs, ys)
        ax_tps.plot(lx, ly, color=colour, linewidth=1.2, zorder=2, label=label)
    knee = finding.knee
    if knee is not None:
        ax_tps.axvline(knee.level, color="0.3", linestyle=":", linewidth=1.2)
        ax_tps.annotate(f"knee: levels off at ~{knee.level:g} {unit}", (knee.level, knee.output_tokens_per_s),
                        xytext=(6, -14), textcoords="offset points", fontsize="x-small")
    ax_tps.set_ylabel("output tokens/s")
    ax_tps.set_ylim(bottom=0)
    ax_tps.legend(loc="lower right", fontsize="x-small")

    levels = finding.bracket.levels
    if levels:
        shares = [r.attainment.share * 100 if r.judged else math.nan for r in levels]
        low = [max(0.0, s - r.attainment.low * 100) if r.judged else 0.0 for s, r in zip(shares, levels)]
        high = [max(0.0, r.attainment.high * 100 - s) if r.judged else 0.0 for s, r in zip(shares, levels)]
        ax_att.errorbar([r.level for r in levels], shares, yerr=[low, high], fmt="o", color="black", capsize=4,
                        zorder=3, label=f"attainment, probes pooled ({levels[0].attainment.confidence * 100:g}% CI)")
    ax_att.axhline(finding.target * 100, color="tab:red", linestyle="--", linewidth=1,
                   label=f"target {finding.target * 100:g}%")
    hp, lf = finding.bracket.highest_pass, finding.bracket.lowest_fail
    if hp is not None and lf is not None:
        ax_att.annotate("", xy=(lf, 5), xytext=(hp, 5), arrowprops={"arrowstyle": "<->", "color": "0.2"})
        ax_att.text((hp + lf) / 2, 8, f"limit: {hp:g}-{lf:g} {unit}", ha="center", fontsize="x-small")
    ax_att.set_ylim(0, 105)
    ax_att.set_ylabel("good requests (%)")
    ax_att.set_xlabel("concurrent users" if over == "users" else "request rate (requests/s)")
    handles, labels = ax_att.get_legend_handles_labels()
    ax_att.legend(handles, labels, loc="lower left", fontsize="x-small")
