"""The regression gate over two loaded runs: ``envelope compare BASE NEW --gate``.

:func:`gate_runs` pairs BASE's and NEW's stages as :mod:`analysis.compare` does
(pass and load level) and builds the checks of :mod:`analysis.gate`:

- at every matched stage, p95 TTFT and p95 TPOT over the per-request values of
  exactly the requests each side's table row counts (its successful requests in
  the steady window), and attainment where both sides judged requests against
  the same per-request thresholds;
- for every search pass both runs ran, the boundary: NEW's bracket wholly below
  BASE's. A pass of fixed stages gets no boundary check: its boundary is a point
  verdict on the very stages checked above (a stage flipping from pass to fail
  on noise would move it), so it would add a noisier duplicate of their evidence.

The latency and attainment checks share the gate's confidence (Bonferroni; see
:mod:`analysis.gate`). :func:`gate_stages` does the statistics on per-stage
arrays alone, so it can be tested on synthetic samples without run directories.

Unusable input raises :class:`GateInputError` (one line; the CLI exits 2): runs
of different scenarios, a run that failed or has no records, no stage in
common, or nothing that could be judged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from analysis.gate import (MIN_LATENCY_SAMPLES, GateCheck, GateResult, GateSettings, attainment_regression,
                           boundary_regression, p95_regression)
from analysis.rows import TableRow
from analysis.table import WindowRule
from envelope.attainment import Thresholds, thresholds_from_slos

__all__ = ["GateInputError", "StageSamples", "gate_stages", "gate_runs", "scenario_name"]


class GateInputError(ValueError):
    """The two runs cannot be gated against each other; ``str()`` is one line (exit status 2)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StageSamples:
    """What the gate compares of one stage.

    ``ttft_ms``/``tpot_ms``: one value per request the stage's table row counts in its
    latency percentiles (NaN where a request has none, e.g. a one-token TPOT).
    ``requests``: the requests judged for attainment; ``good_requests``: those that met every
    per-request threshold, None when the stage has no thresholds (``thresholds`` None too).
    """

    key: str
    ttft_ms: np.ndarray
    tpot_ms: np.ndarray
    requests: int = 0
    good_requests: int | None = None
    thresholds: Thresholds | None = None


def _finite_count(values: np.ndarray) -> int:
    return int(np.isfinite(np.asarray(values, dtype=float)).sum())


def _attainment_judgeable(base: StageSamples, new: StageSamples) -> tuple[bool, str | None]:
    """(judgeable, why not) for a stage where at least one side has thresholds."""
    if base.good_requests is None or new.good_requests is None:
        side = "base" if base.good_requests is None else "new"
        return False, f"not judged: {side} has no per-request thresholds at this stage"
    if base.thresholds != new.thresholds:
        return False, (f"not judged: the per-request thresholds differ (base {_describe(base.thresholds)}, "
                       f"new {_describe(new.thresholds)})")
    if base.requests <= 0 or new.requests <= 0:
        return False, None  # attainment_regression says why
    return True, None


def _share(s: StageSamples) -> float | None:
    return s.good_requests / s.requests if s.good_requests is not None and s.requests > 0 else None


def _describe(t: Thresholds | None) -> str:
    return (t.describe() if t is not None else "") or "none"


