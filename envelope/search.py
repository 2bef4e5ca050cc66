"""The SLO search: find the highest load at which a server still meets its SLOs, with confidence.

A scenario pass with ``search:`` instead of ``stages:`` runs *probes*: ordinary
stages (closed loop: ``users``; open loop: ``rate_per_s``) whose level is chosen
from the probes before them. This module is the part that decides, and it is
pure: no Locust, no clock, no I/O. The Locust side (``locustfiles/search_driver.py``)
runs a probe, counts its good and judged requests (:mod:`envelope.attainment`) and
asks :func:`next_probe` what to do; the analysis recomputes the answer from the
records with :func:`bracket`.

The rules
---------
Every probe at one level is pooled (good and judged summed) and judged by the
Wilson interval of its attainment at ``confidence``: it *passed* when the whole
interval is at or above the target, *failed* when it is wholly below, and is
*unresolved* when it straddles the target.

- **Levels.** ``users`` levels are whole users; ``rate`` levels are rounded to
  three significant digits. No level is below ``min`` or above ``max``.
- **Grow, shrink.** The first probe is at ``start``. While nothing has failed,
  the next level is the highest one so far times ``growth`` (capped at ``max``);
  when ``max`` itself passes, the search is over (*above max*). While nothing
  has passed, the next level is the lowest so far divided by ``growth``
  (floored at ``min``); when ``min`` fails, it is over (*below min*).
- **Repeat.** A probe whose pooled interval straddles the target is run once
  more at the same level. If it is still unresolved after two probes, the search
  goes on as if it had passed (point estimate at or above target) or failed
  (below), but such a level is never an end of the answer: :func:`bracket`
  lists it as unresolved.
- **Bisect.** Once there is a pass and a fail, the next level is the midpoint
  (on the level grid) between the highest confident pass below the lowest
  confident fail and that fail. Where either end is missing, the level taken as
  passing or failing from its point estimate stands in for it. When the
  midpoint is a level already probed twice (or is closer to one than half the
  precision, at least one user), the nearest level inside the gap that keeps
  that distance from every level probed twice is taken instead: near an
  unresolved level the best answer is a pass and a fail on either side of it,
  so this tries its neighbours at small levels, and does not crawl one user at
  a time at large ones. The search is over when the ends are
  at most ``max(precision_abs, precision_rel * highest pass)`` apart, or when no
  level is left to probe between them.
- **Confident ends.** When the gap is closed but an end is only a point
  estimate, the search looks past that end (by the same half precision, at least
  one user) for a level that fails, or passes, with confidence, so that the
  answer has two confident ends where the budget allows.
- **Budget.** A probe is proposed only while ``elapsed_s + probe_s <= budget_s``
  and fewer than ``max_probes`` probes have run; so the search never runs more
  than ``max_probes`` probes. (A probe the driver holds longer than ``probe_s``
  to judge ``min_requests`` requests can take the total past ``budget_s`` by at
  most the excess of its last probe.)

With a curve that is not monotone the search finds *a* level that passes next
to one that fails, not necessarily the first; a confident pass above the lowest
confident fail is reported (:attr:`Bracket.non_monotone`), never trusted.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from enum import StrEnum
from itertools import pairwise
from typing import Annotated, Literal, Sequence

import numpy as np
from pydantic import Field, model_validator

from envelope.attainment import Attainment
from envelope.config import FieldError, StrictModel

__all__ = [
    "probe_sample",
    "probe_sends_until",
    "requests_to_pass",
    "min_requests_for",
    "SearchSpec",
    "Verdict",
    "ProbeResult",
    "LevelResult",
    "Decision",
    "Bracket",
    "snap_level",
    "pooled",
    "next_probe",
    "bracket",
]


class SearchSpec(StrictModel):
    """A pass's ``search:`` block: what level to search, where, how precisely, for how long.

    ``over``: ``users`` (closed loop; levels are whole users) or ``rate``
    (open loop; levels are requests per second). The search starts at
    ``start``, multiplies by ``growth`` while probes pass, then bisects between
    the highest level that passed and the lowest that failed until they are at
    most ``max(precision_abs, precision_rel * highest passing)`` apart.
    A probe holds its level for ``probe_s`` (longer, up to ``max_probe_s``,
    until ``min_requests`` requests are judged); the first ``settle_s`` of it
    (default a quarter) is not judged. The search stops early when the next
    probe would exceed ``budget_s`` or ``max_probes``.
    """

    over: Literal["users", "rate"] = "users"
    start: Annotated[float, Field(gt=0)] = 4
    growth: Annotated[float, Field(gt=1)] = 2.0
    min: Annotated[float, Field(gt=0)] = 1
    max: Annotated[float, Field(gt=0)] = 256
    confidence: Annotated[float, Field(gt=0.5, lt=1)] = 0.95
    precision_abs: Annotated[float, Field(gt=0)] | None = None  # default: 1 user, or 0.1 requests/s
    precision_rel: Annotated[float, Field(ge=0, lt=1)] = 0.10
    # None: as many as a probe needs to pass with confidence when every request is good (73 at a 0.95
    # target and 95% confidence; see requests_to_pass); fewer can only ever be unresolved or fail
    min_requests: Annotated[int, Field(ge=1)] | None = None
    probe_s: Annotated[float, Field(gt=0)] = 20.0
    max_probe_s: Annotated[float, Field(gt=0)] | None = None  # default: 3 x probe_s
    settle_s: Annotated[float, Field(ge=0)] | None = None  # default: probe_s / 4
    budget_s: Annotated[float, Field(gt=0)] = 300.0
    max_probes: Annotated[int, Field(ge=1)] = 15
    # open loop only: how arrivals are drawn, and an optional cap on requests in flight
    arrival: Literal["constant", "poisson", "gamma"] | None = None
    max_concurrency: Annotated[int, Field(strict=True, gt=0)] | None = None

    @model_validator(mode="after")
    def _check(self) -> "SearchSpec":
        if self.min > self.max:
            raise FieldError("'min' must be at most 'max'", at=("min",))
        if not self.min <= self.start <= self.max:
            raise FieldError("'start' must lie between 'min' and 'max'", at=("start",))
        if self.over == "users":
            for key in ("start", "min", "max"):
                if float(getattr(self, key)) != int(getattr(self, key)):
                    raise FieldError(f"{key!r} counts users: a whole number", at=(key,))
            for key in ("arrival", "max_concurrency"):
                if getattr(self, key) is not None:
                    raise FieldError(f"{key!r} applies to 'over: rate' searches", at=(key,))
        if self.max_probe_s is not None and self.max_probe_s < self.probe_s:
            raise FieldError("'max_probe_s' must be at least 'probe_s'", at=("max_probe_s",))
        if self.settle_s is not None and self.settle_s >= self.probe_s:
            raise FieldError("'settle_s' must be shorter than 'probe_s'", at=("settle_s",))
        return self

    @property
    def precision_floor(self) -> float:
        if self.precision_abs is not None:
            return float(self.precision_abs)
        return 1.0 if self.over == "users" else 0.1

    def precision_at(self, level: float) -> float:
        """How close the two ends must be when the highest passing level is ``level``."""
        return max(self.precision_floor, self.precision_rel * level)

    @property
    def probe_cap_s(self) -> float:
        return float(self.max_probe_s) if self.max_probe_s is not None else 3.0 * self.probe_s

    @property
    def settle_for_s(self) -> float:
        return float(self.settle_s) if self.settle_s is not None else self.probe_s / 4.0

    def scaled(self, scale: float, *, min_probe_s: float = 0.0) -> "SearchSpec":
        """Shorter probes and budget for ``--quick`` (probes no shorter than ``min_probe_s``, never longer)."""
        probe = min(self.probe_s, max(min_probe_s, self.probe_s * scale))
        factor = probe / self.probe_s
        return self.model_copy(update={
            "probe_s": probe,
            "max_probe_s": None if self.max_probe_s is None else self.max_probe_s * factor,
            "settle_s": None if self.settle_s is None else self.settle_s * factor,
            "budget_s": self.budget_s * scale,
        })


# -- levels ------------------------------------------------------------------------------------


def snap_level(spec: SearchSpec, level: float) -> float:
    """``level`` on the search's grid: whole users, or requests/s to 3 significant digits; within [min, max]."""
    low, high = float(spec.min), float(spec.max)
    if spec.over == "users":
        return min(max(float(math.floor(level + 0.5)), low), high)
    level = min(max(level, low), high)
    snapped = float(f"{level:.3g}")
    if not low <= snapped <= high:  # min or max itself has more digits: the nearest 3-digit level inside
        grain = _grain(spec, level)
        inward = math.floor(level / grain) if snapped > high else math.ceil(level / grain)
        snapped = float(f"{inward * grain:.3g}")
    return snapped if low <= snapped <= high else level


