"""envelope.search: the rules of the SLO search, one by one, and its coverage on simulated servers.

The simulator gives each level a true attainment p(level); a probe at a level
judges ``max(min_requests, level * probe_s / LATENCY_S)`` requests (a closed
loop of ``level`` users, each request taking LATENCY_S), of which
``Binomial(judged, p(level))`` are good, drawn from a seeded numpy Generator.
Each of four curve families (smooth, noisy, bumped, cliff) is drawn 100 times,
curve and counts; the bracket must hold a true boundary (:meth:`Curve.boundaries`)
in at least 95 of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

from envelope.search import (
    Bracket,
    Decision,
    ProbeResult,
    SearchSpec,
    Verdict,
    bracket,
    next_probe,
    pooled,
    snap_level,
)

TARGET = 0.95
PASS = (1000, 1000)  # (good, judged): 95% CI 99.6-100%, a clear pass at a 95% target
FAIL = (500, 1000)  # 46.9-53.1%: a clear fail
HALF = (95, 100)  # 89.6-97.8%: unresolved, point estimate on the target (taken as passing)
LOW = (94, 100)  # 87.5-97.2%: unresolved, point estimate below it (taken as failing)


def _probe(level: float, counts: tuple[int, int], duration_s: float = 20.0) -> ProbeResult:
    return ProbeResult(level=level, good=counts[0], judged=counts[1], duration_s=duration_s)


def _probes(*pairs: tuple[float, tuple[int, int]]) -> list[ProbeResult]:
    return [_probe(level, counts) for level, counts in pairs]


def _next(spec: SearchSpec, probes: list[ProbeResult]) -> Decision:
    return next_probe(spec, probes, target=TARGET, elapsed_s=sum(p.duration_s for p in probes))


def _drive(spec: SearchSpec, counts_at: Callable[[float], tuple[int, int]]) -> tuple[list[ProbeResult], list[Decision]]:
    """Run a search to its end against a deterministic server."""
    probes: list[ProbeResult] = []
    decisions = [_next(spec, probes)]
    while decisions[-1].level is not None:
        assert len(probes) < spec.max_probes
        probes.append(_probe(decisions[-1].level, counts_at(decisions[-1].level), spec.probe_s))
        decisions.append(_next(spec, probes))
    return probes, decisions


# -- levels ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("over", "level", "expected"),
    [
        ("users", 11.5, 12.0),  # halves round up, not to even
        ("users", 12.4, 12.0),
        ("users", 0.2, 1.0),  # never below min
        ("users", 999.0, 256.0),  # never above max
        ("rate", 3.14159, 3.14),
        ("rate", 12.345, 12.3),
        ("rate", 1234.5, 1230.0),
        ("rate", 0.012345, 0.0123),
        ("rate", 0.0001, 0.01),  # min
    ],
)
def test_snap_level(over, level, expected):
    spec = SearchSpec(over=over, start=1, min=1 if over == "users" else 0.01, max=256 if over == "users" else 5000)
    assert snap_level(spec, level) == expected


def test_rate_levels_are_rounded_to_three_significant_digits():
    spec = SearchSpec(over="rate", start=3.14159, growth=1.5, min=0.5, max=100)
    probes, decisions = _drive(spec, lambda level: PASS if level < 20 else FAIL)
    levels = [p.level for p in probes]
    assert levels[:5] == [3.14, 4.71, 7.06, 10.6, 15.9]  # each the last times 1.5, rounded
    assert len(levels) > 6  # it bisected too
    for level in levels:
        assert float(f"{level:.3g}") == level
    result = bracket(spec, probes, target=TARGET)
    assert result.status == "bracketed"
    assert result.highest_pass < 20 <= result.lowest_fail
    assert result.lowest_fail - result.highest_pass <= max(0.1, 0.1 * result.highest_pass)
    assert "requests/s" in decisions[-1].reason


# -- pooling -----------------------------------------------------------------------------------


def test_pooled_sums_counts_per_level_and_sorts_by_level():
    levels = pooled(_probes((8, (76, 80)), (4, PASS), (8, (78, 80))), target=TARGET, confidence=0.95)
    assert [(r.level, r.good, r.judged, r.probes) for r in levels] == [(4, 1000, 1000, 1), (8, 154, 160, 2)]
    assert levels[0].verdict is Verdict.PASS
    assert levels[1].verdict is Verdict.UNRESOLVED  # 96.2%, CI 92.1-98.3%
    assert levels[1].attainment.low < TARGET < levels[1].attainment.high


def test_probe_result_rejects_impossible_counts():
    with pytest.raises(ValueError, match="good <= judged"):
        ProbeResult(level=4, good=5, judged=4, duration_s=20)
    with pytest.raises(ValueError, match="level > 0"):
        ProbeResult(level=0, good=0, judged=0, duration_s=20)


# -- the rules ---------------------------------------------------------------------------------


def test_grows_by_growth_while_probes_pass():
    spec = SearchSpec()
    probes: list[ProbeResult] = []
    seen = []
    for _ in range(4):
        decision = _next(spec, probes)
        seen.append((decision.phase, decision.level))
        probes.append(_probe(decision.level, PASS))
    assert seen == [("start", 4), ("grow", 8), ("grow", 16), ("grow", 32)]
    reason = _next(spec, probes[:2]).reason
    assert reason == "8 users passed (100.0% of 1000, 95% CI 99.6-100.0%): trying 16"


def test_shrinks_when_the_first_probe_fails_and_stops_below_min():
    spec = SearchSpec(start=8)
    probes, decisions = _drive(spec, lambda level: FAIL)
    assert [(d.phase, d.level) for d in decisions] == [("start", 8), ("shrink", 4), ("shrink", 2), ("shrink", 1),
                                                       ("done", None)]
    assert "1 user failed (50.0% of 1000" in decisions[-1].reason
    result = bracket(spec, probes, target=TARGET)
    assert (result.status, result.highest_pass, result.lowest_fail) == ("below_min", None, 1)
    assert result.describe("users").startswith("below 1 user, the search's min (95% confidence)")


def test_shrink_then_bisect():
    spec = SearchSpec(start=16)
    probes, decisions = _drive(spec, lambda level: PASS if level <= 5 else FAIL)
    assert [p.level for p in probes] == [16, 8, 4, 6, 5]
    assert [d.phase for d in decisions] == ["start", "shrink", "shrink", "bisect", "bisect", "done"]
    result = bracket(spec, probes, target=TARGET)
    assert (result.status, result.highest_pass, result.lowest_fail) == ("bracketed", 5, 6)


def test_stops_above_max():
    spec = SearchSpec(max=16)
    probes, decisions = _drive(spec, lambda level: PASS)
    assert [p.level for p in probes] == [4, 8, 16]
    assert decisions[-1].phase == "done"
    assert "16 users passed (100.0% of 1000, 95% CI 99.6-100.0%) at the search's max" in decisions[-1].reason
    result = bracket(spec, probes, target=TARGET)
    assert (result.status, result.highest_pass, result.lowest_fail) == ("above_max", 16, None)
    assert result.describe("users").startswith("at least 16 users, the search's max (95% confidence)")


def test_growth_is_capped_at_max():
    spec = SearchSpec(max=12)
    probes, _ = _drive(spec, lambda level: PASS)
    assert [p.level for p in probes] == [4, 8, 12]


def test_an_unresolved_probe_is_repeated_exactly_once():
    spec = SearchSpec()
    probes = _probes((4, PASS), (8, HALF))
    decision = _next(spec, probes)
    assert (decision.phase, decision.level) == ("repeat", 8)
    assert "8 users unresolved (95.0% of 100, 95% CI 88.8-97.8%), straddling the 95% target" in decision.reason

    # still unresolved when pooled (190 of 200): taken as passing, the search grows past it
    probes.append(_probe(8, HALF))
    decision = _next(spec, probes)
    assert (decision.phase, decision.level) == ("grow", 16)
    assert "unresolved after two probes" in decision.reason and "taken as passing" in decision.reason

    # 94% after two probes: taken as failing, the search bisects below it
    probes = _probes((4, PASS), (8, LOW), (8, LOW))
    decision = _next(spec, probes)
    assert (decision.phase, decision.level) == ("bisect", 6)
    assert "taken as failing" in decision.reason


def test_a_level_unresolved_twice_is_never_an_end():
    spec = SearchSpec()
    probes = _probes((4, PASS), (8, HALF), (8, HALF), (16, FAIL))
    result = bracket(spec, probes, target=TARGET)
    assert (result.highest_pass, result.lowest_fail, result.unresolved) == (4, 16, (8,))
    assert result.status == "wide"
    assert "unresolved: 8 users unresolved after two probes (95.0% of 200" in result.describe("users")


def test_bisects_at_the_midpoint_and_stops_within_the_precision():
    spec = SearchSpec()  # precision: max(1 user, 10% of the highest pass)
    for passed, failed, expected in [(8, 16, 12), (8, 11, 10), (8, 10, 9), (40, 45, 43), (100, 111, 106)]:
        decision = _next(spec, _probes((passed, PASS), (failed, FAIL)))
        assert (decision.phase, decision.level) == ("bisect", expected), (passed, failed)
        assert f"{passed} users passed" in decision.reason and f"{failed} users failed" in decision.reason
    for passed, failed in [(8, 9), (40, 44), (100, 110)]:
        probes = _probes((passed, PASS), (failed, FAIL))
        decision = _next(spec, probes)
        assert decision.phase == "done", (passed, failed)
        assert "within the precision" in decision.reason
        assert bracket(spec, probes, target=TARGET).status == "bracketed"


def test_a_search_bisects_down_to_adjacent_levels():
    spec = SearchSpec()
    probes, decisions = _drive(spec, lambda level: PASS if level <= 11 else FAIL)
    assert [p.level for p in probes] == [4, 8, 16, 12, 10, 11]
    result = bracket(spec, probes, target=TARGET)
    assert (result.status, result.highest_pass, result.lowest_fail) == ("bracketed", 11, 12)
    assert result.describe("users") == (
        "between 11 and 12 users (95% confidence): 11 users passed (100.0% of 1000, 95% CI 99.6-100.0%), "
        "12 users failed (50.0% of 1000, 95% CI 46.9-53.1%)")
    assert decisions[-1].reason.startswith("done, 11 and 12 users are within the precision of 1.1 users: between")


def test_a_midpoint_probed_twice_gives_way_to_the_nearest_level_left():
    spec = SearchSpec()
    probes = _probes((8, PASS), (16, FAIL), (12, HALF), (12, HALF))
    decision = _next(spec, probes)
    assert (decision.phase, decision.level) == ("bisect", 11)  # 11 and 13 are as near; the lower one first
    assert "the midpoint 12 is too close to a level unresolved twice" in decision.reason
    probes += _probes((11, HALF), (11, HALF))
    assert _next(spec, probes).level == 13
    # nothing left between the ends: done, and the answer is wide
    probes = _probes((8, PASS), (10, FAIL), (9, HALF), (9, HALF))
    decision = _next(spec, probes)
    assert decision.phase == "done" and "no level is left to probe between 8 and 10 users" in decision.reason
    assert bracket(spec, probes, target=TARGET).status == "wide"


def test_a_gap_closed_on_a_point_estimate_looks_for_a_confident_end():
    spec = SearchSpec()
    probes = _probes((15, PASS), (16, LOW), (16, LOW))
    decision = _next(spec, probes)
    assert (decision.phase, decision.level) == ("grow", 17)
    assert "looking above 16 for a confident failure" in decision.reason
    probes = _probes((4, HALF), (4, HALF), (8, FAIL), (6, FAIL), (5, FAIL))
    decision = _next(spec, probes)
    assert (decision.phase, decision.level) == ("shrink", 3)
    assert "looking below 4 for a confident pass" in decision.reason
    assert bracket(spec, probes, target=TARGET).status == "no_pass"


def test_the_time_budget_stops_the_search():
    spec = SearchSpec(probe_s=20, budget_s=70)
    probes, decisions = _drive(spec, lambda level: PASS)
    assert [p.level for p in probes] == [4, 8, 16]  # a fourth would end at 80 s
    assert decisions[-1].phase == "done"
    assert decisions[-1].reason.startswith("time budget spent (60 s of budget_s 70 used and a probe takes 20 s), "
                                           "so 32 users is not probed: the answer so far is at least 16 users")
    assert bracket(spec, probes, target=TARGET).status == "no_fail"
    # elapsed_s is what counts, whatever the probes say
    assert next_probe(spec, [], target=TARGET, elapsed_s=51).level is None


def test_max_probes_stops_the_search():
    spec = SearchSpec(max_probes=4)
    probes, decisions = _drive(spec, lambda level: PASS if level <= 11 else FAIL)
    assert len(probes) == 4
    assert decisions[-1].reason.startswith("probe budget spent (4 of max_probes 4 run), so 10 users is not probed: "
                                           "the answer so far is between 8 and 12 users (95% confidence, not narrowed")
    assert bracket(spec, probes, target=TARGET).status == "wide"


def test_non_monotone_passes_are_reported_not_trusted():
    spec = SearchSpec()
    probes = _probes((4, PASS), (8, FAIL), (16, PASS), (6, PASS), (7, FAIL))
    result = bracket(spec, probes, target=TARGET)
    assert (result.highest_pass, result.lowest_fail, result.non_monotone) == (6, 7, (16,))
    assert result.status == "bracketed"
    assert "passed above the lowest failure (not trusted): 16 users passed" in result.describe("users")
    assert _next(spec, probes).phase == "done"


@pytest.mark.parametrize(
    ("pairs", "status", "opening"),
    [
        ((), "empty", "no probes were run"),
        (((4, PASS), (8, PASS)), "no_fail", "at least 8 users (95% confidence); no level failed with confidence"),
        (((4, FAIL), (2, FAIL)), "no_pass", "below 2 users (95% confidence); no level below it passed"),
        (((4, HALF), (4, HALF)), "no_pass", "not found: no level passed or failed with confidence; unresolved: 4"),
    ],
)
def test_bracket_statuses(pairs, status, opening):
    result = bracket(SearchSpec(), _probes(*pairs), target=TARGET)
    assert isinstance(result, Bracket)
    assert result.status == status
    assert result.describe("users").startswith(opening)


# -- simulated servers -------------------------------------------------------------------------

# A closed loop of `level` users whose requests take LATENCY_S each judges level * probe_s / LATENCY_S
# requests in a probe (80 per user in a 20 s probe); the driver holds a probe until min_requests are judged.
# min_requests is 100 because below about 73 judged requests nothing can pass a 95% target at 95%
# confidence: Wilson's lower bound for n good of n is n / (n + 1.96**2).
LATENCY_S = 0.25
DRAWS = 100
SIM_SPEC = SearchSpec(min_requests=100)  # start 4, growth 2, 1-256 users, 15 probes of 20 s in 300 s
LEVELS = np.arange(1, int(SIM_SPEC.max) + 1)


@dataclass(frozen=True)
class Curve:
    """A true attainment p for every whole level 1..max (p[i] is level i + 1)."""

    p: np.ndarray

    def at(self, level: float) -> float:
        return float(self.p[int(level) - 1])

    def boundaries(self) -> list[int]:
        """The true boundaries: every whole level L that meets the target while L + 1 does not.

        Level 0 counts as meeting it and max + 1 as not, so a curve that fails
        already at min has the boundary 0 ("below min") and one that still passes
        at max has the boundary max ("above max"). A monotone curve has exactly
        one: the largest whole level whose p >= target.
        """
        ok = np.concatenate([[True], self.p >= TARGET, [False]])
        return [level for level in range(len(ok) - 1) if ok[level] and not ok[level + 1]]

    def covered_by(self, result: Bracket) -> bool:
        """Whether the bracket holds a true boundary: highest_pass <= boundary < lowest_fail.

        A missing end is unbounded ("below 2 users" holds a boundary 0 or 1), but an
        answer with neither end holds nothing.
        """
        if result.highest_pass is None and result.lowest_fail is None:
            return False
        low = -math.inf if result.highest_pass is None else result.highest_pass
        high = math.inf if result.lowest_fail is None else result.lowest_fail
        return any(low <= b < high for b in self.boundaries())


def _logistic(level: np.ndarray, middle: float, width: float, top: float = 0.995, floor: float = 0.5) -> np.ndarray:
    return floor + (top - floor) / (1.0 + np.exp(np.clip((level - middle) / width, -50.0, 50.0)))


def _middle(rng: np.random.Generator) -> float:
    # log-uniform over 0.5..400: most boundaries inside 1..256, some below min, some above max
    return float(np.exp(rng.uniform(math.log(0.5), math.log(400.0))))


def smooth(rng: np.random.Generator) -> Curve:
    """Logistic, decreasing; one true boundary: the largest whole level whose p >= target."""
    middle = _middle(rng)
    return Curve(_logistic(LEVELS, middle, middle * rng.uniform(0.05, 0.15)))


def noisy(rng: np.random.Generator) -> Curve:
    """Logistic plus a random bump of up to +-2 points per level; a bump crosses the target only
    where the smooth curve is within 2 points of it, so there may be several boundaries there."""
    middle = _middle(rng)
    base = _logistic(LEVELS, middle, middle * rng.uniform(0.05, 0.15), top=0.99)
    return Curve(np.clip(base + rng.uniform(-0.02, 0.02, size=len(LEVELS)), 0.0, 1.0))


def bumped(rng: np.random.Generator) -> Curve:
    """Logistic, then past its boundary a dip well below the target and a bump back up to 0.985 over a
    range of levels: two boundaries, the logistic's and the bump's far side; a bracket must hold one."""
    middle = float(np.exp(rng.uniform(math.log(3.0), math.log(100.0))))
    base = _logistic(LEVELS, middle, middle * rng.uniform(0.05, 0.1))
    start = middle * rng.uniform(1.1, 1.4) + 1.0
    end = start + middle * rng.uniform(0.5, 1.5) + 1.0
    return Curve(np.where((LEVELS >= start) & (LEVELS <= end), 0.985, base))


def cliff(rng: np.random.Generator) -> Curve:
    """0.99 up to an edge, 0.3 past it; the edge is the one boundary (0: below min; 256 or more: above max)."""
    edge = int(np.exp(rng.uniform(math.log(0.5), math.log(400.0))))
    return Curve(np.where(LEVELS <= edge, 0.99, 0.3))


def _simulate(spec: SearchSpec, curve: Curve, rng: np.random.Generator) -> list[ProbeResult]:
    probes: list[ProbeResult] = []
    while True:
        decision = next_probe(spec, probes, target=TARGET, elapsed_s=sum(p.duration_s for p in probes))
        if decision.level is None:
            return probes
        assert len(probes) < spec.max_probes  # never proposes one past max_probes
        judged = max(spec.min_requests, round(decision.level * spec.probe_s / LATENCY_S))
        good = int(rng.binomial(judged, curve.at(decision.level)))
        probes.append(ProbeResult(level=decision.level, good=good, judged=judged, duration_s=spec.probe_s))


@pytest.mark.parametrize("family", [smooth, noisy, bumped, cliff], ids=lambda f: f.__name__)
def test_the_bracket_holds_the_true_boundary(family, capsys):
    rng = np.random.default_rng(["smooth", "noisy", "bumped", "cliff"].index(family.__name__) + 2024)
    covered, complete, statuses, probe_counts = 0, 0, {}, []
    bump_probed, bump_bracketed = 0, 0
    for _ in range(DRAWS):
        curve = family(rng)
        probes = _simulate(SIM_SPEC, curve, rng)
        assert 1 <= len(probes) <= SIM_SPEC.max_probes
        assert sum(p.duration_s for p in probes) <= SIM_SPEC.budget_s
        result = bracket(SIM_SPEC, probes, target=TARGET)
        covered += curve.covered_by(result)
        complete += result.status in ("bracketed", "wide", "above_max", "below_min")
        statuses[result.status] = statuses.get(result.status, 0) + 1
        probe_counts.append(len(probes))
        if family is bumped:
            first, last = curve.boundaries()[0], curve.boundaries()[-1]
            bump_probed += any(p.level > first and curve.at(p.level) >= TARGET for p in probes)
            bump_bracketed += (result.highest_pass is not None and result.lowest_fail is not None
                               and result.highest_pass <= last < result.lowest_fail)
            assert last > first  # the bump's far side is a second boundary
    with capsys.disabled():
        print(f"\n{family.__name__}: the bracket holds the true boundary in {covered}/{DRAWS} draws "
              f"({complete} with both ends, or above max / below min); statuses {dict(sorted(statuses.items()))}; "
              f"probes per search {min(probe_counts)}-{max(probe_counts)} (mean {np.mean(probe_counts):.1f})"
              + (f"; the bump was probed in {bump_probed}, its far side bracketed in {bump_bracketed}" if family is bumped else ""))
    assert covered >= 95
    # the draws reach what they are meant to test: mostly whole answers, most of them within the precision
    assert complete >= 85
    assert statuses.get("bracketed", 0) >= 50
    if family in (smooth, noisy, cliff):
        assert statuses.get("above_max", 0) >= 1 and statuses.get("below_min", 0) >= 1
    if family is bumped:
        assert bump_probed >= 10 and bump_bracketed >= 5


def test_every_family_has_the_boundaries_it_claims():
    rng = np.random.default_rng(7)
    several = 0
    for family in (smooth, noisy, bumped, cliff):
        for _ in range(50):
            boundaries = family(rng).boundaries()
            assert boundaries  # level 0 passes and max + 1 fails: at least one boundary, always
            if family in (smooth, cliff):
                assert len(boundaries) == 1
            if family is bumped:
                assert len(boundaries) == 2
            several += family is noisy and len(boundaries) > 1
    assert several >= 1  # the noise does cross the target near the boundary


def test_the_coverage_check_can_fail():
    curve = Curve(np.where(LEVELS <= 10, 0.99, 0.3))  # one boundary: 10
    assert curve.boundaries() == [10]
    at = SearchSpec()

    def answer(*pairs):
        return bracket(at, _probes(*pairs), target=TARGET)

    assert curve.covered_by(answer((8, PASS), (12, FAIL)))
    assert curve.covered_by(answer((10, PASS), (11, FAIL)))
    assert curve.covered_by(answer((20, FAIL)))  # "below 20 users": true
    assert not curve.covered_by(answer((11, PASS), (12, FAIL)))
    assert not curve.covered_by(answer((8, PASS), (10, FAIL)))
    assert not curve.covered_by(answer((10, FAIL)))
    assert not curve.covered_by(answer((12, PASS)))
    assert not curve.covered_by(answer((10, HALF), (10, HALF)))  # no end: no answer
    assert Curve(np.full(len(LEVELS), 0.99)).boundaries() == [256]
    assert Curve(np.full(len(LEVELS), 0.5)).boundaries() == [0]


@pytest.mark.parametrize("over", ["users", "rate"])
def test_random_searches_keep_the_rules(over):
    """Random specs against random noisy servers: every search ends, within its limits, on its grid."""
    rng = np.random.default_rng(11)
    phases = {}
    for _ in range(60):
        low = float(rng.integers(1, 5)) if over == "users" else float(rng.uniform(0.05, 2.0))
        high = low * float(rng.uniform(2.0, 200.0))
        high = float(math.floor(high)) if over == "users" else high
        spec = SearchSpec(over=over, min=low, max=high, start=snap_level(SearchSpec(over=over, min=low, max=high,
                          start=low), float(np.exp(rng.uniform(math.log(low), math.log(high))))),
                          growth=float(rng.uniform(1.2, 3.0)), precision_rel=float(rng.uniform(0.0, 0.3)),
                          confidence=float(rng.choice([0.8, 0.9, 0.95, 0.99])), max_probes=int(rng.integers(1, 20)),
                          probe_s=10.0, budget_s=float(rng.uniform(10.0, 250.0)))
        limit = float(np.exp(rng.uniform(math.log(low) - 0.5, math.log(high) + 0.5)))
        probes: list[ProbeResult] = []
        while True:
            decision = next_probe(spec, probes, target=TARGET, elapsed_s=sum(p.duration_s for p in probes))
            assert decision.reason and any(ch.isdigit() for ch in decision.reason)
            phases[decision.phase] = phases.get(decision.phase, 0) + 1
            if decision.level is None:
                assert decision.phase == "done"
                break
            assert len(probes) < spec.max_probes
            assert sum(p.duration_s for p in probes) + spec.probe_s <= spec.budget_s
            assert spec.min <= decision.level <= spec.max
            assert snap_level(spec, decision.level) == decision.level
            assert sum(p.level == decision.level for p in probes) < 2  # no level a third time
            if decision.phase == "repeat":
                assert probes[-1].level == decision.level
            share = 0.99 if decision.level <= limit else 0.97 - 0.4 * (decision.level / limit - 1.0)
            judged = int(rng.integers(0, 2000))
            probes.append(ProbeResult(level=decision.level, good=int(rng.binomial(judged, min(max(share, 0.0), 1.0))),
                                      judged=judged, duration_s=spec.probe_s))
        result = bracket(spec, probes, target=TARGET)
        assert result.describe("users" if over == "users" else "requests/s")
        if result.highest_pass is not None and result.lowest_fail is not None:
            assert result.highest_pass < result.lowest_fail
    # the draws reached every kind of step
    assert {"start", "grow", "shrink", "repeat", "bisect", "done"} <= set(phases)


def test_rate_levels_at_bounds_with_more_digits_stay_inside_on_three_digits():
    spec = SearchSpec(over="rate", start=2, min=1.2345, max=146.27)
    assert snap_level(spec, 1000.0) == 146.0
    assert snap_level(spec, 0.1) == 1.24
    assert snap_level(spec, 146.2) == 146.0


def test_probe_sample_leaves_out_the_settle_time_and_the_last_stretch_where_only_fast_requests_end():
    import numpy as np

    from envelope.search import probe_sample

    # requests every second from 0 to 29 s, each taking 2 s, except every fifth taking 6 s
    start = np.arange(30.0)
    took = np.where(np.arange(30) % 5 == 0, 6.0, 2.0)
    chosen = probe_sample(start, start + took, opens_unix_s=5.0, closes_unix_s=30.0)
    # p95 of the durations of those that ended is 6 s: nothing started at or after 24 s counts, fast or not
    assert start[chosen].min() == 5.0 and start[chosen].max() < 24.0
    assert chosen.sum() == 19 and not chosen[(start >= 24.0)].any()
    # the slow ones in the middle are kept: leaving them out would flatter the probe
    assert chosen[10] and chosen[15] and chosen[20]
    assert not probe_sample(start, start + took, opens_unix_s=40.0, closes_unix_s=50.0).any()