def gate_stages(pairs: Sequence[tuple[StageSamples, StageSamples]], *, settings: GateSettings = GateSettings(),
                boundaries: Sequence[GateCheck] = (), notes: Sequence[str] = ()) -> GateResult:
    """Judge matched stages (``(base, new)``, keyed by ``base.key``) and add the ``boundaries`` checks.

    First counts the checks the data can judge (enough finite latencies on both sides;
    attainment with the same thresholds on both sides), then holds each of them to the
    gate's confidence shared out over that count.
    """
    def latency_ok(b: np.ndarray, n: np.ndarray) -> bool:
        return _finite_count(b) >= MIN_LATENCY_SAMPLES and _finite_count(n) >= MIN_LATENCY_SAMPLES

    family = 0
    for base, new in pairs:
        family += latency_ok(base.ttft_ms, new.ttft_ms) + latency_ok(base.tpot_ms, new.tpot_ms)
        if base.good_requests is not None or new.good_requests is not None:
            family += _attainment_judgeable(base, new)[0]
    checks: list[GateCheck] = []
    for base, new in pairs:
        for metric, label, b, n, limit in (
                ("ttft_p95_ms", "TTFT p95", base.ttft_ms, new.ttft_ms, settings.max_ttft_regression),
                ("tpot_p95_ms", "TPOT p95", base.tpot_ms, new.tpot_ms, settings.max_tpot_regression)):
            checks.append(p95_regression(b, n, limit=limit, settings=settings, key=f"{base.key}: {label}",
                                         metric=metric, family=family))
        if base.good_requests is None and new.good_requests is None:
            continue
        key = f"{base.key}: attainment"
        judgeable, why = _attainment_judgeable(base, new)
        if why is not None:
            checks.append(GateCheck(key=key, metric="attainment", base=_share(base), new=_share(new), change=None,
                                    low=None, high=None, regressed=False, judged=False, reason=why))
            continue
        checks.append(attainment_regression(int(base.good_requests or 0), base.requests,
                                            int(new.good_requests or 0), new.requests, settings=settings,
                                            key=key, family=family))
    checks.extend(boundaries)
    return GateResult(checks=tuple(checks), notes=tuple(notes), confidence=settings.confidence)


def scenario_name(run: Any) -> str | None:
    """The scenario's ``name``: from the copy in the run directory, else the stem of run.json's scenario path."""
    copy = Path(run.run_dir) / "scenario.yaml"
    if copy.is_file():
        try:
            import yaml

            data = yaml.safe_load(copy.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("name"), str) and data["name"]:
                return str(data["name"])
        except (OSError, ValueError, yaml.YAMLError):
            pass
    path = run.info.scenario_path
    return Path(path).stem if path else None


def _check_usable(base: Any, new: Any) -> list[str]:
    """Raise :class:`GateInputError` when the runs cannot be gated; else the notes their state calls for."""
    from analysis.load import completeness

    notes: list[str] = []
    for tag, run in (("BASE", base), ("NEW", new)):
        state = completeness(run)
        if state.status == "failed":
            failure = run.info.failure
            raise GateInputError(f"{tag} run {run.name} failed" + (f" ({' '.join(str(failure).split())})"
                                                                   if failure else "")
                                 + "; a failed run cannot be gated")
        if not len(run.frame):
            raise GateInputError(f"{tag} run {run.name} has no request records; nothing to gate on")
        if state.partial:
            notes.append(f"{tag} is a {state.label} ({' '.join(state.reasons)}): only the stages it has are judged.")
    names = scenario_name(base), scenario_name(new)
    if None not in names and names[0] != names[1]:
        raise GateInputError(f"runs of different scenarios: BASE {base.name} ran {names[0]!r}, NEW {new.name} "
                             f"ran {names[1]!r}; gate runs of the same scenario")
    if None in names:
        unknown = " and ".join(t for t, n in zip(("BASE", "NEW"), names) if n is None)
        notes.append(f"The scenario of {unknown} is unknown (no scenario.yaml or scenario path), so whether both "
                     "ran the same scenario was not checked.")
    shas = base.info.scenario_sha256, new.info.scenario_sha256
    if None not in shas and shas[0] != shas[1]:
        notes.append(f"The scenario {names[0] or names[1] or ''} was edited between the runs (sha256 "
                     f"{shas[0][:12]} vs {shas[1][:12]}): stages are compared where pass and load match.")
    return notes


