"""The knee of throughput against concurrency (or request rate): where adding load stops adding tokens.

The rule follows GuideLLM's knee profile, restated here:

1. Levels that were measured more than once are averaged first, so each level
   is one point. Pairs with a missing (non-finite) level or throughput are left
   out. At least 4 distinct levels are needed.
2. For every interior level ``x_k`` (at least 2 points on each side, the
   breakpoint itself counting on both), fit one line by least squares to the
   levels up to and including ``x_k`` (the rising slope) and another to the
   levels from ``x_k`` on (the tail slope). The two lines need not meet: a
   continuous (hinged) fit was tried and rejected, because on a gently
   concave curve its rising line overshoots the data near the last levels,
   which makes the short tail look flat and finds a knee that is not there.
   The breakpoint is a measured level, so the knee is a level that was run.
3. A breakpoint is accepted only when the rising slope is positive, the tail
   slope is at most 0.25 of the rising slope (it flattens or falls), and the
   measured throughput at the breakpoint is at least 85% of the peak (a knee
   well below the peak is a dip, not the place it saturated).
4. The knee is the accepted breakpoint with the smallest sum of squared
   errors over both lines (every split fits the same four parameters, so the
   sums compare directly).
   Without one, there is no knee and the reason says why, in plain words.

Why not a library: ``kneed`` (Kneedle) answers a different question, the point
of greatest curvature of a normalised curve; it returns a point for any
concave curve, gentle or not, and has no notion of "the tail is flat" or "near
the peak", both of which are the point here. ``ruptures`` detects change points
in a signal along its index, needs the number of breaks or a penalty tuned to
the noise, and is built for hundreds of samples, not 4 to 20 levels. An
exhaustive two-segment fit over so few points is a handful of ``lstsq`` calls.

Pure: numpy only, no pandas, no Locust.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from analysis.common import adaptive_percent, grouped_number, plain_number

__all__ = [
    "MIN_LEVELS",
    "MAX_TAIL_RATIO",
    "MIN_PEAK_FRACTION",
    "Knee",
    "find_knee",
]

MIN_LEVELS = 4  # distinct levels needed to fit two segments with 2 points each
MAX_TAIL_RATIO = 0.25  # the tail slope may be at most this share of the rising slope
MIN_PEAK_FRACTION = 0.85  # throughput at the knee must be at least this share of the peak


@dataclass(frozen=True, kw_only=True, slots=True)
class Knee:
    """Where throughput stops rising with load, and the two fitted slopes either side."""

    level: float  # concurrency (or rate) at the knee: a measured level
    output_tokens_per_s: float  # measured throughput at the knee (averaged if the level ran twice)
    peak_output_tokens_per_s: float
    rising_slope: float  # tokens/s per unit of level, up to the knee
    tail_slope: float  # tokens/s per unit of level, after it
    reason: str  # one plain sentence explaining the decision


@dataclass(frozen=True, slots=True)
class _Fit:
    index: int
    rising: float
    tail: float
    sse: float


def _average_duplicates(levels: Sequence[float], values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(levels, dtype=float)
    y = np.asarray(values, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"levels and output_tokens_per_s must be flat and the same length ({x.shape} vs {y.shape})")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    unique, inverse = np.unique(x, return_inverse=True)
    means = np.bincount(inverse, weights=y, minlength=len(unique)) / np.bincount(inverse, minlength=len(unique))
    return unique, means


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of ``y`` on ``x`` and the sum of squared residuals."""
    design = np.column_stack([x, np.ones_like(x)])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(coef[0]), float(np.sum((design @ coef - y) ** 2))


def _fit(x: np.ndarray, y: np.ndarray, k: int) -> _Fit:
    rising, sse_rising = _line(x[: k + 1], y[: k + 1])
    tail, sse_tail = _line(x[k:], y[k:])
    return _Fit(index=k, rising=rising, tail=tail, sse=sse_rising + sse_tail)


def _accepted(fit: _Fit, y: np.ndarray, peak: float) -> bool:
    return fit.rising > 0 and fit.tail <= MAX_TAIL_RATIO * fit.rising and y[fit.index] >= MIN_PEAK_FRACTION * peak


def _slope(v: float) -> str:
    return grouped_number(round(v, 2) + 0.0)  # a fit's 1e-14 is 0; + 0.0: no "-0"


def find_knee(levels: Sequence[float], output_tokens_per_s: Sequence[float]) -> tuple[Knee | None, str]:
    """The knee of throughput against level (see the module docstring), or None and the reason there is none.

    ``levels`` and ``output_tokens_per_s`` are paired: one measured throughput
    per stage. The reason is returned either way (it is also ``Knee.reason``).
    """
    x, y = _average_duplicates(levels, output_tokens_per_s)
    if len(x) < MIN_LEVELS:
        return None, f"fewer than {MIN_LEVELS} levels ({len(x)} distinct): too few to find a knee"

    peak = float(np.max(y))
    fits = [_fit(x, y, k) for k in range(1, len(x) - 1)]
    accepted = [f for f in fits if _accepted(f, y, peak)]
    if accepted:
        best = min(accepted, key=lambda f: f.sse)
        level, at_knee = float(x[best.index]), float(y[best.index])
        share = at_knee / peak if peak > 0 else math.nan
        reason = (
            f"throughput levels off at {plain_number(level)} ({grouped_number(at_knee)} tokens/s, "
            f"{adaptive_percent(share)} of the peak {grouped_number(peak)}): slope {_slope(best.rising)} "
            f"tokens/s per level up to there, {_slope(best.tail)} after"
        )
        return Knee(level=level, output_tokens_per_s=at_knee, peak_output_tokens_per_s=peak,
                    rising_slope=best.rising, tail_slope=best.tail, reason=reason), reason

    rising = [f for f in fits if f.rising > 0]
    if not rising:
        return None, "throughput does not rise with level at any breakpoint: no knee"
    best = min(rising, key=lambda f: f.sse)
    level = plain_number(float(x[best.index]))
    if best.tail > MAX_TAIL_RATIO * best.rising:
        return None, (
            f"throughput still rising at the highest level: no knee yet (best split at {level}: "
            f"{_slope(best.tail)} tokens/s per level after it against {_slope(best.rising)} before, "
            f"{adaptive_percent(best.tail / best.rising)} of the rise where a knee needs at most "
            f"{adaptive_percent(MAX_TAIL_RATIO)})"
        )
    share = float(y[best.index]) / peak if peak > 0 else math.nan
    return None, (
        f"throughput flattens at {level} but only at {adaptive_percent(share)} of the peak "
        f"{grouped_number(peak)} tokens/s, below {adaptive_percent(MIN_PEAK_FRACTION)}: no knee"
    )
