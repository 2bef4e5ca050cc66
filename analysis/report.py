"""Write a run's report directory: table.csv/.md, PNG graphs, envelope.md and envelope.html.

The report is written once, as Markdown (:func:`_markdown`); envelope.html is that same document
rendered by :func:`analysis.render.markdown_page`, with the graphs embedded and a few blocks marked
for the page's CSS (:func:`_marks`: the partial-run banner, the envelope sentences, failing SLO
cells). Rendering the Markdown, rather than filling HTML templates, is what keeps the two from
drifting: there is no second description of a section to forget.

Figures are made with :class:`matplotlib.figure.Figure` and saved through the
Agg canvas, so no pyplot state or global backend is touched.
"""

from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from analysis import broke
from analysis import clients as cl
from analysis import envelope as env
from analysis import failures as fail
from analysis import plots
from analysis import render
from analysis import search_report as sr
from analysis import tokens
from analysis import workers as wk
from analysis import capabilities as capa
from analysis.boundary import pass_boundaries
from analysis.common import METRIC_NAMES, adaptive_percent, finite, grouped_number, percent, split_key
from analysis.cost import Price, format_amount, format_usd
from analysis.costing import NO_PRICE_LINE, RunCosts, run_costs
from analysis.envelope_json import envelope_document, write_envelope_json
from analysis.envelope_graph import plot_envelope
from analysis.search import SearchFinding, search_findings, workload_knees
from analysis.load import Completeness, completeness, run_start_unix_s
from analysis.rows import ClientRow, TableRow
from analysis.sources import SOURCES_NOTE, source_table
from analysis.table import (
    SERVER_STOPPED_CELL,
    WindowRule,
    client_table,
    envelope_table,
    format_cell,
    MARKDOWN_COLUMNS,
    slo_summary,
    table_totals,
    window_samples,
    write_client_csv,
    write_table_csv,
    write_table_markdown,
)
from analysis.turns import TurnRow, has_turns, turn_lines, turn_summary_table, turn_table, write_turns_csv

__all__ = ["write_report", "render_figure_png", "summary_lines", "summary_table", "envelope_graph_name",
           "DATA_NOTE", "SUMMARY_COLUMNS"]

DATA_NOTE = (
    "Percentiles are exact, computed from the per-request records with numpy's linear "
    "interpolation; no number here comes from Locust's CSV statistics, whose percentiles are rounded."
)


