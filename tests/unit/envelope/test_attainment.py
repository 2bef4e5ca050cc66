"""Which requests are good, the share of them, and its Wilson interval."""

import math

import numpy as np
import pytest

from envelope.attainment import (
    Attainment,
    Thresholds,
    attainment_target,
    good_mask,
    judge_record,
    thresholds_from_slos,
    wilson_interval,
)


def test_wilson_interval_against_the_formula():
    # Wilson's score interval by hand: (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)
    z = 1.959963984540054
    for good, n in ((48, 48), (72, 80), (0, 10), (5, 7)):
        p = good / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        low, high = wilson_interval(good, n)
        assert low == pytest.approx(max(0.0, centre - half), abs=1e-9)
        assert high == pytest.approx(min(1.0, centre + half), abs=1e-9)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # 100% of 48 is not yet confidently above 95%; 100% of 80 is
    assert Attainment.of(48, 48).verdict(0.95) == "unresolved"
    assert Attainment.of(80, 80).verdict(0.95) == "pass"
    assert Attainment.of(60, 80).verdict(0.95) == "fail"
    assert Attainment.of(0, 0).verdict(0.95) == "unresolved"


def test_thresholds_come_from_explicit_keys_else_the_highest_percentile():
    assert thresholds_from_slos({"ttft_ms": 500, "tpot_ms": 20}) == Thresholds(ttft_ms=500, tpot_ms=20)
    got = thresholds_from_slos({"ttft_p50_ms": 300, "ttft_p99_ms": 1500, "e2e_p95_ms": 9000, "error_rate_max": 0.01})
    assert got == Thresholds(ttft_ms=1500, e2e_ms=9000)
    assert thresholds_from_slos({"ttft_ms": 400, "ttft_p95_ms": 1000}).ttft_ms == 400  # explicit wins
    assert not thresholds_from_slos({"error_rate_max": 0.01}).any
    assert attainment_target({}) == 0.95 and attainment_target({"attainment_min": 0.9}) == 0.9
    assert Thresholds(ttft_ms=500, tpot_ms=20).describe() == "TTFT <= 500 ms, TPOT <= 20 ms"


def _rec(ttft_s=0.1, tokens=11, gap_s=0.01, error=None, intended_lag_s=None):
    rec = {"t_start_s": 100.0, "error_category": error, "output_tokens": tokens,
           "t_first_token_s": 100.0 + ttft_s, "t_last_token_s": 100.0 + ttft_s + gap_s * (tokens - 1)}
    if intended_lag_s is not None:
        rec["t_intended_s"] = 100.0 - intended_lag_s
    return rec


def test_judge_record():
    t = Thresholds(ttft_ms=200, tpot_ms=20, e2e_ms=1000)
    assert judge_record(_rec(), t) is True
    assert judge_record(_rec(ttft_s=0.25), t) is False  # TTFT over
    assert judge_record(_rec(gap_s=0.03), t) is False  # TPOT 30 ms over
    assert judge_record(_rec(tokens=100, gap_s=0.015), t) is False  # E2E 1.585 s over
    assert judge_record(_rec(error="http_500"), t) is False  # an error is never good
    assert judge_record(_rec(error="cancelled"), t) is None  # the load generator stopped it: not judged
    assert judge_record(_rec(tokens=1), Thresholds(tpot_ms=20)) is True  # one token: no TPOT to judge
    # open loop: judged from when it was meant to go (150 ms late + 100 ms TTFT > 200 ms)
    assert judge_record(_rec(intended_lag_s=0.15), t) is False


def test_good_mask_agrees_with_judge_record():
    t = Thresholds(ttft_ms=200, tpot_ms=20)
    recs = [_rec(), _rec(ttft_s=0.25), _rec(gap_s=0.03), _rec(tokens=1), _rec(error="http_500")]
    ok = np.array([r["error_category"] is None for r in recs])
    ttft = np.array([(r["t_first_token_s"] - r["t_start_s"]) * 1000 if o else np.nan for r, o in zip(recs, ok)])
    e2e = np.array([(r["t_last_token_s"] - r["t_start_s"]) * 1000 if o else np.nan for r, o in zip(recs, ok)])
    tpot = np.array([(e - f) / (r["output_tokens"] - 1) if o and r["output_tokens"] > 1 else np.nan
                     for r, o, e, f in zip(recs, ok, e2e, ttft)])
    assert good_mask(ok, ttft, tpot, e2e, t).tolist() == [judge_record(r, t) for r in recs]
