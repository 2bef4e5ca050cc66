"""The statistics of a regression gate: is run NEW worse than run BASE beyond measurement noise?

Each check compares one quantity of one stage (paired as :mod:`analysis.compare`
pairs them) and is *regressed* only when even the optimistic end of its
confidence interval is worse than allowed; a check with too little data is not
judged and never regresses.

- p95 latency (:func:`p95_regression`): bootstrap of p95(new) / p95(base) - 1;
  regressed when its lower one-sided confidence bound exceeds the allowed
  growth. With a true change exactly at that limit it regresses in at most
  about one minus that confidence of runs. The bootstrap is exact and cheap: a
  resample's p95 is an interpolation of two adjacent order statistics, whose
  joint distribution is drawn directly (Beta-distributed uniform order
  statistics mapped onto the sorted sample) instead of resampling every value.
- Attainment (:func:`attainment_regression`): Newcombe's hybrid score interval
  of new - base at two-sided confidence; regressed when its upper end is
  below minus the allowed drop. The allowed drop is 0 by default, so two runs
  of the same server sit exactly at the limit; the stricter one-sided level,
  ``(1 + confidence) / 2``, keeps their false alarms near half the budget.
- Search boundary (:func:`boundary_regression`): NEW's bracket wholly below BASE's.

Multiple comparisons: a gate makes many checks (every matched stage times
TTFT, TPOT and attainment), and any one regressed check fails it. So that two
runs of the same server fail at most ``1 - confidence`` of the time overall,
the latency and attainment checks a gate judges share that error budget
equally (Bonferroni): with ``family`` judged checks, each is held to
``1 - (1 - confidence) / family`` (:func:`check_confidence`). Holm's step-down
would flag more checks once one has failed, but never changes whether the
gate fails, so the simpler rule and its simultaneous intervals are used.
Boundary checks compare two brackets the searches already drew at their own
confidence (a false alarm needs one of their confident verdicts to be wrong);
they carry no p-value and are not part of the family.

Pure: numpy and scipy only; no files, no printing.
"""

from __future__ import annotations

import functools
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import numpy as np

from envelope.attainment import wilson_interval

__all__ = [
    "MIN_LATENCY_SAMPLES",
    "GateSettings",
    "check_confidence",
    "GateCheck",
    "GateResult",
    "p95_regression",
    "attainment_regression",
    "boundary_regression",
]

# Fewer values than this a side, and a p95 is judged on the top value or two alone. Even at 20 the
# bootstrap interval is a little narrow: with a change exactly at the limit, a 99.2% bound (0.95
# shared over 6 checks) is crossed 1.6x as often as it should be at 20 values a side, 1.2x at 30,
# and less often than it should from 40 on. Short stages (a CI scenario's 30-100 requests) need it.
MIN_LATENCY_SAMPLES = 20
# A gate asks for the same few intervals again and again (scipy's binomtest takes about a millisecond each).
_wilson = functools.lru_cache(maxsize=4096)(wilson_interval)