def render_figure_png(draw: Callable[[Any], None], *, ncols: int = 1, nrows: int = 1,
                      size_in: tuple[float, float] = (8.0, 4.5), sharex: bool = False) -> bytes:
    """Call ``draw(axes)`` on a fresh Agg figure and return it as PNG bytes (``sharex``: one x axis)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size_in, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=sharex).ravel().tolist()
    draw(axes if len(axes) > 1 else axes[0])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_report(run: Any, out_dir: str | Path, *, rule: WindowRule = WindowRule(),
                 rows: Sequence[TableRow] | None = None, price: Price | None = None,
                 power_w: float | None = None, target_users: float | None = None,
                 target_rate_per_s: float | None = None) -> dict[str, Path]:
    """Write the report files of ``run`` (an :class:`analysis.load.Run`) into ``out_dir``.

    Always table.csv/.md, failures.csv, the graphs, envelope.md, envelope.html and envelope.json;
    clients.csv when the records name more than one client class, turns.csv when they carry
    conversation turns.

    ``rows``: the envelope table already computed with the same ``rule`` (computed here when omitted).
    ``price``, ``power_w`` (the box's stated power draw), ``target_users`` and ``target_rate_per_s``
    (the capacity plan's targets) override what run.json and server.json give
    (see :func:`analysis.costing.run_costs`); ValueError for a power or target that is not positive.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = envelope_table(run, rule=rule) if rows is None else list(rows)
    totals = table_totals(run)
    findings = env.find_envelopes(rows)
    primary = env.find_envelope(rows) if rows else None
    if primary is not None:
        findings = [primary] + [f for f in findings if f.pass_name != primary.pass_name]
    searches = search_findings(rows, getattr(run, "searches", None) or [])
    boundaries = pass_boundaries(rows, searches)
    costs = run_costs(run, rows, boundaries, price=price, power_w=power_w, target_users=target_users,
                      target_rate_per_s=target_rate_per_s)
    written: dict[str, Path] = {}

    with open(out / "table.csv", "w", encoding="utf-8", newline="") as fh:
        write_table_csv(rows, fh)
    written["table.csv"] = out / "table.csv"
    md_table = io.StringIO()
    write_table_markdown(rows, md_table)
    (out / "table.md").write_text(md_table.getvalue(), encoding="utf-8")
    written["table.md"] = out / "table.md"

    graphs = {**_envelope_graphs(searches), **_graphs(run, rows)}
    for name, (_, png) in graphs.items():
        (out / name).write_bytes(png)
        written[name] = out / name

    sentences = _sentences(run, rows, findings, searches)
    notes = _method_notes(rule, totals, rows)
    first = broke.what_broke_first(run, rows)
    check = broke.token_cross_check(run.frame, run.telemetry.get("metrics"),
                                    probe_output_tokens=broke.run_probe_output_tokens(run))
    extra = _extra(run)
    with open(out / "failures.csv", "w", encoding="utf-8", newline="") as fh:
        fail.write_failures_csv(extra.failures, fh)
    written["failures.csv"] = out / "failures.csv"
    # per client class and per conversation turn: only for runs whose records have them
    clients = client_table(run, rule=rule, rows=rows)
    if clients:
        with open(out / "clients.csv", "w", encoding="utf-8", newline="") as fh:
            write_client_csv(clients, fh)
        written["clients.csv"] = out / "clients.csv"
    turns = turn_table(run.frame, window_samples(run, rule=rule)) if has_turns(run.frame) else []
    if turns:
        with open(out / "turns.csv", "w", encoding="utf-8", newline="") as fh:
            write_turns_csv(turns, fh)
        written["turns.csv"] = out / "turns.csv"
    document = _markdown(run, md_table.getvalue(), graphs, sentences, notes, rows, first, check, extra,
                         searches=searches, clients=clients, turns=turns, costs=costs)
    (out / "envelope.md").write_text(document, encoding="utf-8")
    written["envelope.md"] = out / "envelope.md"
    page = render.markdown_page(document, title=_title(run, extra), marks=_marks(),
                                images={name: png for name, (_, png) in graphs.items()})
    (out / "envelope.html").write_text(page, encoding="utf-8")
    written["envelope.html"] = out / "envelope.html"
    doc = envelope_document(run, rows, boundaries, costs, completeness=extra.completeness)
    with open(out / "envelope.json", "w", encoding="utf-8") as fh:
        write_envelope_json(doc, fh)
    written["envelope.json"] = out / "envelope.json"
    return written


@dataclass(frozen=True, slots=True, kw_only=True)
class _Extra:
    """The report's sections beyond the table: completeness, outage, failures, token audit."""

    completeness: Completeness
    stop_sentence: str | None = None
    failures: tuple[fail.FailureCount, ...] = ()
    failure_intro: str = ""
    failure_table: tuple[tuple[str, ...], ...] = ()
    failure_notes: tuple[str, ...] = ()
    audit_table: tuple[tuple[str, ...], ...] = ()
    audit_lines: tuple[str, ...] = field(default_factory=tuple)
    # a distributed run's load generators (workers.json); empty for a single-process run
    worker_table: tuple[tuple[str, ...], ...] = ()
    worker_lines: tuple[str, ...] = ()
    worker_summary: tuple[str, ...] = ()

    @property
    def banner(self) -> str | None:
        c = self.completeness
        if not c.partial:
            return None
        return (f"{c.label.capitalize()}. " + " ".join(c.reasons)
                + " Everything below covers only what was recorded before the run stopped.")


def _extra(run: Any) -> _Extra:
    stop = fail.run_server_stop(run)
    stop_sentence = (fail.server_stop_sentence(stop, zero_unix_s=run_start_unix_s(run), stages=run.stages)
                     if stop is not None else None)
    counts = fail.failure_counts(run.frame, run.stages)
    locust = fail.locust_failure_counts((getattr(run, "locust", {}) or {}).get("failures"))
    n = len(run.frame)
    failed = [f for f in counts if f.is_failure]
    total_failed = sum(f.requests for f in failed)
    cancelled = sum(f.requests for f in counts if not f.is_failure)
    intro = (f"Every record of the run, not only the steady-state windows: {n:,} requests, {n - total_failed - cancelled:,} "
             f"succeeded, {total_failed:,} failed"
             + (f", {cancelled:,} cancelled (stopped by the load generator itself: not a failure)" if cancelled else "")
             + ".")
    table: list[tuple[str, ...]] = []
    notes: list[str] = []
    if counts:
        table.append(("category", "requests", "Locust failures", "by stage"))
        for f in counts:
            lc = "-" if locust is None or not f.is_failure else f"{locust.get(f.category, 0):,}"
            table.append((f.category, f"{f.requests:,}", lc, ", ".join(f"{name}: {k:,}" for _, name, k in f.by_stage)))
        table.append(("all failures", f"{total_failed:,}",
                      "-" if locust is None else f"{sum(locust.values()):,}", ""))
    if locust is None:
        notes.append("Locust's failures CSV (locust/locust_failures.csv) is absent: no second count to compare.")
    else:
        ours = {f.category: f.requests for f in failed}
        diff = sorted(k for k in set(ours) | set(locust) if ours.get(k, 0) != locust.get(k, 0))
        if diff:
            notes.append("Locust's failures CSV disagrees with the records for: " + ", ".join(
                f"{k} (records {ours.get(k, 0):,}, Locust {locust.get(k, 0):,})" for k in diff) + ".")
        else:
            notes.append("Locust's failures CSV (E2E entries) counts the same failures, category by category.")
    audit_rows, audit_text = tokens.audit_lines(run.token_audit)
    lg = wk.describe_load_generators(run, zero_unix_s=run_start_unix_s(run))
    worker_rows, worker_text = wk.load_generator_lines(lg) if lg is not None else ([], [])
    worker_summary = [wk.ending_summary_line(e) for e in lg.endings] if lg is not None else []
    worker_summary += [f"{gaps:,} record(s) from load generator {w} were lost in transit (not in the run)."
                       for w, gaps in (lg.gaps if lg is not None else ())]
    return _Extra(completeness=completeness(run), stop_sentence=stop_sentence, failures=tuple(counts),
                  failure_intro=intro, failure_table=tuple(table), failure_notes=tuple(notes),
                  audit_table=tuple(audit_rows), audit_lines=tuple(audit_text),
                  worker_table=tuple(worker_rows), worker_lines=tuple(worker_text),
                  worker_summary=tuple(worker_summary))


def summary_lines(run: Any, rows: Sequence[TableRow]) -> list[str]:
    """The report's headline as lines for a terminal: completeness, lost load generators, envelope per pass,
    what broke, failures."""
    extra = _extra(run)
    lines = []
    if extra.completeness.partial:
        lines.append(f"{extra.completeness.label.upper()}: " + " ".join(extra.completeness.reasons))
    lines += extra.worker_summary
    if rows:
        primary = env.find_envelope(rows)
        findings = [primary] + [f for f in env.find_envelopes(rows) if f.pass_name != primary.pass_name]
        searches = search_findings(rows, getattr(run, "searches", None) or [])
        lines += [f"{name}: {sentence}" for name, sentence, _ in _sentences(run, rows, findings, searches)]
    lines.append(f"What broke first: {broke.what_broke_first(run, rows).sentence}")
    if extra.stop_sentence:
        lines.append(extra.stop_sentence)
    lines.append(extra.failure_intro)
    return lines


def _sentences(run: Any, rows: Sequence[TableRow], findings: Sequence[env.EnvelopeFinding],
               searches: Sequence[SearchFinding]) -> list[tuple[str, str, env.EnvelopeFinding]]:
    """The envelope in words, one entry per pass: search passes first (their paragraph), then the other
    passes' sentences; a pass with open-loop stages over capacity says so."""
    by_name = {f.pass_name: f for f in findings}
    out = []
    for s in searches:
        if s.pass_name in by_name:
            out.append((s.pass_name, sr.search_paragraph(s, server=run.server), by_name[s.pass_name]))
    searched = {s.pass_name for s in searches}
    for f in findings:
        if f.pass_name in searched:
            continue
        sentence = env.envelope_sentence(f)
        over = [r for r in rows if r.pass_name == f.pass_name and r.goodput.over_capacity]
        if over:
            sentence += " " + sr.over_capacity_text(over)
        out.append((f.pass_name, sentence, f))
    for found in workload_knees(getattr(run, "stages", None) or [], rows, skip_passes=tuple(searched)):
        users = ", ".join(f"{v:g}" for v in found.levels)
        text = (f"Throughput against users for {found.workload} (measured at {users} users): "
                f"{found.knee.reason if found.knee is not None else found.reason}.")
        out.append(("knee", text, None))
    return out


def envelope_graph_name(finding: SearchFinding, searches: Sequence[SearchFinding]) -> str:
    """``envelope_graph.png`` for a run's one search; ``envelope_graph_<pass>.png`` when it has several."""
    if len(searches) == 1:
        return "envelope_graph.png"
    return "envelope_graph_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", finding.pass_name or "search") + ".png"


def _envelope_graphs(searches: Sequence[SearchFinding]) -> dict[str, tuple[str, bytes]]:
    return {envelope_graph_name(s, searches): (
        f"The envelope of {s.pass_name}: latency, throughput and attainment against load, "
        "with where it is safe, bending and over",
        render_figure_png(lambda axes, f=s: plot_envelope(axes, f), nrows=3, size_in=(9.0, 9.0), sharex=True),
    ) for s in searches}


def _graphs(run: Any, rows: Sequence[TableRow]) -> dict[str, tuple[str, bytes]]:
    graphs: dict[str, tuple[str, bytes]] = {}
    if rows:
        graphs["throughput_vs_concurrency.png"] = (
            "Aggregate output throughput vs concurrency",
            render_figure_png(lambda ax: plots.plot_throughput_vs_concurrency(ax, rows)),
        )
        for metric in ("ttft", "e2e"):
            graphs[f"{metric}_vs_concurrency.png"] = (
                f"{metric.upper()} percentiles vs concurrency",
                render_figure_png(lambda ax, m=metric: plots.plot_latency_vs_concurrency(ax, rows, m)),
            )
    has_server = not (run.telemetry.get("metrics") is None or run.telemetry["metrics"].empty)
    n = 3 if has_server else 2
    graphs["timeline.png"] = (
        "The run over time",
        render_figure_png(
            lambda axes: plots.plot_timeline(
                axes, run.frame, run.stages, run.telemetry, chunks=run.chunks,
                zero_unix_s=run_start_unix_s(run),
            ),
            nrows=n,
            size_in=(9.0, 3.0 * n),
        ),
    )
    graphs["ttft_distribution.png"] = (
        "TTFT distribution",
        render_figure_png(lambda ax: plots.plot_ttft_distribution(ax, run.frame)),
    )
    return graphs


def _method_notes(rule: WindowRule, totals: Mapping[str, Any], rows: Sequence[TableRow]) -> list[str]:
    notes = [
        DATA_NOTE,
        f"Steady-state window of a stage: from stage start + ramp (target users / spawn rate; 0 for "
        f"rate stages) + {rule.settle_s:g} s settle, to stage end; when less than "
        f"{rule.min_window_s:g} s remains, the second half of the stage. On a step down in users the window "
        f"opens no earlier than when requests in flight fell to the stage's users, and the requests of the "
        f"users Locust was stopping (by user id) are left out.",
        "Attainment: a request is good when it succeeded and met every per-request threshold of its stage "
        "(ttft_ms, tpot_ms, e2e_ms; else the threshold of that metric's highest percentile SLO; open-loop "
        "requests timed from their intended send); attainment = good / the window's requests (errors count, "
        "the load generator's cancellations do not), with its 95% Wilson interval; goodput = the window's output "
        "tokens/s times the share of the successful requests' output tokens that good requests produced (in "
        "requests/s: divided by the good requests' mean length), so with every request good it equals throughput. A search probe's window opens after the search's "
        "settle time and counts only the requests that ended inside the probe, less those sent in its last "
        "stretch (as long as its p95 request), exactly as the search judged it live.",
        "Load-generator stalls: each record carries the longest stall of its process's event loop during "
        "it; a stage is flagged only when the requests a stall over 50 ms touched can move a reported "
        "percentile (over 5% of them for p95, 1% for p99, or a shift of more than 10% without them).",
        "Latency percentiles, request and error counts: requests of the stage that started inside "
        "the window (latencies over successful requests only).",
        "Aggregate output tokens/s: tokens of successful requests whose content chunks arrived inside "
        "the window, divided by the window length (chunk token counts from the server's continuous "
        "usage, else the request's output tokens spread evenly over its chunks).",
        "Mean in flight: time-weighted mean number of requests in flight during the window "
        "(start to last token, or to the failure). Output tokens/s per request = aggregate / mean in flight.",
        "Tail flags: a pNN percentile from fewer than 100/(100-NN) samples (p95 < 20, p99 < 100) is "
        "listed under few-sample tails.",
        f"Cross-check: {totals['records']} records ({totals['ok_records']} successful) carry "
        f"{totals['output_tokens']} output tokens in total; the table's stage_output_tokens column "
        f"sums to {sum(int(_field(r, 'stage_output_tokens') or 0) for r in rows)}.",
    ]
    server = [(r, _field(r, "server_output_tokens_per_s")) for r in rows]
    server = [(r, v) for r, v in server if v is not None]
    if server:
        notes.append(
            "Server-side generation rate (vllm:generation_tokens_total) per window, for comparison: "
            + ", ".join(
                f"{env.level_text(r)}: {v:.0f} tokens/s (ours {format_cell('x', _field(r, 'aggregate_output_tokens_per_s'))})"
                for r, v in server
            )
            + "."
        )
    return notes


def _header_lines(run: Any) -> list[str]:
    info = run.info
    lines = [f"Run `{run.name}`"]
    for key, value in (("status", info.status), ("scenario_path", info.scenario_path), ("quick", info.quick)):
        if value is not None:
            lines.append(f"{key}: {value}")
    lines.append(f"times: every \"at N s\", table window and graph counts seconds from {_zero_text(run)}")
    server = run.server or {}
    for key in ("model", "served_model_name", "vllm_version", "base_url", "host"):
        if key in server and isinstance(server[key], (str, int, float)):
            lines.append(f"server {key}: {server[key]}")
    return lines


def _zero_text(run: Any) -> str:
    """The report's one time zero in words (see :func:`analysis.load.run_start_unix_s`)."""
    zero = run_start_unix_s(run)
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(zero))
    if run.info.started_unix_s is not None:
        return f"the run's start, {when}"
    return f"the first stage's start, {when} (run.json gives no start)" if run.stages else f"the first request, {when}"