def _grain(spec: SearchSpec, level: float) -> float:
    """The smallest step between two grid levels near ``level``."""
    if spec.over == "users":
        return 1.0
    return 10.0 ** (math.floor(math.log10(abs(level))) - 2) if level else 0.001


def _up(spec: SearchSpec, level: float) -> float:
    """The next level up by ``growth`` (at least one grid step), capped at max."""
    nxt = snap_level(spec, level * spec.growth)
    return nxt if nxt > level else snap_level(spec, level + _grain(spec, level))


def _down(spec: SearchSpec, level: float) -> float:
    """The next level down by ``growth`` (at least one grid step), floored at min."""
    nxt = snap_level(spec, level / spec.growth)
    return nxt if nxt < level else snap_level(spec, level - _grain(spec, level))


# -- results -----------------------------------------------------------------------------------


class Verdict(StrEnum):
    """A level's verdict at the search's confidence."""

    PASS = "pass"  # the whole interval at or above the target
    FAIL = "fail"  # the whole interval below it
    UNRESOLVED = "unresolved"  # the interval straddles it


@dataclass(frozen=True, kw_only=True, slots=True)
class ProbeResult:
    """One probe as run: its level, its good and judged requests, how long it held its level."""

    level: float  # users (whole) or requests/s
    good: int
    judged: int
    duration_s: float  # counts against the budget

    def __post_init__(self) -> None:
        if not 0 <= self.good <= self.judged:
            raise ValueError(f"a probe needs 0 <= good <= judged (got good={self.good}, judged={self.judged})")
        if self.level <= 0 or self.duration_s < 0:
            raise ValueError(f"a probe needs level > 0 and duration_s >= 0 (got {self.level}, {self.duration_s})")


