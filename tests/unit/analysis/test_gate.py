import dataclasses
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import analysis.gate
from analysis.gate import (GateCheck, GateResult, GateSettings, attainment_regression, boundary_regression,
                           p95_regression)

SEEDS = range(100)
N_REQUESTS = 300
FAST = GateSettings(resamples=1000)  # the verdicts below do not change with 2000; the runtime halves


def ttft_ms(rng: np.random.Generator, *, sigma: float, n: int = N_REQUESTS) -> np.ndarray:
    """Lognormal TTFT around 200 ms; ``sigma`` is the spread of log TTFT (p95 / p50 = exp(1.645 sigma))."""
    return rng.lognormal(np.log(200.0), sigma, n)


def count_ttft_regressions(*, sigma: float, scale: float) -> int:
    """Of 100 seeds, how often NEW (BASE's distribution times ``scale``) is judged regressed at the 10% limit."""
    regressed = 0
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        base, new = ttft_ms(rng, sigma=sigma), ttft_ms(rng, sigma=sigma) * scale
        check = p95_regression(base, new, limit=0.10, settings=dataclasses.replace(FAST, seed=seed),
                               key="chat / 8 users: TTFT p95", metric="ttft_p95_ms")
        regressed += check.regressed
    return regressed


def test_same_distribution_is_rarely_called_a_regression():
    # a wide distribution (p95 / p50 = 2.3): the noisiest case for the p95
    assert count_ttft_regressions(sigma=0.5, scale=1.0) <= 5


def test_ttft_twenty_percent_slower_is_called_a_regression():
    # With 300 requests a side, a 20% shift clears the 10% limit at 95% confidence
    # only when TTFT is narrow (here p95 / p50 = 1.22); wider spreads need more requests.
    assert count_ttft_regressions(sigma=0.12, scale=1.2) >= 95


def test_a_change_exactly_at_the_limit_regresses_about_one_minus_confidence_of_the_time():
    # one-sided 95%: about 5 in 100 expected; 8 leaves room for the draw
    assert count_ttft_regressions(sigma=0.25, scale=1.10) <= 8


def count_attainment_regressions(base_rate: float, new_rate: float) -> int:
    regressed = 0
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        base_good, new_good = rng.binomial(N_REQUESTS, base_rate), rng.binomial(N_REQUESTS, new_rate)
        check = attainment_regression(base_good, N_REQUESTS, new_good, N_REQUESTS, settings=FAST, key="k")
        regressed += check.regressed
    return regressed


def test_same_attainment_is_rarely_called_a_regression():
    assert count_attainment_regressions(0.98, 0.98) <= 5


def test_attainment_drop_from_98_to_85_percent_is_called_a_regression():
    assert count_attainment_regressions(0.98, 0.85) >= 95


def test_attainment_check_reports_the_change_and_its_interval():
    check = attainment_regression(294, 300, 255, 300, settings=GateSettings(), key="chat / 8 users: attainment")

    assert check.metric == "attainment" and check.judged and check.regressed
    assert check.base == pytest.approx(0.98) and check.new == pytest.approx(0.85)
    assert check.change == pytest.approx(-0.13)
    assert check.low < check.change < check.high < 0
    assert "-13.0 points" in check.reason


def test_allowed_attainment_drop_is_honoured():
    generous = GateSettings(max_attainment_drop=0.20)

    assert not attainment_regression(294, 300, 255, 300, settings=generous, key="k").regressed


def test_attainment_with_nothing_judged_is_not_judged():
    check = attainment_regression(0, 0, 10, 10, settings=GateSettings(), key="k")

    assert not check.regressed and not check.judged
    assert check.base is None and check.new == 1.0
    assert check.reason.startswith("not judged")


@pytest.mark.parametrize(("base", "new", "regressed"), [
    ((8, 9), (8, 9), False),
    ((8, 9), (4, 5), True),
    ((8, 12), (6, 9), False),   # the brackets overlap: the boundary may not have moved
    ((8, 9), (9, 10), False),   # higher
    ((8, 9), (7, 8), True),     # new failed at 8, where base passed
])
def test_boundary_regresses_only_when_new_bracket_lies_wholly_below(base, new, regressed):
    check = boundary_regression(*base, *new, unit="users", key="chat-search: boundary")

    assert check.regressed is regressed and check.judged
    assert check.metric == "boundary"
    assert check.change == new[0] - base[0]
    assert (check.low, check.high) == (new[0] - base[1], new[1] - base[0])
    assert "users" in check.reason