def _title(run: Any, extra: _Extra | None) -> str:
    suffix = f" ({extra.completeness.label})" if extra is not None and extra.completeness.partial else ""
    return f"Service envelope: {run.name}{suffix}"


# Sections the page styles (see _marks).
_ENVELOPE = "Envelope"
_STOPPED = "Server stopped answering"
_TABLE = "Table"
_SUMMARY = "Summary"
_RUN = "Run"
_SEARCH = "Search: how the boundary was found"
_SOURCES = "Workload sources"
_COST = "Cost and capacity"
_CAPABILITIES = "Server capabilities"
_CLIENTS = "Per client class"
_CLASSES = "Client classes"
_TURNS = "By conversation turn"
CLIENTS_NOTE = (
    "Each client class's row is cut like the table's (the same steady-state window) from that class's "
    "requests only, and judged against the class's own SLOs (the stage's where it has none of its own). "
    "Load is the stage's in all; \"its users\" counts the distinct users that sent the class's requests."
)
TURNS_NOTE = (
    "Requests that started in each stage's steady-state window (as the table), by their turn in the "
    "conversation (turn 1 is a conversation's first request); TTFT over the successful ones (n), prompt tokens "
    "as the server counted them. A later turn's prompt holds the turns before it: the server's prefix cache "
    "may serve that history."
)
SEARCH_NOTE = (
    "Each probe is an ordinary stage. Its attainment here is over the stage's steady-state window (the "
    "table's), with its 95% Wilson interval; the verdict is this probe's alone (the answer pools the probes "
    "at a level). The decision is what the search logged in search.json when it chose the next probe, from "
    "its own live counts."
)
SUMMARY_COLUMNS = ("pass", "stage", "load", "out tok/s", "TTFT p50 ms", "E2E p95 ms", "errors",
                   "attainment (95% CI)", "verdict")