@dataclass(frozen=True, kw_only=True, slots=True)
class LevelResult:
    """Every probe at one level, counts pooled, with the verdict of the pooled interval."""

    level: float
    good: int
    judged: int
    probes: int
    attainment: Attainment
    verdict: Verdict


@functools.lru_cache(maxsize=4096)
def _attainment(good: int, judged: int, confidence: float) -> Attainment:
    # scipy's interval costs about half a millisecond; the search asks for the same counts again and again
    return Attainment.of(good, judged, confidence=confidence)


def pooled(probes: Sequence[ProbeResult], *, target: float, confidence: float) -> tuple[LevelResult, ...]:
    """The probes grouped by level (counts summed), sorted by level."""
    sums: dict[float, list[int]] = {}
    for probe in probes:
        counts = sums.setdefault(float(probe.level), [0, 0, 0])
        counts[0] += probe.good
        counts[1] += probe.judged
        counts[2] += 1
    out = []
    for level in sorted(sums):
        good, judged, n = sums[level]
        attainment = _attainment(good, judged, confidence)
        out.append(LevelResult(level=level, good=good, judged=judged, probes=n, attainment=attainment,
                               verdict=Verdict(attainment.verdict(target))))
    return tuple(out)


def leaning(result: LevelResult, target: float) -> Verdict:
    """The verdict, or for an unresolved level the side its point estimate falls on."""
    if result.verdict is not Verdict.UNRESOLVED:
        return result.verdict
    return Verdict.PASS if result.judged and result.good / result.judged >= target else Verdict.FAIL