@dataclass(frozen=True, slots=True, kw_only=True)
class GateSettings:
    """How sure the gate must be, and how much worse NEW may be before it counts.

    ``confidence``: of the whole gate (see the module docstring on multiple
    comparisons). ``max_ttft_regression``/``max_tpot_regression``: relative (0.10:
    NEW's p95 may be 10% above BASE's); ``max_attainment_drop``: absolute share
    (0.02: two points). ``resamples``: bootstrap draws per side and check (cheap:
    the bootstrap costs the same for 50 or 50,000 requests).
    """

    confidence: float = 0.95
    max_ttft_regression: float = 0.10
    max_tpot_regression: float = 0.10
    max_attainment_drop: float = 0.0
    resamples: int = 10_000
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
    (p95: each end a one-sided bound at the check's ``confidence``; attainment: the
    two-sided interval at it; boundary: what the two brackets allow), or None. ``judged``: False when the
    data could not decide (then ``regressed`` is False and ``reason`` says why). ``confidence``: the
    level this check was held to (the gate's, shared out over the family), None for a boundary.
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
    confidence: float | None = None


def check_confidence(confidence: float, family: int = 1) -> float:
    """The level each of ``family`` judged checks is held to so that all hold together at ``confidence``."""
    return 1.0 - (1.0 - confidence) / max(int(family), 1)


def _p95_bootstrap(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """p95 (numpy's linear interpolation) of ``resamples`` bootstrap resamples of ``values``, drawn exactly.

    A resample is ``n`` draws ``sorted[floor(n * U)]`` with uniform ``U``; its p95 interpolates
    its order statistics ``j`` and ``j + 1``, so only those two uniforms' order statistics are
    drawn: ``U_(j) ~ Beta(j, n - j + 1)`` and, given it, ``U_(j+1) = U_(j) + (1 - U_(j)) Beta(1, n - j)``.
    """
    ordered = np.sort(values)
    n = ordered.size
    h = (n - 1) * 0.95
    lo = int(math.floor(h))
    frac = h - lo
    j = lo + 1  # 1-based rank of the lower order statistic
    u_lo = rng.beta(j, n - j + 1, size=resamples)
    u_hi = u_lo + (1.0 - u_lo) * rng.beta(1, n - j, size=resamples)
    a = ordered[np.minimum((u_lo * n).astype(np.int64), n - 1)]
    b = ordered[np.minimum((u_hi * n).astype(np.int64), n - 1)]
    return a + frac * (b - a)


def _finite(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=float).ravel()
    return v[np.isfinite(v)]


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def p95_regression(base_ms: np.ndarray, new_ms: np.ndarray, *, limit: float, settings: GateSettings,
                   key: str, metric: str, family: int = 1) -> GateCheck:
    """Has the p95 of a latency grown by more than ``limit`` (relative) beyond noise?

    Bootstraps the change p95(new) / p95(base) - 1, resampling each side with
    replacement (seeded); regressed when its lower one-sided bound at
    :func:`check_confidence` (``family``: the judged checks sharing the gate's
    confidence) exceeds ``limit``. Non-finite samples (failed requests, one-token
    TPOT) are dropped; fewer than :data:`MIN_LATENCY_SAMPLES` on either side: not judged.
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
    boot_base = _p95_bootstrap(base, settings.resamples, rng)
    boot_new = _p95_bootstrap(new, settings.resamples, rng)
    with np.errstate(divide="ignore", invalid="ignore"):
        changes = boot_new / boot_base - 1.0
    changes = changes[np.isfinite(changes)]
    level = check_confidence(settings.confidence, family)
    low, high = (float(v) for v in np.quantile(changes, [1.0 - level, level]))
    change = p_new / p_base - 1.0
    conf = _conf(level)
    regressed = low > limit
    if regressed:
        reason = f"p95 {_pct(change)}: at least {_pct(low)} at {conf} confidence, beyond the allowed {_pct(limit)}"
    else:
        reason = f"p95 {_pct(change)}: could be as little as {_pct(low)} at {conf} confidence, " \
                 f"not beyond the allowed {_pct(limit)}"
    return GateCheck(key=key, metric=metric, base=p_base, new=p_new, change=change, low=low, high=high,
                     regressed=regressed, reason=reason, confidence=level)


def _conf(level: float) -> str:
    return f"{100 * level:.4g}%"


def attainment_regression(base_good: int, base_n: int, new_good: int, new_n: int, *, settings: GateSettings,
                          key: str, family: int = 1) -> GateCheck:
    """Has the share of good requests dropped by more than ``max_attainment_drop`` beyond noise?

    The interval of new - base is Newcombe's hybrid score interval (his method 10)
    at two-sided :func:`check_confidence` (``family`` as for :func:`p95_regression`),
    built from each side's Wilson interval; regressed when its upper end is below
    ``-max_attainment_drop``. Nothing judged on either side: not judged.
    """
    if base_n <= 0 or new_n <= 0:
        return GateCheck(key=key, metric="attainment", base=base_good / base_n if base_n > 0 else None,
                         new=new_good / new_n if new_n > 0 else None, change=None, low=None, high=None,
                         regressed=False, judged=False,
                         reason=f"not judged: {base_n} base and {new_n} new requests judged")
    p_base, p_new = base_good / base_n, new_good / new_n
    level = check_confidence(settings.confidence, family)
    lo_base, hi_base = _wilson(int(base_good), int(base_n), confidence=level)
    lo_new, hi_new = _wilson(int(new_good), int(new_n), confidence=level)
    change = p_new - p_base
    low = change - math.hypot(p_new - lo_new, hi_base - p_base)
    high = change + math.hypot(hi_new - p_new, p_base - lo_base)
    allowed = settings.max_attainment_drop
    conf = _conf(level)
    regressed = high < -allowed
    drop = f"{100 * change:+.1f} points ({100 * p_base:.1f}% -> {100 * p_new:.1f}%)"
    if regressed:
        reason = f"attainment {drop}: down at least {100 * -high:.1f} points at {conf} confidence, " \
                 f"beyond the allowed {100 * allowed:.1f} points"
    else:
        reason = f"attainment {drop}: at best {100 * high:+.1f} points at {conf} confidence, " \
                 f"not a drop beyond the allowed {100 * allowed:.1f} points"
    return GateCheck(key=key, metric="attainment", base=p_base, new=p_new, change=change, low=low, high=high,
                     regressed=regressed, reason=reason, confidence=level)


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
    """Every check of a gate; regressed when any check is.

    ``notes``: sentences the reader needs beside the table (a partial run, a
    scenario edited between the runs, stages only one run has). ``confidence``:
    the gate's overall level, shared out over the judged statistical checks.
    """

    checks: tuple[GateCheck, ...]
    notes: tuple[str, ...] = ()
    confidence: float = 0.95

    @property
    def regressed(self) -> bool:
        return any(c.regressed for c in self.checks)

    @property
    def exit_code(self) -> int:
        """1 when any check regressed, else 0 (2, unusable input, is raised before a result exists)."""
        return 1 if self.regressed else 0

    @property
    def family(self) -> int:
        """How many judged checks share the gate's confidence (the latency and attainment ones)."""
        return sum(c.judged and c.confidence is not None for c in self.checks)

    def markdown(self) -> str:
        """A verdict line, the notes and how false alarms are bounded, then one table row per check."""
        bad = sum(c.regressed for c in self.checks)
        unjudged = sum(not c.judged for c in self.checks)
        tail = f"; {unjudged} not judged" if unjudged else ""
        if bad:
            verdict = f"**Gate: FAIL**: {bad} of {len(self.checks)} checks regressed beyond noise{tail}."
        else:
            verdict = f"**Gate: pass**: no regression beyond noise in {len(self.checks)} checks{tail}."
        lines = [verdict, ""]
        family, overall = self.family, f"{100 * self.confidence:g}%"
        if family:
            each = _conf(check_confidence(self.confidence, family))
            lines.append(f"- False alarms: the {family} judged latency and attainment checks share {overall} "
                         f"confidence (Bonferroni), so each is held to {each}; two runs of the same server "
                         f"fail these checks at most {100 * (1 - self.confidence):g}% of the time.")
        lines += [f"- {note}" for note in self.notes]
        if family or self.notes:
            lines.append("")
        lines += ["| check | base | new | change | interval | verdict | reason |", "|---|---|---|---|---|---|---|"]
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
