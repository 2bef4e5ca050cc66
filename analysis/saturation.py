"""Open-loop over-capacity: a fixed-rate stage the server could not keep up with.

An open-loop stage sends requests at a fixed rate whatever the server does. If
the server serves fewer per second than arrive, the stage has no steady state:
requests in flight and TTFT keep rising through the window, and its latency
percentiles only measure how long the queue had grown by the time the window
closed (a longer window would report worse numbers). Such a stage is over
capacity, and its percentiles must not be read as the server's latency at that
rate.

The rule, after GuideLLM's over-saturation stop (it stops a run when both
concurrency and TTFT keep rising, judged by slopes with t-distribution margins):

- Fit a least-squares line to requests in flight against time (sampled over the
  window, e.g. once a second) and another to TTFT against each request's start
  time (:func:`trend`: ``scipy.stats.linregress`` for the slope and its standard
  error, ``scipy.stats.t.ppf`` with n - 2 degrees of freedom for the two-sided
  margin at ``confidence``).
- The stage is over capacity only when both slopes' lower bounds are above 0
  **and** both fitted rises across the window are material: in flight rose by at
  least ``max(1, min_rise_fraction * its mean)`` requests and TTFT by at least
  ``min_rise_fraction * its median``. The second test keeps a steady but noisy
  stage with thousands of samples, where a drift of a few milliseconds is
  "significant", from being flagged.
- Both are needed: in flight alone also rises while a stage ramps up or when
  the server batches more without slowing down, and TTFT alone also rises with
  prompt length or prefix-cache misses.

The slopes' intervals assume independent residuals; queue samples a second
apart are not, so the intervals are narrower than they should be, which is
one more reason for the material-rise test. It is not a full cure: in a
simulated single-server queue with Poisson arrivals and a 60 s window, a
steady stage was flagged in about 2% of runs at half load, 11% at 75% and
29% at 87.5% (a short queue wanders by more than 1 request and 25% of a
small TTFT). Widening the intervals by the residuals' lag-1 autocorrelation
cut those to 0.3%, 2% and 4% but missed a third of stages at 125% load, so
it is not done here. Instead, given the stage's rate (``rate_per_s``), in
flight must also grow by at least ``min_unserved_share`` (10%) of it: at least
one request in ten left unserved. A queue near capacity drifts far less than
that; one at 125% load leaves 20% unserved.

Pure: numpy and scipy, no pandas, no Locust.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from analysis.common import grouped_number, percent

__all__ = [
    "MIN_POINTS",
    "Trend",
    "Saturation",
    "trend",
    "over_capacity",
]

MIN_POINTS = 3  # a slope with a margin needs at least one degree of freedom (n - 2)


@dataclass(frozen=True, kw_only=True, slots=True)
class Trend:
    """A least-squares slope against time and its two-sided t-distribution confidence interval."""

    slope_per_s: float
    low_per_s: float
    high_per_s: float
    points: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Saturation:
    """Whether an open-loop stage was over capacity, with the trends that decided it."""

    over_capacity: bool
    in_flight: Trend | None  # requests in flight per second of window
    ttft: Trend | None  # TTFT in ms per second of window
    reason: str  # one plain sentence


def _finite_pairs(t_s: Sequence[float], values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(t_s, dtype=float)
    v = np.asarray(values, dtype=float)
    if t.shape != v.shape or t.ndim != 1:
        raise ValueError(f"times and values must be flat and the same length ({t.shape} vs {v.shape})")
    keep = np.isfinite(t) & np.isfinite(v)
    return t[keep], v[keep]


def _fit(t: np.ndarray, v: np.ndarray, confidence: float) -> Trend | None:
    if len(t) < MIN_POINTS or np.ptp(t) == 0:
        return None
    from scipy.stats import linregress, t as student_t

    fit = linregress(t, v)
    margin = float(student_t.ppf((1 + confidence) / 2, len(t) - 2)) * float(fit.stderr)
    slope = float(fit.slope)
    return Trend(slope_per_s=slope, low_per_s=slope - margin, high_per_s=slope + margin, points=len(t))


def trend(t_s: Sequence[float], values: Sequence[float], *, confidence: float = 0.95) -> Trend | None:
    """The slope of ``values`` against ``t_s`` (per second) with its interval; None under 3 points or one instant.

    Pairs with a missing (non-finite) time or value are left out.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    return _fit(*_finite_pairs(t_s, values), confidence)