# -- wording -----------------------------------------------------------------------------------


def _amount(value: float, unit: str) -> str:
    if unit == "users" and value == 1:
        return "1 user"
    return f"{value:g} {unit}"


def _pct(ratio: float) -> str:
    return f"{ratio * 100:.4g}%"


def _figures(result: LevelResult) -> str:
    """``97.1%, 95% CI 93.0-99.0%`` (or that nothing was judged)."""
    a = result.attainment
    if not a.judged:
        return "no requests judged"
    return f"{a.share * 100:.1f}% of {a.judged}, {_pct(a.confidence)} CI {a.low * 100:.1f}-{a.high * 100:.1f}%"


def _judged(result: LevelResult, unit: str) -> str:
    """``8 users passed (97.1% of 412, 95% CI 93.0-99.0%)``."""
    said = {Verdict.PASS: "passed", Verdict.FAIL: "failed",
            Verdict.UNRESOLVED: "unresolved" if result.probes < 2 else "unresolved after two probes"}
    return f"{_amount(result.level, unit)} {said[result.verdict]} ({_figures(result)})"


def _leaning_said(result: LevelResult, target: float, unit: str) -> str:
    """As :func:`_judged`, saying how an unresolved level is taken."""
    text = _judged(result, unit)
    if result.verdict is Verdict.UNRESOLVED:
        text += " and is taken as " + ("passing" if leaning(result, target) is Verdict.PASS else "failing")
    return text


# -- the answer --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Bracket:
    """What the probes say about the highest level that meets the target.

    ``status``: ``bracketed`` (both ends, within the precision), ``wide`` (both
    ends, further apart: the budget ran out, or only unresolved levels lie
    between them), ``above_max`` (``max`` passed), ``below_min`` (``min``
    failed), ``no_pass`` (no level below the lowest failure passed with
    confidence, or nothing was resolved), ``no_fail`` (nothing failed with
    confidence, short of ``max``), ``empty`` (no probes).
    """

    highest_pass: float | None  # highest level that passed with confidence, below lowest_fail
    lowest_fail: float | None  # lowest level that failed with confidence
    unresolved: tuple[float, ...]  # levels whose interval still straddles the target
    status: str
    non_monotone: tuple[float, ...]  # confident passes above lowest_fail: reported, not trusted
    levels: tuple[LevelResult, ...]

    def _at(self, level: float) -> LevelResult:
        return next(r for r in self.levels if r.level == level)

    def describe(self, unit: str) -> str:
        """One sentence: where the limit lies, at what confidence, on which figures, and what is unresolved."""
        if not self.levels:
            return "no probes were run"
        confidence = _pct(self.levels[0].attainment.confidence)
        hp, lf = self.highest_pass, self.lowest_fail
        if hp is not None and lf is not None:
            head = (f"between {hp:g} and {_amount(lf, unit)} ({confidence} confidence"
                    + ("" if self.status == "bracketed" else ", not narrowed to the precision asked") + ")")
            ends = [self._at(hp), self._at(lf)]
        elif hp is not None:
            head = (f"at least {_amount(hp, unit)}, the search's max ({confidence} confidence)"
                    if self.status == "above_max" else
                    f"at least {_amount(hp, unit)} ({confidence} confidence); no level failed with confidence")
            ends = [self._at(hp)]
        elif lf is not None:
            head = (f"below {_amount(lf, unit)}, the search's min ({confidence} confidence)"
                    if self.status == "below_min" else
                    f"below {_amount(lf, unit)} ({confidence} confidence); no level below it passed with confidence")
            ends = [self._at(lf)]
        else:
            head = "not found: no level passed or failed with confidence"
            ends = []
        parts = [head + (": " + ", ".join(_judged(r, unit) for r in ends) if ends else "")]
        if self.unresolved:
            parts.append("unresolved: " + ", ".join(_judged(self._at(x), unit) for x in self.unresolved))
        if self.non_monotone:
            parts.append("passed above the lowest failure (not trusted): "
                         + ", ".join(_judged(self._at(x), unit) for x in self.non_monotone))
        return "; ".join(parts)