def _stage_samples(run: Any, rows: Sequence[TableRow], rule: WindowRule) -> dict[int, StageSamples]:
    """Per stage index, the samples behind its table row (the key is filled in by the caller)."""
    from analysis.table import window_samples

    ttft = run.frame["ttft_ms"].to_numpy(dtype=float, na_value=np.nan)
    tpot = run.frame["tpot_ms"].to_numpy(dtype=float, na_value=np.nan)
    by_row = {r.stage_index: r for r in rows}
    out: dict[int, StageSamples] = {}
    for w in window_samples(run, rule=rule):
        row = by_row.get(w.stage.stage_index)
        if row is None:
            continue
        judged = row.goodput.attainment is not None and row.goodput.good_requests is not None
        thresholds = thresholds_from_slos(dict(w.stage.slos or {}))
        out[w.stage.stage_index] = StageSamples(
            key="", ttft_ms=ttft[w.ok], tpot_ms=tpot[w.ok], requests=int(row.counts.requests),
            good_requests=int(row.goodput.good_requests) if judged else None,
            thresholds=thresholds if judged else None)
    return out


def _boundary_checks(base: Any, new: Any, base_rows: Sequence[TableRow],
                     new_rows: Sequence[TableRow]) -> list[GateCheck]:
    from analysis.boundary import pass_boundaries
    from analysis.search import search_findings

    def searched(run: Any, rows: Sequence[TableRow]) -> dict[str, Any]:
        return {b.pass_name: b for b in pass_boundaries(rows, search_findings(rows, run.searches))
                if b.kind == "search"}

    base_b, new_b = searched(base, base_rows), searched(new, new_rows)
    return [boundary_regression(b.passed_level, b.failed_level, new_b[name].passed_level, new_b[name].failed_level,
                                unit=b.unit, key=f"{name}: boundary")
            for name, b in base_b.items() if name in new_b]


def _listing(keys: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def gate_runs(base: Any, new: Any, *, settings: GateSettings = GateSettings(), rule: WindowRule = WindowRule(),
              rows: tuple[Sequence[TableRow], Sequence[TableRow]] | None = None) -> GateResult:
    """Is ``new`` worse than ``base`` beyond noise? Every matched stage's checks and every search's boundary.

    ``base``/``new``: loaded runs (:func:`analysis.load.load_run`); ``rows``: their envelope
    tables when already computed with ``rule``. Raises :class:`GateInputError` for unusable input.
    """
    from analysis.compare import compare_rows
    from analysis.table import envelope_table

    notes = _check_usable(base, new)
    base_rows, new_rows = rows if rows is not None else (envelope_table(base, rule=rule),
                                                         envelope_table(new, rule=rule))
    samples = _stage_samples(base, base_rows, rule), _stage_samples(new, new_rows, rule)
    pairs: list[tuple[StageSamples, StageSamples]] = []
    only: dict[str, list[str]] = {"BASE": [], "NEW": []}
    for p in compare_rows(base_rows, new_rows):
        key = f"{p.pass_name} / {p.level}"
        if p.a is None or p.b is None:
            only["BASE" if p.b is None else "NEW"].append(key)
            continue
        sa, sb = samples[0].get(p.a.stage_index), samples[1].get(p.b.stage_index)
        if sa is None or sb is None:
            continue
        pairs.append((dataclasses.replace(sa, key=key), dataclasses.replace(sb, key=key)))
    boundaries = _boundary_checks(base, new, base_rows, new_rows)
    if not pairs and not boundaries:
        raise GateInputError(f"BASE {base.name} and NEW {new.name} have no stage in common (same pass and load "
                             "level); nothing to compare")
    for tag, keys in only.items():
        if keys:
            notes.append(f"Only in {tag}, so not judged: {_listing(keys)}.")
    result = gate_stages(pairs, settings=settings, boundaries=boundaries, notes=notes)
    if not any(c.judged for c in result.checks):
        raise GateInputError(f"no check could be judged: the {len(pairs)} stage(s) in common have fewer than "
                             f"{MIN_LATENCY_SAMPLES} successful requests on a side and no judged attainment")
    return result

