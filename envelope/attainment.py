"""SLO attainment: which requests were *good*, what share of them, and how sure that share is.

A request is **good** when it succeeded and met every per-request latency
threshold of its stage (DistServe's and vLLM ``--goodput``'s definition):

- ``ttft_ms``, ``tpot_ms``, ``e2e_ms`` in a stage's ``slos`` are the thresholds;
- where one is not set, the threshold of that metric's percentile SLO is used
  (``ttft_p95_ms: 1000`` makes every request with TTFT above 1 s not good); with
  several percentiles of one metric, the highest percentile's threshold. So
  with ``p95`` SLOs, "attainment >= 0.95" and "p95 <= threshold" are the same
  statement, read per request instead of per stage.
- Open-loop requests are judged from when they were *meant* to be sent
  (``t_intended_s``): a request the load generator could not send on time was
  late for its user too.

**Attainment** = good / judged, where judged = every request sent in the window
that succeeded or failed; requests the load generator cancelled (it stopped them)
are neither. Errors count as not good. Its 95% interval is Wilson's score
interval (:func:`wilson_interval`, from scipy), which stays inside [0, 1] and is
honest at small counts and at attainment near 1, where the normal approximation
is not. **Goodput** = good requests (and their output tokens) per second.

Pure: no Locust, no pandas (the analysis applies the same thresholds to its
frame through :func:`good_mask`). scipy is imported on first use, since most
importers never compute an interval; a process that computes them while it
measures calls :func:`preload_statistics` before the load starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from envelope.records import ErrorCategory

__all__ = [
    "DEFAULT_ATTAINMENT_TARGET",
    "Thresholds",
    "Attainment",
    "thresholds_from_slos",
    "attainment_target",
    "wilson_interval",
    "preload_statistics",
    "judge_record",
    "good_mask",
]

DEFAULT_ATTAINMENT_TARGET = 0.95
_METRICS = ("ttft", "tpot", "e2e")


@dataclass(frozen=True, kw_only=True, slots=True)
class Thresholds:
    """Per-request latency thresholds, milliseconds; None: not judged on that metric."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2e_ms))

    def describe(self) -> str:
        """``TTFT <= 500 ms, TPOT <= 20 ms`` (empty when no threshold is set)."""
        parts = [f"{name.upper()} <= {value:g} ms" for name, value in
                 (("ttft", self.ttft_ms), ("tpot", self.tpot_ms), ("e2e", self.e2e_ms)) if value is not None]
        return ", ".join(parts)


def thresholds_from_slos(slos: Mapping[str, float]) -> Thresholds:
    """The per-request thresholds a stage's SLOs imply (see the module docstring)."""
    values: dict[str, float | None] = {}
    for metric in _METRICS:
        explicit = slos.get(f"{metric}_ms")
        if explicit is not None:
            values[f"{metric}_ms"] = float(explicit)
            continue
        best_q, best = -1.0, None
        for key, value in slos.items():
            if key.startswith(f"{metric}_p") and key.endswith("_ms") and value is not None:
                try:
                    q = float(key[len(metric) + 2:-3])
                except ValueError:
                    continue
                if q > best_q:
                    best_q, best = q, float(value)
        values[f"{metric}_ms"] = best
    return Thresholds(**values)


def attainment_target(slos: Mapping[str, float]) -> float:
    """The share of good requests a stage must reach (``attainment_min``, default 0.95)."""
    value = slos.get("attainment_min")
    return DEFAULT_ATTAINMENT_TARGET if value is None else float(value)


def preload_statistics() -> None:
    """Import what :func:`wilson_interval` and :func:`envelope.search.requests_to_pass` use, now.

    Importing ``scipy.stats`` takes 1.9 s of CPU on a slow 2-core box. The Locust process that steers a
    search, or serves the live LLM tab, computes intervals while requests are in flight; imported there on
    first use (the first probe's first decision) it blocked the gevent loop for 1.1-1.9 s, and every
    request in flight measured it: their TTFT and ITL grew by it, and the probe was flagged NOT TRUSTWORTHY
    for a stall of the load generator's own making. So that process calls this before the load starts.
    """
    import scipy.stats  # noqa: F401  (binomtest, norm)


def wilson_interval(good: int, judged: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for a proportion ``good / judged``; (0, 1) when nothing was judged."""
    if judged <= 0:
        return 0.0, 1.0
    from scipy.stats import binomtest

    ci = binomtest(int(good), int(judged)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


@dataclass(frozen=True, kw_only=True, slots=True)
class Attainment:
    """Good requests out of those judged, with the Wilson interval of the share."""

    good: int
    judged: int
    low: float
    high: float
    confidence: float = 0.95

    @classmethod
    def of(cls, good: int, judged: int, *, confidence: float = 0.95) -> "Attainment":
        low, high = wilson_interval(good, judged, confidence=confidence)
        return cls(good=int(good), judged=int(judged), low=low, high=high, confidence=confidence)

    @property
    def share(self) -> float:
        return self.good / self.judged if self.judged else math.nan

    def verdict(self, target: float) -> str:
        """``pass`` (the whole interval at or above target), ``fail`` (wholly below) or ``unresolved``."""
        if self.judged == 0:
            return "unresolved"
        if self.low >= target:
            return "pass"
        if self.high < target:
            return "fail"
        return "unresolved"


def _latency_ms(rec: Mapping[str, Any], mark: str) -> float | None:
    t = rec.get(mark)
    if t is None:
        return None
    origin = rec.get("t_intended_s")
    if origin is None:
        origin = rec.get("t_start_s")
    return (t - origin) * 1000.0


def judge_record(rec: Mapping[str, Any], thresholds: Thresholds) -> bool | None:
    """True (good), False (not good) or None (cancelled by the load generator: not judged)."""
    category = rec.get("error_category")
    if category == ErrorCategory.CANCELLED:
        return None
    if category is not None:
        return False
    ttft = _latency_ms(rec, "t_first_token_s")
    e2e = _latency_ms(rec, "t_last_token_s")
    if thresholds.ttft_ms is not None and (ttft is None or ttft > thresholds.ttft_ms):
        return False
    if thresholds.e2e_ms is not None and (e2e is None or e2e > thresholds.e2e_ms):
        return False
    if thresholds.tpot_ms is not None:
        out = rec.get("output_tokens")
        t_first, t_last = rec.get("t_first_token_s"), rec.get("t_last_token_s")
        if out is not None and out >= 2 and t_first is not None and t_last is not None:
            if (t_last - t_first) * 1000.0 / (out - 1) > thresholds.tpot_ms:
                return False
    return True


def good_mask(ok: np.ndarray, ttft_ms: np.ndarray, tpot_ms: np.ndarray, e2e_ms: np.ndarray,
              thresholds: Thresholds) -> np.ndarray:
    """Vectorised :func:`judge_record` for the requests already known to be judged.

    ``ttft_ms``/``e2e_ms`` measured from the intended send time for open-loop
    requests; NaN TPOT (a one-token answer) is not judged on TPOT.
    """
    good = np.asarray(ok, dtype=bool).copy()
    for values, limit, nan_is_bad in ((ttft_ms, thresholds.ttft_ms, True), (e2e_ms, thresholds.e2e_ms, True),
                                      (tpot_ms, thresholds.tpot_ms, False)):
        if limit is None:
            continue
        v = np.asarray(values, dtype=float)
        with np.errstate(invalid="ignore"):
            bad = v > limit
        if nan_is_bad:
            bad |= np.isnan(v)
        good &= ~bad
    return good