def bracket(spec: SearchSpec, probes: Sequence[ProbeResult], *, target: float) -> Bracket:
    """The answer the probes give: the confident ends around the limit, and what stayed unresolved."""
    levels = pooled(probes, target=target, confidence=spec.confidence)
    fails = [r.level for r in levels if r.verdict is Verdict.FAIL]
    lowest_fail = min(fails, default=None)
    passes = [r.level for r in levels if r.verdict is Verdict.PASS]
    below = [x for x in passes if lowest_fail is None or x < lowest_fail]
    highest_pass = max(below, default=None)
    non_monotone = tuple(x for x in passes if lowest_fail is not None and x > lowest_fail)
    unresolved = tuple(r.level for r in levels if r.verdict is Verdict.UNRESOLVED)
    if not levels:
        status = "empty"
    elif highest_pass is not None and lowest_fail is not None:
        closed = lowest_fail - highest_pass <= spec.precision_at(highest_pass)
        status = "bracketed" if closed else "wide"
    elif highest_pass is not None:
        status = "above_max" if highest_pass >= snap_level(spec, spec.max) else "no_fail"
    elif lowest_fail is not None:
        status = "below_min" if lowest_fail <= snap_level(spec, spec.min) else "no_pass"
    else:
        status = "no_pass"
    return Bracket(highest_pass=highest_pass, lowest_fail=lowest_fail, unresolved=unresolved, status=status,
                   non_monotone=non_monotone, levels=levels)


# -- the next probe ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Decision:
    """What the search does next, and why."""

    level: float | None  # the next level to probe; None: the search is over
    phase: str  # start | grow | shrink | repeat | bisect | done
    reason: str  # one plain sentence with the figures that decided


def _spacing(spec: SearchSpec, precision: float) -> float:
    """How far a new level keeps from one unresolved twice: half the precision (at least one user).

    Half, because the best answer around an unresolved level is a pass and a fail
    on either side of it, at most the precision apart.
    """
    return max(1.0, float(math.floor(precision / 2.0))) if spec.over == "users" else precision / 2.0


def _inside(spec: SearchSpec, low: float, high: float, blocked: Sequence[float], spacing: float) -> float | None:
    """The level to probe between ``low`` and ``high``: the midpoint, or the nearest level to it that is
    at least ``spacing`` away from every level in ``blocked`` (those probed twice); None when none is."""
    middle = (low + high) / 2.0
    points = [low, *sorted(x for x in blocked if low < x < high), high]
    best: float | None = None
    for a, b in pairwise(points):
        lo = a + spacing if a != low else a
        hi = b - spacing if b != high else b
        if spec.over == "users":
            first = math.floor(lo) + 1 if a == low else math.ceil(lo - 1e-9)
            last = math.ceil(hi) - 1 if b == high else math.floor(hi + 1e-9)
            if first > last:
                continue
            candidate = float(min(max(math.floor(middle + 0.5), first), last))
        else:
            if lo > hi:
                continue
            candidate = snap_level(spec, min(max(middle, lo), hi))
            slack = _grain(spec, candidate)
            if not a < candidate < b or (a != low and candidate - a < spacing - slack) or (
                    b != high and b - candidate < spacing - slack):
                continue
        if best is None or abs(candidate - middle) < abs(best - middle):
            best = candidate
    return best


