import dataclasses
import subprocess
import sys

import numpy as np
import pytest

import analysis.knee
from analysis.knee import Knee, find_knee

LEVELS = np.arange(1, 13, dtype=float)  # 1 .. 12 users


def saturating(levels, knee_level, *, rise_per_level=100.0, tail_per_level=0.0, noise_sd=0.0, seed=0):
    """Linear rise to ``knee_level``, then ``tail_per_level`` (0: flat, negative: falling), plus seeded noise."""
    levels = np.asarray(levels, dtype=float)
    top = rise_per_level * knee_level
    y = np.where(levels <= knee_level, rise_per_level * levels, top + tail_per_level * (levels - knee_level))
    return y + np.random.default_rng(seed).normal(0.0, noise_sd, size=len(levels))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("true_knee", [4.0, 6.0, 9.0])
def test_saturating_curve_finds_the_knee_within_one_level(seed, true_knee):
    y = saturating(LEVELS, true_knee, noise_sd=15.0, seed=seed)

    knee, reason = find_knee(LEVELS, y)

    assert knee is not None, reason
    assert abs(knee.level - true_knee) <= 1
    assert knee.rising_slope == pytest.approx(100.0, rel=0.2)
    assert knee.tail_slope <= 0.25 * knee.rising_slope
    assert knee.peak_output_tokens_per_s == pytest.approx(float(np.max(y)))
    assert knee.output_tokens_per_s == pytest.approx(float(y[LEVELS == knee.level][0]))
    assert knee.reason == reason and "levels off" in reason


def test_noiseless_knee_is_exact_and_reported():
    y = saturating(LEVELS, 6.0)

    knee, reason = find_knee(LEVELS, y)

    assert knee == Knee(level=6.0, output_tokens_per_s=600.0, peak_output_tokens_per_s=600.0,
                        rising_slope=pytest.approx(100.0), tail_slope=pytest.approx(0.0, abs=1e-9),
                        reason=reason)
    assert reason == ("throughput levels off at 6 (600 tokens/s, 100% of the peak 600): "
                      "slope 100 tokens/s per level up to there, 0 after")


def test_knee_is_frozen():
    knee, _ = find_knee(LEVELS, saturating(LEVELS, 6.0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        knee.level = 3.0


@pytest.mark.parametrize("seed", range(5))
def test_still_linear_curve_has_no_knee_yet(seed):
    y = saturating(LEVELS, 100.0, noise_sd=15.0, seed=seed)  # the knee lies far past the last level

    knee, reason = find_knee(LEVELS, y)

    assert knee is None
    assert reason.startswith("throughput still rising at the highest level: no knee yet")


@pytest.mark.parametrize("seed", range(5))
def test_falling_after_the_peak_finds_the_knee_near_the_peak(seed):
    y = saturating(LEVELS, 7.0, tail_per_level=-60.0, noise_sd=15.0, seed=seed)

    knee, reason = find_knee(LEVELS, y)

    assert knee is not None, reason
    assert abs(knee.level - 7.0) <= 1
    assert knee.tail_slope < 0 < knee.rising_slope
    assert knee.output_tokens_per_s >= 0.85 * knee.peak_output_tokens_per_s


@pytest.mark.parametrize("levels", [[], [1], [1, 2], [1, 2, 4], [1, 2, 2, 4, 4, 1]])
def test_fewer_than_four_levels_has_no_knee(levels):
    y = [100.0 * min(level, 2) for level in levels]

    knee, reason = find_knee(levels, y)

    assert knee is None
    assert reason.startswith("fewer than 4 levels")


def test_missing_throughput_does_not_count_as_a_level():
    knee, reason = find_knee([1, 2, 4, 8], [100.0, 200.0, float("nan"), 200.0])
    assert knee is None and reason.startswith("fewer than 4 levels (3 distinct)")


@pytest.mark.parametrize("seed", range(5))
def test_gentle_curve_tail_half_the_rise_has_no_knee(seed):
    # Same shape as the saturating curves, but the tail keeps half the rise: 0.5 > 0.25.
    y = saturating(LEVELS, 6.0, tail_per_level=50.0, noise_sd=5.0, seed=seed)

    knee, reason = find_knee(LEVELS, y)

    assert knee is None
    assert "still rising" in reason
    # The same curve with a flat tail is accepted, so the ratio is what rejected it.
    assert find_knee(LEVELS, saturating(LEVELS, 6.0, noise_sd=5.0, seed=seed))[0] is not None


def test_knee_well_below_the_peak_is_rejected():
    # Flat from 4 to 10, then a jump at the last two levels: the flat part is under 85% of the peak.
    levels = [1, 2, 3, 4, 6, 8, 10, 11, 12]
    y = [100, 200, 300, 400, 400, 400, 400, 520, 640]

    knee, reason = find_knee(levels, y)

    assert knee is None
    assert "of the peak" in reason


def test_flat_or_falling_throughput_has_no_knee():
    knee, reason = find_knee([1, 2, 4, 8, 16], [500, 480, 470, 450, 400])
    assert knee is None and reason == "throughput does not rise with level at any breakpoint: no knee"


def test_duplicate_levels_are_averaged_first():
    # Each level ran twice with throughputs ±20 around the saturating curve; order is shuffled.
    rng = np.random.default_rng(7)
    base = saturating(LEVELS, 5.0)
    levels = np.concatenate([LEVELS, LEVELS])
    y = np.concatenate([base + 20.0, base - 20.0])
    order = rng.permutation(len(levels))

    knee, reason = find_knee(levels[order], y[order])

    assert knee is not None, reason
    assert knee.level == 5.0
    assert knee.output_tokens_per_s == pytest.approx(500.0)  # the mean of 520 and 480
    assert knee.peak_output_tokens_per_s == pytest.approx(500.0)
    assert knee.rising_slope == pytest.approx(100.0)
    assert knee.tail_slope == pytest.approx(0.0, abs=1e-9)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="same length"):
        find_knee([1, 2, 3, 4], [1, 2, 3])


def test_public_api_and_no_load_generator_import():
    assert sorted(analysis.knee.__all__) == ["Knee", "MAX_TAIL_RATIO", "MIN_LEVELS", "MIN_PEAK_FRACTION", "find_knee"]
    code = "import sys, analysis.knee; print(sorted({'locust', 'gevent'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
