"""The answer of each search pass, recomputed from the table: the bracket, the knee, and why it bends.

A search pass's probes are ordinary stages, so each has a table row with its
attainment over the steady-state window (:class:`analysis.rows.Goodput`).
:func:`search_findings` pools them by level and asks :func:`envelope.search.bracket`
for the answer, with the same rules that steered the search (``search.json``
holds the live counts that did the steering; the table's window is the one the
report's other numbers use, so the answer here is the one the report states).

Why it bends there: the lowest failing level against the highest passing one,
through :func:`analysis.envelope.cause_of` (the server's own evidence: queue
time, KV cache and preemptions, prefill, decode, errors, or time outside the
engine); when the metrics moved too little between those two to name a cause,
against the lightest level that passed. The knee of throughput against the level comes from
:func:`analysis.knee.find_knee` over the probes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from analysis.envelope import cause_of, worst_failed_slo
from analysis.knee import Knee, find_knee
from analysis.rows import SloResult, TableRow
from envelope.attainment import Thresholds, thresholds_from_slos
from envelope.search import Bracket, ProbeResult, SearchSpec, Verdict, bracket, leaning
from envelope.search_log import SearchEntry
from envelope.stages import StageRecord

__all__ = ["SearchFinding", "WorkloadKnee", "search_findings", "probe_rows", "workload_knees"]


@dataclass(frozen=True, kw_only=True, slots=True)
class SearchFinding:
    """One search pass: its probes' rows, the bracket, the knee, and the cause at the boundary."""

    pass_name: str
    over: str  # users | rate
    unit: str  # "users" | "requests/s"
    spec: SearchSpec
    target: float
    thresholds: Thresholds
    rows: tuple[TableRow, ...]  # the probes, in the order they ran
    bracket: Bracket
    safe_row: TableRow | None  # the probe at the highest level that passed (its best-judged one)
    fail_row: TableRow | None  # the probe at the lowest level that failed
    cause: str | None
    evidence: tuple[str, ...]
    failed_slo: SloResult | None
    knee: Knee | None
    knee_note: str
    live: SearchEntry | None  # what steered the search (search.json), when the run wrote it
    done: bool  # the search ended by its own rules (not cut short)


def probe_rows(rows: Sequence[TableRow], pass_name: str) -> list[TableRow]:
    return sorted((r for r in rows if r.pass_name == pass_name), key=lambda r: r.stage_index)


def search_findings(rows: Sequence[TableRow], searches: Sequence[SearchEntry]) -> list[SearchFinding]:
    """One finding per search the run logged, in the order they ran (those without rows left out)."""
    out = []
    for entry in searches:
        mine = probe_rows(rows, entry.pass_name)
        if mine:
            out.append(_finding(entry, mine))
    return out


def _level(row: TableRow, over: str) -> float:
    return float(row.window.target_users if over == "users" else row.window.target_rate_per_s)


def _finding(entry: SearchEntry, rows: list[TableRow]) -> SearchFinding:
    spec = SearchSpec.model_validate(dict(entry.spec))
    over = spec.over
    probes = [ProbeResult(level=_level(r, over), good=int(r.goodput.good_requests or 0),
                          judged=int(r.counts.requests), duration_s=float(r.window.window_s or 0.0))
              for r in rows if r.goodput.good_requests is not None]
    result = bracket(spec, probes, target=entry.target)
    by_level: dict[float, list[TableRow]] = {}
    for r in rows:
        by_level.setdefault(_level(r, over), []).append(r)

    def best(level: float | None) -> TableRow | None:
        if level is None or level not in by_level:
            return None
        return max(by_level[level], key=lambda r: r.counts.requests)

    safe, fail = best(result.highest_pass), best(result.lowest_fail)
    cause, evidence, failed = None, (), None
    if fail is not None:
        failed = worst_failed_slo(tuple(s for s in fail.slo.slo_results if s.passed is False))
        cause, found = cause_of(failed, fail, safe)
        # Next to the boundary a metric may have moved too little to name (TPOT 20 -> 21 ms from 11 to 12
        # users); then what changed from the lightest level that met the target names it. Its point
        # estimate is enough here (a level of 72 good requests out of 72 is unresolved at 0.95, and no
        # worse a baseline for what changed).
        lightest = best(min((lv.level for lv in result.levels
                             if lv.level < result.lowest_fail and leaning(lv, entry.target) is Verdict.PASS),
                            default=None))
        if cause == "unknown" and lightest is not None and lightest is not safe:
            cause, found = cause_of(failed, fail, lightest)
        evidence = tuple(found)
    levels = [_level(r, over) for r in rows]
    knee, knee_note = find_knee(levels, [r.throughput.aggregate_output_tokens_per_s for r in rows])
    return SearchFinding(
        pass_name=entry.pass_name, over=over, unit="users" if over == "users" else "requests/s", spec=spec,
        target=entry.target, thresholds=thresholds_from_slos(dict(entry.thresholds)), rows=tuple(rows),
        bracket=result, safe_row=safe, fail_row=fail, cause=cause, evidence=evidence, failed_slo=failed,
        knee=knee, knee_note=knee_note, live=entry, done=entry.done,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkloadKnee:
    """The knee of throughput against users for one workload's fixed closed-loop stages (any passes)."""

    workload: str  # "300-token prompts, 128 output tokens"
    levels: tuple[float, ...]  # the distinct user counts measured
    knee: Knee | None
    reason: str


def workload_knees(stages: Sequence[StageRecord], rows: Sequence[TableRow], *,
                   skip_passes: Sequence[str] = ()) -> list[WorkloadKnee]:
    """For every workload measured closed loop at 4 or more user counts outside a search: its knee.

    Stages share a workload when their requested prompt and output tokens are the same
    (:class:`envelope.stages.WorkloadSummary`), whichever pass they belong to.
    """
    by_index = {r.stage_index: r for r in rows}
    groups: dict[tuple, list[TableRow]] = {}
    for stage in stages:
        row = by_index.get(stage.stage_index)
        if (row is None or stage.open_loop or not stage.target_users or stage.pass_name in skip_passes
                or stage.clients or row.counts.ok_requests == 0):
            continue
        w = stage.workload
        groups.setdefault((w.prompt_tokens, w.output_tokens, w.long_context), []).append(row)
    out = []
    for (prompt, output, long_context), members in groups.items():
        levels = sorted({float(r.window.target_users) for r in members})
        if len(levels) < 4:
            continue
        knee, reason = find_knee([float(r.window.target_users) for r in members],
                                 [r.throughput.aggregate_output_tokens_per_s for r in members])
        what = f"{prompt}-token prompts, {output if output is not None else 'free-length'} output tokens"
        out.append(WorkloadKnee(workload=what + (" (long context)" if long_context else ""), levels=tuple(levels),
                                knee=knee, reason=reason))
    return out