def _number(v: float) -> str:
    return grouped_number(round(v, 3) + 0.0)  # + 0.0: no "-0"


def _rate(name: str, fit: Trend, unit: str, level: str) -> str:
    """``in flight rose 2.1/s (95% CI 1.8 to 2.4)``."""
    verb = "rose" if fit.slope_per_s >= 0 else "fell"
    return (f"{name} {verb} {_number(abs(fit.slope_per_s))}{unit}/s ({level} CI {_number(fit.low_per_s)} to "
            f"{_number(fit.high_per_s)})")


def over_capacity(
    in_flight_t_s: Sequence[float],
    in_flight: Sequence[float],
    ttft_t_s: Sequence[float],
    ttft_ms: Sequence[float],
    *,
    confidence: float = 0.95,
    min_rise_fraction: float = 0.25,
    rate_per_s: float | None = None,
    min_unserved_share: float = 0.10,
) -> Saturation:
    """Whether an open-loop stage was over capacity (the rule is in the module docstring).

    ``in_flight_t_s``/``in_flight``: requests in flight sampled over the window
    (time in seconds on any clock, count). ``ttft_t_s``/``ttft_ms``: each
    request's start time (same clock) and its TTFT in milliseconds.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    qt, qv = _finite_pairs(in_flight_t_s, in_flight)
    tt, tv = _finite_pairs(ttft_t_s, ttft_ms)
    q_fit, t_fit = _fit(qt, qv, confidence), _fit(tt, tv, confidence)
    if q_fit is None or t_fit is None:
        return Saturation(over_capacity=False, in_flight=q_fit, ttft=t_fit, reason=(
            f"too few points to judge over capacity: {len(qt)} in-flight samples and {len(tv)} TTFTs "
            f"(at least {MIN_POINTS} of each, spread over time)"))

    level = percent(confidence, digits=0 if round(100 * confidence, 6).is_integer() else 1)
    q_rise = q_fit.slope_per_s * float(np.ptp(qt))
    t_rise = t_fit.slope_per_s * float(np.ptp(tt))
    q_needed = max(1.0, min_rise_fraction * float(np.mean(qv)))
    t_needed = min_rise_fraction * float(np.median(tv))
    # with the stage's rate known, in flight must also grow by a material share of it: a queue near
    # capacity wanders by a few requests (see the docstring), one over it leaves arrivals unserved
    q_needed_per_s = 0.0 if rate_per_s is None else min_unserved_share * rate_per_s
    q_rising = q_fit.low_per_s > 0 and q_rise >= q_needed and q_fit.slope_per_s >= q_needed_per_s
    t_rising = t_fit.low_per_s > 0 and t_rise >= t_needed
    q_text = _rate("in flight", q_fit, "", level)
    t_text = _rate("TTFT", t_fit, " ms", level)
    if q_rising and t_rising:
        return Saturation(over_capacity=True, in_flight=q_fit, ttft=t_fit, reason=(
            f"over capacity: {q_text} and {t_text} through the window, "
            f"so its latency percentiles measure a growing queue"))

    q_mean, t_median = float(np.mean(qv)), float(np.median(tv))
    parts = [
        _judged(q_text, q_fit, q_rising, f"{_number(q_rise)} over the window where {_number(q_needed)} (the larger of "
                f"1 and {percent(min_rise_fraction)} of the mean {_number(q_mean)}) would matter"),
        _judged(t_text, t_fit, t_rising, f"{_number(t_rise)} ms over the window where {_number(t_needed)} ms "
                f"({percent(min_rise_fraction)} of the median {_number(t_median)} ms) would matter"),
    ]
    return Saturation(over_capacity=False, in_flight=q_fit, ttft=t_fit, reason="not over capacity: " + "; ".join(parts))


def _judged(text: str, fit: Trend, rising: bool, too_small: str) -> str:
    """One trend's clause in a not-over-capacity reason: as is if it rose, else why it does not count."""
    if rising:
        return text
    if fit.low_per_s <= 0:
        return f"{text}, not clearly above 0"
    return f"{text}, only {too_small}"