def _beyond(spec: SearchSpec, level: float, spacing: float, probed: set[float], *, up: bool) -> float | None:
    """The first level ``spacing`` (or a multiple) above (below) ``level`` not yet probed, within [min, max]."""
    limit = snap_level(spec, spec.max if up else spec.min)
    step = spacing if up else -spacing
    candidate = level
    while True:
        previous, target = candidate, candidate + step
        if spec.over == "users":
            candidate = float(math.ceil(target - 1e-9) if up else math.floor(target + 1e-9))
        else:
            candidate = float(f"{target:.3g}")
            if candidate == previous:  # a step finer than three digits at this level
                candidate = float(f"{previous + math.copysign(_grain(spec, previous), step):.3g}")
        if (up and candidate >= limit) or (not up and candidate <= limit):
            return None if limit in probed or limit == level else limit
        if candidate not in probed:
            return candidate


def _plan(spec: SearchSpec, probes: Sequence[ProbeResult], target: float) -> Decision:
    """The next step, budget aside."""
    unit = spec.over if spec.over == "users" else "requests/s"
    if not probes:
        first = snap_level(spec, spec.start)
        return Decision(level=first, phase="start", reason=f"starting at {_amount(first, unit)}")
    levels = pooled(probes, target=target, confidence=spec.confidence)
    at = {r.level: r for r in levels}
    last = at[float(probes[-1].level)]
    if last.verdict is Verdict.UNRESOLVED and last.probes < 2:
        return Decision(level=last.level, phase="repeat",
                        reason=f"{_judged(last, unit)}, straddling the {_pct(target)} target: probing it once more")

    sides = {r.level: leaning(r, target) for r in levels}
    answer = bracket(spec, probes, target=target)
    hp, lf = answer.highest_pass, answer.lowest_fail
    # the ends the search works between: the confident ones, or where missing, a point estimate
    high = lf if lf is not None else min(
        (x for x, v in sides.items() if v is Verdict.FAIL and (hp is None or x > hp)), default=None)
    low = hp if hp is not None else max(
        (x for x, v in sides.items() if v is Verdict.PASS and (high is None or x < high)), default=None)

    def done(why: str) -> Decision:
        return Decision(level=None, phase="done", reason=f"done, {why}: {answer.describe(unit)}")

    if high is None:  # nothing failed, not even by its point estimate
        top = levels[-1]
        if top.level >= snap_level(spec, spec.max):
            return done(f"{_leaning_said(top, target, unit)} at the search's max")
        nxt = _up(spec, top.level)
        return Decision(level=nxt, phase="grow", reason=f"{_leaning_said(top, target, unit)}: trying {nxt:g}")
    if low is None:  # nothing passed, not even by its point estimate
        bottom = levels[0]
        if bottom.level <= snap_level(spec, spec.min):
            return done(f"{_leaning_said(bottom, target, unit)} at the search's min")
        nxt = _down(spec, bottom.level)
        return Decision(level=nxt, phase="shrink", reason=f"{_leaning_said(bottom, target, unit)}: trying {nxt:g}")

    precision = spec.precision_at(low)
    ends = f"{_leaning_said(at[low], target, unit)} and {_leaning_said(at[high], target, unit)}"
    if high - low > precision:
        twice = [r.level for r in levels if r.probes >= 2 and r.verdict is Verdict.UNRESOLVED]
        nxt = _inside(spec, low, high, twice, _spacing(spec, precision))
        if nxt is not None:
            middle = snap_level(spec, (low + high) / 2.0)
            aside = "" if nxt == middle else f" (the midpoint {middle:g} is too close to a level unresolved twice)"
            return Decision(level=nxt, phase="bisect", reason=f"{ends}: trying {nxt:g}{aside}")
        why = f"no level is left to probe between {low:g} and {_amount(high, unit)}"
    else:
        why = f"{low:g} and {_amount(high, unit)} are within the precision of {_amount(precision, unit)}"
    # the gap is closed; an end that is only a point estimate: look past it for a confident one
    probed = set(at)
    if high != lf:
        nxt = _beyond(spec, high, _spacing(spec, precision), probed, up=True)
        if nxt is not None:
            return Decision(level=nxt, phase="grow",
                            reason=f"{ends}; looking above {high:g} for a confident failure: trying {nxt:g}")
    if low != hp:
        nxt = _beyond(spec, low, _spacing(spec, precision), probed, up=False)
        if nxt is not None:
            return Decision(level=nxt, phase="shrink",
                            reason=f"{ends}; looking below {low:g} for a confident pass: trying {nxt:g}")
    return done(why)