@pytest.mark.parametrize(("sides", "why"), [
    ((None, 2, 1, 2), "base passed no level"),
    ((8, 9, 8, None), "new failed no level"),
    ((None, None, None, None), "base passed no level"),
])
def test_boundary_without_the_needed_ends_is_not_judged(sides, why):
    check = boundary_regression(*sides, unit="users", key="k")

    assert not check.regressed and not check.judged
    assert check.reason.startswith(f"not judged: {why}")


def test_boundary_base_never_failed_but_new_fails_below_its_pass_is_a_regression():
    check = boundary_regression(16, None, 4, 5, unit="users", key="k")

    assert check.regressed and check.high == -11 and check.low is None


@pytest.mark.parametrize(("n_base", "n_new"), [(19, 300), (300, 19), (0, 300)])
def test_too_few_latency_samples_are_not_judged(n_base, n_new):
    rng = np.random.default_rng(0)
    check = p95_regression(ttft_ms(rng, sigma=0.3, n=n_base), 10 * ttft_ms(rng, sigma=0.3, n=n_new), limit=0.10,
                           settings=FAST, key="k", metric="ttft_p95_ms")

    assert not check.regressed and not check.judged
    assert check.change is None and check.low is None
    assert f"{n_base} base and {n_new} new samples" in check.reason
    assert "at least 20" in check.reason


def test_non_finite_latencies_are_dropped_before_counting():
    base = np.r_[np.full(25, 100.0), np.full(10, np.nan)]
    new = np.r_[np.full(15, 500.0), np.full(20, np.inf)]

    check = p95_regression(base, new, limit=0.10, settings=FAST, key="k", metric="tpot_p95_ms")

    assert not check.judged and "25 base and 15 new samples" in check.reason


def test_p95_check_is_seeded_and_reports_its_interval():
    rng = np.random.default_rng(3)
    base, new = ttft_ms(rng, sigma=0.12), ttft_ms(rng, sigma=0.12) * 1.3

    first = p95_regression(base, new, limit=0.10, settings=GateSettings(), key="k", metric="ttft_p95_ms")
    again = p95_regression(base, new, limit=0.10, settings=GateSettings(), key="k", metric="ttft_p95_ms")

    assert first == again
    assert first.regressed and first.judged
    assert first.change == pytest.approx(first.new / first.base - 1)
    assert 0.10 < first.low < first.change < first.high
    assert "beyond the allowed +10.0%" in first.reason


@pytest.mark.parametrize("n", [20, 21, 300, 1001])
def test_order_statistic_bootstrap_draws_what_resampling_would(n):
    # the same distribution as np.percentile(values[rng.integers(0, n, (B, n))], 95, axis=1), without the (B, n) array
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(n)
    values = ttft_ms(rng, sigma=0.5, n=n)
    fast = analysis.gate._p95_bootstrap(values, 20_000, rng)
    slow = np.percentile(values[rng.integers(0, n, size=(4000, n))], 95, axis=1)

    assert ks_2samp(fast, slow).pvalue > 0.01
    assert np.quantile(fast, 0.05) == pytest.approx(np.quantile(slow, 0.05), rel=0.01)
    assert fast.min() >= values.min() and fast.max() <= values.max()


def test_check_confidence_shares_the_gate_level_over_the_family():
    assert analysis.gate.check_confidence(0.95) == pytest.approx(0.95)
    assert analysis.gate.check_confidence(0.95, 10) == pytest.approx(0.995)
    assert analysis.gate.check_confidence(0.90, 0) == pytest.approx(0.90)


def test_a_larger_family_holds_each_check_to_more_confidence():
    rng = np.random.default_rng(6)
    base, new = ttft_ms(rng, sigma=0.3), ttft_ms(rng, sigma=0.3) * 1.25
    alone = p95_regression(base, new, limit=0.10, settings=FAST, key="k", metric="ttft_p95_ms")
    shared = p95_regression(base, new, limit=0.10, settings=FAST, key="k", metric="ttft_p95_ms", family=20)

    assert alone.confidence == pytest.approx(0.95) and shared.confidence == pytest.approx(0.9975)
    assert shared.low < alone.low and shared.high > alone.high
    assert "at 99.75% confidence" in shared.reason
    att = attainment_regression(290, 300, 270, 300, settings=FAST, key="k", family=20)
    assert att.confidence == pytest.approx(0.9975)
    assert att.low < attainment_regression(290, 300, 270, 300, settings=FAST, key="k").low


