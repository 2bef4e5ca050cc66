"""The statistics of a regression gate: is run NEW worse than run BASE beyond measurement noise?

Each check compares one quantity of one stage (paired as :mod:`analysis.compare`
pairs them) and is *regressed* only when even the optimistic end of its
confidence interval is worse than allowed; a check with too little data is not
judged and never regresses.

- p95 latency (:func:`p95_regression`): bootstrap of p95(new) / p95(base) - 1;
  regressed when its lower one-sided ``confidence`` bound exceeds the allowed
  growth. With a true change exactly at that limit it regresses in at most
  about ``1 - confidence`` of runs.
- Attainment (:func:`attainment_regression`): Newcombe's hybrid score interval
  of new - base at two-sided ``confidence``; regressed when its upper end is
  below minus the allowed drop. The allowed drop is 0 by default, so two runs
  of the same server sit exactly at the limit; the stricter one-sided level,
  ``(1 + confidence) / 2``, keeps their false alarms near 2% at 95%.
- Search boundary (:func:`boundary_regression`): NEW's bracket wholly below BASE's.

Pure: numpy and scipy only; no files, no printing.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import numpy as np

from envelope.attainment import wilson_interval

__all__ = [
    "MIN_LATENCY_SAMPLES",
    "GateSettings",
    "GateCheck",
    "GateResult",
    "p95_regression",
    "attainment_regression",
    "boundary_regression",
]

MIN_LATENCY_SAMPLES = 20
# Bootstrap resamples are drawn in chunks of about this many values, so a stage
# with many requests does not allocate a (resamples, n) array of gigabytes.
_CHUNK_VALUES = 4_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class GateSettings:
    """How sure the gate must be, and how much worse NEW may be before it counts.

    ``max_ttft_regression``/``max_tpot_regression``: relative (0.10: NEW's p95 may be
    10% above BASE's); ``max_attainment_drop``: absolute share (0.02: two points).
    """

    confidence: float = 0.95
    max_ttft_regression: float = 0.10
    max_tpot_regression: float = 0.10
    max_attainment_drop: float = 0.0
    resamples: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.5 < self.confidence < 1.0:
            raise ValueError(f"confidence must be between 0.5 and 1, got {self.confidence}")
        if self.resamples < 100:
            raise ValueError(f"resamples must be at least 100, got {self.resamples}")
        for name in ("max_ttft_regression", "max_tpot_regression", "max_attainment_drop"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class GateCheck:
    """One quantity of one stage, BASE vs NEW.

    ``change``: relative (new / base - 1) for latencies, absolute (new - base) for
    attainment and the boundary. ``low``/``high``: the interval the verdict used
    (p95: each end a one-sided ``confidence`` bound; attainment: the two-sided
    ``confidence`` interval; boundary: what the two brackets allow), or None. ``judged``: False when the
    data could not decide (then ``regressed`` is False and ``reason`` says why).
    """

    key: str
    metric: str
    base: float | None
    new: float | None
    change: float | None
    low: float | None
    high: float | None
    regressed: bool
    reason: str
    judged: bool = True


def _p95_chunks(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """p95 of ``resamples`` bootstrap resamples of ``values`` (with replacement)."""
    n = values.size
    rows = max(1, _CHUNK_VALUES // n)
    out = np.empty(resamples)
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = np.percentile(values[idx], 95, axis=1)
    return out


def _finite(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=float).ravel()
    return v[np.isfinite(v)]


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def p95_regression(base_ms: np.ndarray, new_ms: np.ndarray, *, limit: float, settings: GateSettings,
                   key: str, metric: str) -> GateCheck:
    """Has the p95 of a latency grown by more than ``limit`` (relative) beyond noise?

    Bootstraps the change p95(new) / p95(base) - 1, resampling each side with
    replacement (seeded); regressed when its lower one-sided ``confidence`` bound
    exceeds ``limit``. Non-finite samples (failed requests, one-token TPOT) are
    dropped; fewer than :data:`MIN_LATENCY_SAMPLES` on either side: not judged.
    """
    base, new = _finite(base_ms), _finite(new_ms)
    if base.size < MIN_LATENCY_SAMPLES or new.size < MIN_LATENCY_SAMPLES:
        return GateCheck(key=key, metric=metric, base=float(np.percentile(base, 95)) if base.size else None,
                         new=float(np.percentile(new, 95)) if new.size else None, change=None, low=None, high=None,
                         regressed=False, judged=False,
                         reason=f"not judged: {base.size} base and {new.size} new samples, "
                                f"need at least {MIN_LATENCY_SAMPLES} each")
    p_base, p_new = float(np.percentile(base, 95)), float(np.percentile(new, 95))
    if p_base <= 0.0:
        return GateCheck(key=key, metric=metric, base=p_base, new=p_new, change=None, low=None, high=None,
                         regressed=False, judged=False, reason="not judged: base p95 is not positive")
    rng = np.random.default_rng(settings.seed)
    boot_base = _p95_chunks(base, settings.resamples, rng)
    boot_new = _p95_chunks(new, settings.resamples, rng)
    with np.errstate(divide="ignore", invalid="ignore"):
        changes = boot_new / boot_base - 1.0
    changes = changes[np.isfinite(changes)]
    alpha = 1.0 - settings.confidence
    low, high = (float(v) for v in np.quantile(changes, [alpha, settings.confidence]))
    change = p_new / p_base - 1.0
    conf = f"{100 * settings.confidence:g}%"
    regressed = low > limit
    if regressed:
        reason = f"p95 {_pct(change)}: at least {_pct(low)} at {conf} confidence, beyond the allowed {_pct(limit)}"
    else:
        reason = f"p95 {_pct(change)}: could be as little as {_pct(low)} at {conf} confidence, " \
                 f"not beyond the allowed {_pct(limit)}"
    return GateCheck(key=key, metric=metric, base=p_base, new=p_new, change=change, low=low, high=high,
                     regressed=regressed, reason=reason)


def attainment_regression(base_good: int, base_n: int, new_good: int, new_n: int, *, settings: GateSettings,
                          key: str) -> GateCheck:
    """Has the share of good requests dropped by more than ``max_attainment_drop`` beyond noise?

    The interval of new - base is Newcombe's hybrid score interval (his method 10)
    at two-sided ``confidence``, built from each side's Wilson interval; regressed
    when its upper end is below ``-max_attainment_drop``. Nothing judged on either side: not judged.
    """
    if base_n <= 0 or new_n <= 0:
        return GateCheck(key=key, metric="attainment", base=base_good / base_n if base_n > 0 else None,
                         new=new_good / new_n if new_n > 0 else None, change=None, low=None, high=None,
                         regressed=False, judged=False,
                         reason=f"not judged: {base_n} base and {new_n} new requests judged")
    p_base, p_new = base_good / base_n, new_good / new_n
    lo_base, hi_base = wilson_interval(base_good, base_n, confidence=settings.confidence)
    lo_new, hi_new = wilson_interval(new_good, new_n, confidence=settings.confidence)
    change = p_new - p_base
    low = change - math.hypot(p_new - lo_new, hi_base - p_base)
    high = change + math.hypot(hi_new - p_new, p_base - lo_base)
    allowed = settings.max_attainment_drop
    conf = f"{100 * settings.confidence:g}%"
    regressed = high < -allowed
    drop = f"{100 * change:+.1f} points ({100 * p_base:.1f}% -> {100 * p_new:.1f}%)"
    if regressed:
        reason = f"attainment {drop}: down at least {100 * -high:.1f} points at {conf} confidence, " \
                 f"beyond the allowed {100 * allowed:.1f} points"
    else:
        reason = f"attainment {drop}: at best {100 * high:+.1f} points at {conf} confidence, " \
                 f"not a drop beyond the allowed {100 * allowed:.1f} points"
    return GateCheck(key=key, metric="attainment", base=p_base, new=p_new, change=change, low=low, high=high,
                     regressed=regressed, reason=reason)


def boundary_regression(base_low: float | None, base_high: float | None, new_low: float | None,
                        new_high: float | None, *, unit: str, key: str) -> GateCheck:
    """Has the search boundary moved down for certain?

    Each run brackets its boundary between ``low`` (the highest level that passed)
    and ``high`` (the lowest that failed). Regressed when NEW failed at or below a
    level BASE passed (``new_high <= base_low``: the brackets do not overlap). Needs
    ``base_low`` and ``new_high``; without either, not judged. ``base``/``new`` are
    the ``low`` ends; ``low``/``high`` bound new - base by the two brackets.
    """
    def sub(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else float(a) - float(b)

    common = dict(key=key, metric="boundary", base=sub(base_low, 0.0), new=sub(new_low, 0.0),
                  change=sub(new_low, base_low), low=sub(new_low, base_high), high=sub(new_high, base_low))

    def bracket(low: float | None, high: float | None) -> str:
        return f"passed {'nothing' if low is None else f'{low:g} {unit}'}, " \
               f"failed {'nothing' if high is None else f'{high:g} {unit}'}"

    said = f"base {bracket(base_low, base_high)}; new {bracket(new_low, new_high)}"
    if base_low is None or new_high is None:
        why = "base passed no level" if base_low is None else "new failed no level"
        return GateCheck(**common, regressed=False, judged=False, reason=f"not judged: {why} ({said})")
    if new_high <= base_low:
        return GateCheck(**common, regressed=True,
                         reason=f"new failed at {new_high:g} {unit}, where base passed up to {base_low:g} ({said})")
    return GateCheck(**common, regressed=False, reason=f"brackets overlap or new is higher ({said})")


def _value(metric: str, v: float | None) -> str:
    if v is None:
        return "-"
    if metric == "attainment":
        return f"{100 * v:.1f}%"
    if metric.endswith("_ms"):
        return f"{v:.1f} ms"
    return f"{v:g}"


def _change(metric: str, v: float | None) -> str:
    if v is None:
        return "-"
    if metric == "attainment":
        return f"{100 * v:+.1f} pt"
    if metric.endswith("_ms"):
        return _pct(v)
    return f"{v:+g}"


@dataclass(frozen=True, slots=True, kw_only=True)
class GateResult:
    """Every check of a gate; regressed when any check is."""

    checks: tuple[GateCheck, ...]

    @property
    def regressed(self) -> bool:
        return any(c.regressed for c in self.checks)

    def markdown(self) -> str:
        """A verdict line, then one table row per check."""
        bad = sum(c.regressed for c in self.checks)
        unjudged = sum(not c.judged for c in self.checks)
        tail = f"; {unjudged} not judged" if unjudged else ""
        if bad:
            verdict = f"**Gate: FAIL**: {bad} of {len(self.checks)} checks regressed beyond noise{tail}."
        else:
            verdict = f"**Gate: pass**: no regression beyond noise in {len(self.checks)} checks{tail}."
        lines = [verdict, "", "| check | base | new | change | interval | verdict | reason |",
                 "|---|---|---|---|---|---|---|"]
        for c in self.checks:
            interval = "-" if c.low is None and c.high is None else \
                f"[{_change(c.metric, c.low)}, {_change(c.metric, c.high)}]"
            state = "REGRESSED" if c.regressed else ("not judged" if not c.judged else "ok")
            cells = [c.key, _value(c.metric, c.base), _value(c.metric, c.new), _change(c.metric, c.change),
                     interval, state, c.reason]
            lines.append("| " + " | ".join(s.replace("|", "\\|") for s in cells) + " |")
        return "\n".join(lines) + "\n"

    def junit_xml(self, *, suite: str = "envelope-gate") -> str:
        """JUnit XML: one testcase per check, ``<failure>`` when regressed, ``<skipped>`` when not judged."""
        root = ET.Element("testsuite", name=suite, tests=str(len(self.checks)),
                          failures=str(sum(c.regressed for c in self.checks)), errors="0",
                          skipped=str(sum(not c.judged for c in self.checks)))
        for c in self.checks:
            case = ET.SubElement(root, "testcase", classname=f"{suite}.{c.metric}", name=c.key)
            if c.regressed:
                ET.SubElement(case, "failure", message=c.reason, type=c.metric).text = c.reason
            elif not c.judged:
                ET.SubElement(case, "skipped", message=c.reason)
            else:
                ET.SubElement(case, "system-out").text = c.reason
        return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