def _marks() -> render.Marks:
    """What envelope.html styles beyond the Markdown: paragraphs of the envelope and server-stopped
    sections are sentences; a FAIL in the main table's SLO column is a failing cell (a stage after
    the server stopped says "not judged" there, and is not marked). The partial-run banner is the
    document's block quote."""
    return render.Marks(sentence_sections=(_ENVELOPE, _STOPPED),
                        fail_cell=(_TABLE, dict(MARKDOWN_COLUMNS)["slo_pass"], format_cell("slo_pass", False)))


def summary_table(rows: Sequence[TableRow]) -> list[tuple[str, ...]]:
    """The compact table of the first screen: per stage its load, throughput, two latencies, errors,
    attainment and verdict (what broke first where it failed); header first."""
    out = [SUMMARY_COLUMNS]
    for r in rows:
        g = r.goodput
        if g.attainment is not None and g.attainment_low is not None and g.attainment_high is not None:
            att = f"{adaptive_percent(g.attainment)} ({g.attainment_low * 100:.0f}-{g.attainment_high * 100:.0f}%)"
        else:
            att = "-"
        errors = f"{r.counts.errors:,}" + (f" ({adaptive_percent(r.counts.error_rate)})" if r.counts.errors else "")
        out.append((r.pass_name, r.stage_name, env.level_text(r),
                    format_cell("aggregate_output_tokens_per_s", r.throughput.aggregate_output_tokens_per_s),
                    format_cell("ttft_p50_ms", r.latency.ttft_p50_ms), format_cell("e2e_p95_ms", r.latency.e2e_p95_ms),
                    errors, att, _verdict(r)))
    return out