@pytest.mark.parametrize("bad", [dict(confidence=1.0), dict(confidence=0.4), dict(resamples=10),
                                 dict(max_ttft_regression=-0.1), dict(max_attainment_drop=float("nan"))])
def test_settings_reject_nonsense(bad):
    with pytest.raises(ValueError):
        GateSettings(**bad)


def sample_result() -> GateResult:
    rng = np.random.default_rng(5)
    base = ttft_ms(rng, sigma=0.12)
    return GateResult(checks=(
        p95_regression(base, base * 1.5, limit=0.10, settings=FAST, key="chat | search / 8 users: TTFT p95",
                       metric="ttft_p95_ms"),
        p95_regression(base, base, limit=0.10, settings=FAST, key="chat / 8 users: TPOT p95", metric="tpot_p95_ms"),
        attainment_regression(294, 300, 293, 300, settings=FAST, key="chat / 8 users: attainment"),
        boundary_regression(8, 9, None, 4, unit="users", key="chat-search: boundary"),
        boundary_regression(None, 1, 1, 2, unit="users", key="other-search: boundary"),
    ))


def test_result_is_regressed_when_any_check_is():
    result = sample_result()

    assert [c.regressed for c in result.checks] == [True, False, False, True, False]
    assert result.regressed
    assert not GateResult(checks=result.checks[1:3]).regressed
    assert not GateResult(checks=()).regressed


def test_markdown_has_a_verdict_and_one_row_per_check():
    text = sample_result().markdown()
    lines = text.splitlines()

    assert lines[0] == "**Gate: FAIL**: 2 of 5 checks regressed beyond noise; 1 not judged."
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| check")]
    assert len(rows) == 5
    assert "chat \\| search / 8 users: TTFT p95" in rows[0] and "REGRESSED" in rows[0]
    assert "+50.0%" in rows[0]
    assert "| 98.0% | 97.7% |" in rows[2]
    assert "not judged" in rows[4]
    assert GateResult(checks=sample_result().checks[1:3]).markdown().startswith("**Gate: pass**")


def test_junit_xml_has_one_testcase_per_check_and_failures_only_for_regressions():
    result = sample_result()

    root = ET.fromstring(result.junit_xml(suite="gate-x"))

    assert root.tag == "testsuite" and root.get("name") == "gate-x"
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("5", "2", "1")
    cases = root.findall("testcase")
    assert [c.get("name") for c in cases] == [c.key for c in result.checks]
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    assert failed == [c.key for c in result.checks if c.regressed]
    assert cases[0].find("failure").get("message") == result.checks[0].reason
    assert [c.get("name") for c in cases if c.find("skipped") is not None] == ["other-search: boundary"]


def test_markdown_says_how_false_alarms_are_bounded_and_lists_notes():
    checks = sample_result().checks
    shared = tuple(dataclasses.replace(c, confidence=0.9875) if c.confidence is not None else c for c in checks)
    text = GateResult(checks=shared, notes=("NEW is a partial run.",)).markdown()
    lines = text.splitlines()

    assert lines[2] == ("- False alarms: the 3 judged latency and attainment checks share 95% confidence "
                        "(Bonferroni), so each is held to 98.33%; two runs of the same server fail these checks "
                        "at most 5% of the time.")
    assert lines[3] == "- NEW is a partial run."
    assert lines[5].startswith("| check |")


def test_exit_code_is_1_only_when_a_check_regressed():
    result = sample_result()

    assert result.exit_code == 1
    assert GateResult(checks=result.checks[1:3]).exit_code == 0
    assert result.family == 3  # the two p95 checks and the attainment; boundaries have no confidence


def test_public_api():
    assert set(analysis.gate.__all__) == {
        "MIN_LATENCY_SAMPLES", "GateSettings", "GateCheck", "GateResult", "check_confidence",
        "p95_regression", "attainment_regression", "boundary_regression"}
    assert [f.name for f in dataclasses.fields(GateCheck)][-2:] == ["judged", "confidence"]
