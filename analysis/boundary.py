"""Each pass's boundary: the highest load that met its SLOs and the lowest that did not, in one typed record.

A search pass brackets its boundary with confidence (:mod:`analysis.search`);
a pass of fixed stages has one too, from its stages' SLO verdicts in level
order (:mod:`analysis.envelope`): the last stage that passed before the first
that failed. Cost plans, ``report/envelope.json``, the regression gate and the
sweep report all read this one record, so they cannot disagree on where a run
bent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from analysis import envelope as env
from analysis.common import METRIC_NAMES, finite, split_key
from analysis.rows import SloResult, TableRow
from analysis.search import SearchFinding
from analysis.search_report import search_paragraph

__all__ = ["PassBoundary", "pass_boundaries", "row_level", "failed_slo_name"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PassBoundary:
    """Where one pass bent.

    ``passed_level``: the highest level that met the SLOs (a search: with
    confidence) below ``failed_level``, the lowest level that failed; either may be None
    (nothing passed, or nothing failed). ``status``: a search's bracket status
    (``bracketed``, ``wide``, ``above_max``, ``below_min``, ``no_pass``,
    ``no_fail``, ``empty``) or a fixed pass's finding (``all_pass``, ``broke``,
    ``none_pass``, ``no_slos``, ``no_data``, ``server_stopped``). ``safe_row``/``fail_row``:
    the stages at those levels. ``broke_first``: the SLO that failed first at
    ``failed_level`` in words (``p95 TTFT``), ``cause``: why (``queueing``,
    ``kv_cache``, ...), both None when nothing failed.
    """

    pass_name: str
    kind: str  # "search" | "stages"
    unit: str  # "users" | "requests/s"
    passed_level: float | None
    failed_level: float | None
    status: str
    confident: bool  # a search: levels judged on attainment intervals; fixed stages: point verdicts
    safe_row: TableRow | None
    fail_row: TableRow | None
    broke_first: str | None
    cause: str | None
    sentence: str  # the pass's envelope in words (the report's sentence)

    @property
    def has_slos(self) -> bool:
        return self.status not in ("no_slos", "no_data", "server_stopped", "empty")


def row_level(row: TableRow) -> tuple[float | None, str]:
    """A stage's load level and its unit: target users for closed loop, else the target rate."""
    w = row.window
    if w.target_users is not None and w.kind == "users" and finite(w.target_users):
        return float(w.target_users), "users"
    if w.target_rate_per_s is not None and finite(w.target_rate_per_s):
        return float(w.target_rate_per_s), "requests/s"
    return None, "users"


def failed_slo_name(slo: SloResult | None) -> str | None:
    """The failed SLO in words: ``p95 TTFT``, ``error rate``, ``SLO attainment``, ``throughput``."""
    if slo is None:
        return None
    if slo.key == "error_rate_max":
        return "error rate"
    if slo.key == "attainment_min":
        return "SLO attainment"
    if slo.key == "min_output_tokens_per_s":
        return "throughput"
    metric, pct = split_key(slo.key)
    return f"{pct} {METRIC_NAMES.get(metric, metric.upper())}"


def _from_search(s: SearchFinding, sentence: str) -> PassBoundary:
    b = s.bracket
    return PassBoundary(
        pass_name=s.pass_name, kind="search", unit=s.unit, passed_level=b.highest_pass, failed_level=b.lowest_fail,
        status=b.status, confident=True, safe_row=s.safe_row, fail_row=s.fail_row,
        broke_first=failed_slo_name(s.failed_slo), cause=s.cause, sentence=sentence,
    )


def _from_finding(f: env.EnvelopeFinding) -> PassBoundary:
    rows = [r for r in (f.safe_row, f.broke_row) if r is not None]
    unit = row_level(rows[0])[1] if rows else "users"
    safe = f.safe_row if f.status in ("all_pass", "broke") else None
    return PassBoundary(
        pass_name=f.pass_name, kind="stages", unit=unit,
        passed_level=row_level(safe)[0] if safe is not None else None,
        failed_level=row_level(f.broke_row)[0] if f.broke_row is not None else None,
        status=f.status, confident=False, safe_row=safe, fail_row=f.broke_row,
        broke_first=failed_slo_name(f.broke_slo), cause=f.cause, sentence=env.envelope_sentence(f),
    )


def pass_boundaries(rows: Sequence[TableRow], searches: Sequence[SearchFinding]) -> list[PassBoundary]:
    """One boundary per pass, in the order passes first appear in ``rows``; search passes from their bracket."""
    by_search = {s.pass_name: s for s in searches}
    out = []
    for f in env.find_envelopes(rows):
        s = by_search.get(f.pass_name)
        if s is not None:
            out.append(_from_search(s, search_paragraph(s)))
        else:
            out.append(_from_finding(f))
    return out