def _verdict(r: TableRow) -> str:
    if r.trust.server_stopped:
        return SERVER_STOPPED_CELL
    parts = []
    if r.goodput.over_capacity:
        parts.append("over capacity: no steady state")
    if r.slo.slo_pass is True:
        parts.append("pass")
    elif r.slo.slo_pass is False:
        worst = env.worst_failed_slo(tuple(x for x in r.slo.slo_results if x.passed is False))
        parts.append("FAIL" + (f": {_slo_name(worst.key)}" if worst is not None else ""))
    elif not r.slo.slo_results:
        parts.append("no SLOs")
    if r.trust.trustworthy is False:
        parts.append("NOT TRUSTWORTHY")
    return "; ".join(parts) or "-"


def _slo_name(key: str) -> str:
    names = {"error_rate_max": "errors", "attainment_min": "attainment",
             "min_output_tokens_per_s": "throughput"}
    if key in names:
        return names[key]
    metric, pct = split_key(key)
    return f"{pct} {METRIC_NAMES.get(metric, metric.upper())}".strip()


def _md_table(rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(_md_escape(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(rows[0]), "|" + "|".join("---" for _ in rows[0]) + "|", *(line(r) for r in rows[1:])])


def _markdown(run: Any, table_md: str, graphs: Mapping[str, tuple[str, bytes]],
              sentences: Sequence[tuple[str, str, Any]], notes: Sequence[str],
              rows: Sequence[TableRow], first: broke.BrokeFirst | None = None,
              check: broke.TokenCrossCheck | None = None, extra: _Extra | None = None, *,
              searches: Sequence[SearchFinding] = (), clients: Sequence[ClientRow] = (),
              turns: Sequence[TurnRow] = (), costs: RunCosts | None = None) -> str:
    # The first screen answers the question: the envelope in words, its graph, a compact table;
    # then what the run was, and the detail.
    parts = [f"# {_md_escape(_title(run, extra))}\n"]
    if extra is not None and extra.banner:
        parts.append(f"> **{_md_escape(extra.banner)}**\n")
    parts.append(f"## {_ENVELOPE}\n")
    if not sentences:
        parts.append("No stages to analyse.\n")
    for name, sentence, _ in sentences:
        parts.append(f"**{_md_escape(name or 'run')}**: {_md_escape(sentence)}\n")
    headline = cl.classes_headline(cl.client_findings(clients)) if clients else None
    if headline:
        parts.append(f"**{_CLASSES}**: {_md_escape(headline)} See {_CLIENTS}.\n")
    if first is not None:
        parts.append(f"**What broke first**: {_md_escape(first.sentence)}\n")
    envelope_graphs = [name for name in graphs if name.startswith("envelope_graph")]
    for fname in envelope_graphs:
        parts.append(f"![{_md_escape(graphs[fname][0])}]({fname})\n")
    if rows:
        parts.append(f"## {_SUMMARY}\n")
        parts.append(_md_table(summary_table(rows)) + "\n")
    sources = getattr(run, "sources", None) or ()
    if sources:
        parts.append(f"## {_SOURCES}\n")
        parts.append(_md_escape(SOURCES_NOTE) + "\n")
        parts.append(_md_table(source_table(sources)) + "\n")
    if clients:
        parts.append(f"## {_CLIENTS}\n")
        parts.append(_client_section(clients))
    if turns:
        parts.append(f"## {_TURNS}\n")
        parts.append(_md_escape(TURNS_NOTE) + "\n")
        parts.append(_md_table(turn_summary_table(turns)) + "\n")
        lines = turn_lines(turns)
        if lines:
            parts.append("\n".join(f"- {_md_escape(line)}" for line in lines) + "\n")
    parts.append(f"## {_RUN}\n")
    parts += ["\n".join(f"- {_md_escape(line)}" for line in _header_lines(run)), ""]
    parts.append(f"## {_CAPABILITIES}\n")
    parts.append(_capabilities_section(run))
    if costs is not None and rows:
        parts.append(f"## {_COST}\n")
        parts.append(_cost_section(costs, rows))
    for finding in searches:
        parts.append(f"## {_SEARCH}" + (f" ({_md_escape(finding.pass_name)})" if len(searches) > 1 else "") + "\n")
        parts.append(_md_escape(SEARCH_NOTE) + "\n")
        parts.append(_md_table(sr.probe_table(finding)) + "\n")
        parts.append(_md_escape(sr.live_difference(finding)) + "\n")
    if extra is not None and extra.stop_sentence:
        parts.append(f"## {_STOPPED}\n")
        parts.append(_md_escape(extra.stop_sentence) + "\n")
    if first is not None:
        parts.append("## What broke first\n")
        parts.append(_md_escape(first.sentence) + "\n")
        if first.events:
            parts.append("\n".join(f"- {_md_escape(line)}" for line in _event_lines(first)) + "\n")
    if check is not None:
        parts.append("## Client/server token cross-check\n")
        parts.append(_md_escape(_cross_check(check, extra)) + "\n")
    if extra is not None and extra.worker_lines:
        parts.append("## Load generators\n")
        parts.append(_md_escape(extra.worker_lines[0]) + "\n")
        parts.append(_md_table(extra.worker_table) + "\n")
        parts.append("\n".join(f"- {_md_escape(line)}" for line in extra.worker_lines[1:]) + "\n")
    parts.append(f"## {_TABLE}\n")
    parts.append(table_md)
    slo_lines = [f"- {_field(r, 'pass_name')} / {_field(r, 'stage_name')}: {_slo_line(r)}"
                 for r in rows if _field(r, "slo_results")]
    if slo_lines:
        parts.append("\nSLO checks (measured value in parentheses):\n")
        parts.append("\n".join(_md_escape(line) for line in slo_lines) + "\n")
    server_time = _server_latency_section(rows)
    if server_time:
        parts.append(f"\n## {SERVER_TIME}\n")
        parts.append(server_time)
    if extra is not None:
        parts.append("\n## Failed requests by category\n")
        parts.append(_md_escape(extra.failure_intro) + "\n")
        if extra.failure_table:
            parts.append(_md_table(extra.failure_table) + "\n")
        parts.append("\n".join(_md_escape(n) for n in extra.failure_notes) + "\n")
        parts.append("## Token counts: server usage vs client estimate\n")
        parts.append(_md_escape(TOKEN_AUDIT_NOTE) + "\n")
        parts.append(_md_table(extra.audit_table) + "\n")
        parts.append("\n".join(f"- {_md_escape(line)}" for line in extra.audit_lines) + "\n")
    parts.append("\n## Graphs\n")
    for fname, (title, _) in graphs.items():
        if fname in envelope_graphs:
            continue
        parts.append(f"![{_md_escape(title)}]({fname})\n")
    parts.append("## How the numbers were computed\n")
    parts.append("\n".join(f"- {_md_escape(n)}" for n in notes) + "\n")
    limits = [lim for _, _, f in sentences if f is not None for lim in f.limits]
    if limits:
        parts.append("## Limits\n")
        parts.append("\n".join(f"- {_md_escape(lim)}" for lim in limits) + "\n")
    if run.missing:
        parts.append("## Missing\n")
        parts.append("\n".join(f"- {_md_escape(m)}" for m in run.missing) + "\n")
    return "\n".join(parts)


def _capabilities_section(run: Any) -> str:
    """What the server did not do that the workloads ask of vLLM, and how each number was obtained instead."""
    from envelope.capabilities import read_capabilities

    caps = read_capabilities(run.run_dir) if getattr(run, "run_dir", None) is not None else None
    out = [_md_escape(capa._engine_line(run.server or {})) + "\n"]
    out += [_md_escape(line) + "\n" for line in capa.capabilities_lines(caps, run.frame)]
    if caps is None:
        return "\n".join(out)
    out.append(_md_table(capa.capability_table(caps)) + "\n")
    if any(e.forced_output != "honoured" for e in caps.endpoints):
        names = {s.stage_index: s.stage_name for s in run.stages}
        lengths = capa.output_length_rows(run.frame, names)
        if lengths:
            out.append("Output tokens asked for and given (successful requests): the server chose where to stop, "
                       "so these, not the scenario's, are the lengths measured.\n")
            out.append(_md_table(capa.output_length_table(lengths)) + "\n")
    return "\n".join(out)


COST_NOTE = (
    "Per stage: output tokens/s is the table's aggregate throughput; requests/s is the window's successful "
    "requests divided by its length. The plan takes one box to serve the pass's boundary (the highest level "
    "that met the SLOs) and assumes boxes add up linearly behind a load balancer; a month is 730 h."
)


def _cost_section(costs: RunCosts, rows: Sequence[TableRow]) -> str:
    """Plan sentences per pass, a table of each stage's cost and energy, and every formula with its inputs."""
    parts: list[str] = []
    price = costs.price
    if price is None:
        parts.append(_md_escape(NO_PRICE_LINE) + "\n")
    else:
        text = f"Price: {format_usd(price.usd_per_hour)}/h per box ({price.source})."
        if costs.stated_power is not None:
            sp = costs.stated_power
            text += f" Stated power: {grouped_number(sp.power_w)} W ({sp.source}; used only where NVML gave none)."
        parts.append(_md_escape(text) + "\n")
        for p in costs.passes:
            if p.plan is None:
                parts.append(f"**{_md_escape(p.pass_name or 'run')}**: no plan ({_md_escape(p.reason or '')}).\n")
                continue
            text = p.sentence or ""
            at = p.at_boundary.cost if p.at_boundary is not None else None
            if at is not None:
                text += (f" At the boundary: {format_usd(at.usd_per_million_output_tokens)} per 1M output tokens, "
                         f"{format_usd(at.usd_per_request)} per request.")
            parts.append(f"**{_md_escape(p.pass_name or 'run')}**: {_md_escape(text)}\n")
    priced = price is not None
    if not priced and not costs.has_energy:
        parts += [_md_escape(n) + "\n" for n in costs.notes]
        return "\n".join(parts)
    header = ["pass", "stage", "load", "out tok/s", "ok req/s"]
    if priced:
        header += ["$ per 1M output tokens", "$ per request"]
    if costs.has_energy:
        header += ["J per output token"]
    table: list[tuple[str, ...]] = [tuple(header)]
    formulas: list[str] = []
    for r, line in zip(rows, costs.stages):
        cells = [line.pass_name, line.stage_name, env.level_text(r), _amount_text(line.output_tokens_per_s),
                 _amount_text(line.requests_per_s)]
        c = line.cost
        if priced:
            cells += [format_usd(c.usd_per_million_output_tokens) if c else "-",
                      format_usd(c.usd_per_request) if c else "-"]
        if costs.has_energy:
            cells.append(_amount_text(line.joules_per_output_token)
                         + ("" if line.power_measured or line.joules_per_output_token is None else " (stated)"))
        table.append(tuple(cells))
        sums = []
        if line.requests_per_s is not None:
            sums.append(f"{r.counts.ok_requests:,} successful requests / {r.window.window_s:.1f} s window = "
                        f"{_amount_text(line.requests_per_s)} req/s")
        if c is not None:
            sums.append(c.formula)
        elif line.energy_formula is not None:
            sums.append(line.energy_formula)
        if priced and c is None:
            sums.append(f"no cost ({line.reason})")
        formulas.append(f"{line.pass_name} / {line.stage_name}: " + "; ".join(sums))
    parts.append(_md_table(table) + "\n")
    parts.append(_md_escape(COST_NOTE) + " Each figure with its inputs:\n")
    for p in costs.passes:
        if p.plan is not None:
            formulas.append(f"{p.pass_name} plan: " + "; ".join(p.plan.formula.split("\n")))
    formulas += list(costs.notes)
    parts.append("\n".join(f"- {_md_escape(f)}" for f in formulas) + "\n")
    return "\n".join(parts)


def _amount_text(v: float | None) -> str:
    """A rate as the cost formulas write it (``1,461``, ``1.33``, ``0.0667``); ``-`` when missing."""
    return format_amount(v) if finite(v) else "-"


def _client_section(clients: Sequence[ClientRow]) -> str:
    """The classes' table, one envelope sentence per class (and pass), and what one class did to another."""
    parts = [_md_escape(CLIENTS_NOTE) + "\n", _md_table(cl.client_summary_table(clients)) + "\n"]
    findings = cl.client_findings(clients)
    several = len({f.pass_name for f in findings}) > 1
    for found in findings:
        where = f"(pass {found.pass_name}) " if several else ""
        parts.append(_md_escape(where + cl.client_sentence(found)) + "\n")
    interference = cl.find_interference(clients)
    if interference:
        parts.append("\n".join(f"- {_md_escape(cl.interference_sentence(i))}" for i in interference) + "\n")
    return "\n".join(parts)


SERVER_TIME = "Where the time goes (server-side, per stage)"
SERVER_TIME_NOTE = (
    "From vLLM's own latency histograms: the difference between the last /metrics sample at or before "
    "each steady-state window's start and the last at or before its end, so the server's numbers count "
    "the requests it finished in between (the client's count the requests that started in the window). "
    "Server means are exact (sum / count); server percentiles are interpolated within the histogram's "
    "buckets, as Prometheus does, so they are only as fine as the bucket bounds: read them to the "
    "bucket width, not to the millisecond. Client - server is the time spent outside the engine (API "
    "front end, network, load generator). A stage whose client mean TTFT is below the server's by more "
    "than the width of the bucket holding the server's mean says the two are misaligned (different "
    "requests or clocks), not that the client was faster. Only means are subtracted: a server percentile "
    "is a point inside a bucket."
)


def _server_latency_section(rows: Sequence[TableRow]) -> str | None:
    """One small table per stage: client vs server TTFT and E2E, the server's phases, outside the engine.

    None when no stage has server latency histograms (a server without them, or no telemetry).
    """
    prefix = any(_field(r, "server_prefix_cache_queried_tokens") is not None for r in rows)
    if not prefix and not any(_field(r, "server_requests_finished") is not None
                              or _field(r, "server_ttft_mean_ms") is not None for r in rows):
        return None

    def diff(a: Any, b: Any) -> str:
        return _ms_text(float(a) - float(b)) if finite(a) and finite(b) else "-"

    parts = [_md_escape(SERVER_TIME_NOTE) + "\n"]
    if prefix:
        parts.append(_md_escape(PREFIX_CACHE_NOTE) + "\n")
    for r in rows:
        title = f"{_field(r, 'pass_name')} / {_field(r, 'stage_name')} ({env.level_text(r)})"
        parts.append(f"### {_md_escape(title)}\n")
        finished = _field(r, "server_requests_finished")
        cache = _prefix_cache_line(r)
        if finished is None and _field(r, "server_ttft_mean_ms") is None:
            parts.append("No server latency histograms cover this window.\n")
            if cache:
                parts.append(_md_escape(cache) + "\n")
            continue
        table = [("ms", "client", "server", "client - server")]
        for metric, label in (("ttft", "TTFT"), ("e2e", "E2E")):
            for stat in ("mean", "p50", "p95"):
                client, server = _field(r, f"{metric}_{stat}_ms"), _field(r, f"server_{metric}_{stat}_ms")
                # only means subtract exactly: a server percentile is a point inside a bucket
                table.append((f"{label} {stat}", _ms_text(client), _ms_text(server),
                              diff(client, server) if stat == "mean" else "-"))
        for phase in ("queue", "prefill", "decode"):
            table.append((f"{phase} mean", "-", _ms_text(_field(r, f"server_{phase}_mean_ms")), "-"))
        parts.append(_md_table(table) + "\n")
        parts.append(_md_escape(_server_latency_line(r)) + "\n")
        if cache:
            parts.append(_md_escape(cache) + "\n")
    return "\n".join(parts)


PREFIX_CACHE_NOTE = (
    "Prefix cache: the server's counters of prompt tokens looked up in its prefix cache and of those found "
    "there (vllm:prefix_cache_queries and vllm:prefix_cache_hits), their differences over the same samples; "
    "the hit rate is hits / lookups, in tokens."
)


def _prefix_cache_line(r: TableRow) -> str | None:
    queried = _field(r, "server_prefix_cache_queried_tokens")
    if queried is None:
        return None
    ratio = _field(r, "server_prefix_cache_hit_ratio")
    if ratio is None:
        return "Prefix cache: the server looked up no prompt token in the window."
    return (f"Prefix cache: {percent(ratio, digits=1)} of the {queried:,.0f} prompt tokens the server looked up "
            "were cache hits.")


def _server_latency_line(r: TableRow) -> str:
    finished = _field(r, "server_requests_finished")
    text = (f"The server finished {finished:,} request(s) in the window, the client counted "
            f"{_field(r, 'ok_requests'):,} successful ones." if finished is not None else "")
    outside = _field(r, "outside_engine_ttft_mean_ms")
    client = _field(r, "ttft_mean_ms")
    bucket = _field(r, "server_ttft_mean_bucket_ms")
    if outside is None:
        return (text + " No outside-the-engine TTFT: the client or the server has no mean TTFT here.").strip()
    share = f" ({percent(outside / client)} of the client's mean TTFT)" if finite(client) and client > 0 else ""
    text += f" Outside the engine: {_ms_text(outside)} ms of mean TTFT{share}"
    if bucket is not None and outside < 0 and -outside > bucket:
        text += (f"; the client's mean is below the server's by more than the {_ms_text(bucket)} ms bucket holding "
                 "the server's mean: the two are misaligned")
    return text.strip() + "."


def _ms_text(value: Any) -> str:
    return format_cell("x", value)


TOKEN_AUDIT_NOTE = (
    "Successful requests only (a failed request is cut short). Per request, the server's usage count "
    "against the client's: output tokens against the content chunks the client received (its estimate, "
    "one token per chunk); prompt tokens against the prompt length the client asked for. Exact counts."
)


def _cross_check(check: broke.TokenCrossCheck, extra: _Extra | None) -> str:
    text = broke.cross_check_text(check)
    if extra is not None and extra.stop_sentence and check.server_generation_tokens is not None:
        text += (" The server stopped answering during the run, so its counter misses the tokens generated "
                 "after its last good /metrics sample.")
    return text


def _slo_line(row: TableRow) -> str:
    text = slo_summary(_field(row, "slo_results"))
    return f"{SERVER_STOPPED_CELL} ({text})" if _field(row, "server_stopped") else text


def _field(row: TableRow, name: str) -> Any:
    """A table row's cell by column name: the one place this module reads a row, beyond the
    functions of :mod:`analysis.table` (``row_cell``, ``format_cell``, ``slo_summary``)."""
    return row.value(name)


def _md_escape(text: str) -> str:
    # Only what could open an HTML tag in a Markdown renderer; "<=" stays readable.
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", str(text))


def _event_lines(first: broke.BrokeFirst) -> list[str]:
    lines = []
    for e in first.events:
        where = e.stage_name or "outside every stage"
        when = f"from {e.t_s:,.0f} s (stage verdict)" if e.kind == "slo" else f"at {e.t_s:,.0f} s"
        lines.append(f"{when}, {where}: {e.detail} [{e.kind}]")
    return lines