def next_probe(spec: SearchSpec, probes: Sequence[ProbeResult], *, target: float, elapsed_s: float) -> Decision:
    """What to probe next, given the probes so far (in the order they ran) and the time they took.

    ``target``: the attainment the level must reach (a share, e.g. 0.95);
    ``elapsed_s``: the search's time so far, what the budget is counted against.
    """
    plan = _plan(spec, probes, target)
    if plan.level is None:
        return plan
    unit = spec.over if spec.over == "users" else "requests/s"
    so_far = bracket(spec, probes, target=target).describe(unit)
    skipped = f"{_amount(plan.level, unit)} is not probed"
    if len(probes) >= spec.max_probes:
        return Decision(level=None, phase="done",
                        reason=f"probe budget spent ({len(probes)} of max_probes {spec.max_probes} run), "
                               f"so {skipped}: the answer so far is {so_far}")
    if elapsed_s + spec.probe_s > spec.budget_s:
        return Decision(level=None, phase="done",
                        reason=f"time budget spent ({elapsed_s:.0f} s of budget_s {spec.budget_s:g} used and a probe "
                               f"takes {spec.probe_s:g} s), so {skipped}: the answer so far is {so_far}")
    return plan


def requests_to_pass(target: float, confidence: float = 0.95) -> int:
    """The fewest judged requests whose Wilson interval, all of them good, lies wholly at or above ``target``.

    With every request good the lower bound is n / (n + z²), so n >= z² t / (1 - t).
    """
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    n = max(1, math.ceil(z * z * target / (1.0 - target))) if target < 1 else 10**9
    while Attainment.of(n, n, confidence=confidence).low < target:  # guard the rounding
        n += 1
    return n


def min_requests_for(spec: SearchSpec, target: float) -> int:
    """The judged requests a probe waits for: the scenario's ``min_requests``, else :func:`requests_to_pass`."""
    return spec.min_requests if spec.min_requests is not None else requests_to_pass(target, spec.confidence)


def probe_sample(start_unix_s: Sequence[float], end_unix_s: Sequence[float], *, opens_unix_s: float,
                 closes_unix_s: float, tail_q: float = 95.0) -> np.ndarray:
    """Which of a probe's requests it judges (a boolean mask): the same rule live and in the analysis.

    Those that started after ``opens_unix_s`` (the probe's settle time, or later when an earlier
    stage's requests were still running) and ended by ``closes_unix_s`` (the decision, or the probe's
    end: a request that ran on into the next probe measured that level too), less those that started
    in the last stretch before it, as long as the probe's p95 request: there, only the fast ones
    would have ended in time, and judging them alone would flatter the probe.
    """
    start = np.asarray(start_unix_s, dtype=float)
    until = probe_sends_until(start_unix_s, end_unix_s, opens_unix_s=opens_unix_s, closes_unix_s=closes_unix_s,
                              tail_q=tail_q)
    return (start >= opens_unix_s) & (np.asarray(end_unix_s, dtype=float) <= closes_unix_s) & (start < until)


def probe_sends_until(start_unix_s: Sequence[float], end_unix_s: Sequence[float], *, opens_unix_s: float,
                      closes_unix_s: float, tail_q: float = 95.0) -> float:
    """The end of the span of send times :func:`probe_sample` judges: ``closes`` less the probe's p95 request.

    Rates over a probe's judged requests (goodput) divide by ``probe_sends_until - opens``, the time
    over which they were sent; ``opens`` when none ended in time.
    """
    start = np.asarray(start_unix_s, dtype=float)
    end = np.asarray(end_unix_s, dtype=float)
    ended = (start >= opens_unix_s) & (end <= closes_unix_s)
    if not ended.any():
        return float(opens_unix_s)
    return float(closes_unix_s - np.percentile(end[ended] - start[ended], tail_q))

