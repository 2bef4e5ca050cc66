"""The server's prefix-cache hit rate over a stage's window, from its ``/metrics`` counters.

vLLM counts prompt tokens looked up in its prefix cache (``vllm:prefix_cache_queries``) and those
found there (``vllm:prefix_cache_hits``), cumulatively since the server started; older servers
named them ``vllm:gpu_prefix_cache_queries``/``..._hits``, and a counter's sample carries ``_total``
(very old clients sent the bare name). For one window, the deltas between the last sample at or
before its start and the last at or before its end (the windowing of :mod:`analysis.server_latency`)
give the tokens looked up in between and the share that hit.

A telemetry sample may hold the counters under our field names (``prefix_cache_hits_total``,
``prefix_cache_queries_total``, as the sampler names its other counters) or under vLLM's own names;
the first name a sample has wins (names are never added together: a server in transition exposes
the old and the new name for the same quantity). Only samples that hold both counters count.

Pure functions; :mod:`analysis.table` feeds them the metrics samples.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

__all__ = [
    "PREFIX_CACHE_HITS",
    "PREFIX_CACHE_QUERIES",
    "PrefixCacheWindow",
    "prefix_cache_counters",
    "prefix_cache_window",
]


def _names(stem: str) -> tuple[str, ...]:
    # our field name first, then vLLM's: newest metric first, "_total" before the bare name
    return tuple(f"{prefix}{generation}{stem}{suffix}" for prefix in ("", "vllm:")
                 for generation in ("", "gpu_") for suffix in ("_total", ""))


PREFIX_CACHE_HITS: tuple[str, ...] = _names("prefix_cache_hits")
"""Sample fields that hold the prefix-cache hit counter (tokens), in the order they are tried."""
PREFIX_CACHE_QUERIES: tuple[str, ...] = _names("prefix_cache_queries")
"""Sample fields that hold the prefix-cache query counter (tokens), in the order they are tried."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PrefixCacheWindow:
    """Prompt tokens the server looked up in its prefix cache over a window, and those that hit."""

    queried_tokens: float
    hit_tokens: float

    @property
    def hit_ratio(self) -> float | None:
        """hits / queries; None when nothing was looked up."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens > 0 else None


def prefix_cache_counters(metrics: pd.DataFrame | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(t_unix_s, hits, queries)`` of the metrics samples that hold both counters, in time order.

    ``metrics``: the run's metrics samples, one row each (``Run.telemetry["metrics"]``). Empty arrays
    when there are none.
    """
    empty = (np.empty(0), np.empty(0), np.empty(0))
    if metrics is None or metrics.empty or "t_unix_s" not in metrics.columns:
        return empty
    hits, queries = _first_present(metrics, PREFIX_CACHE_HITS), _first_present(metrics, PREFIX_CACHE_QUERIES)
    if hits is None or queries is None:
        return empty
    t = pd.to_numeric(metrics["t_unix_s"], errors="coerce").to_numpy(dtype=float)
    keep = ~(np.isnan(t) | np.isnan(hits) | np.isnan(queries))
    order = np.argsort(t[keep], kind="stable")
    return t[keep][order], hits[keep][order], queries[keep][order]


def _first_present(frame: pd.DataFrame, names: Sequence[str]) -> np.ndarray | None:
    """Per row, the value of the first of ``names`` the row has (NaN: none); None when no column exists."""
    present = [n for n in names if n in frame.columns]
    if not present:
        return None
    out = np.full(len(frame), np.nan)
    for name in present:
        values = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float)
        out = np.where(np.isnan(out), values, out)
    return out


def prefix_cache_window(times_s: Sequence[float], hits: Sequence[float], queries: Sequence[float],
                        start_s: float, end_s: float) -> PrefixCacheWindow | None:
    """The counters' deltas over ``[start_s, end_s]``: between the last samples at or before each edge.

    ``times_s`` sorted. None when no sample lies at or before the start, or when either counter went
    down in between (the server restarted: no delta).
    """
    a = bisect_right(times_s, start_s) - 1
    b = bisect_right(times_s, end_s) - 1
    if a < 0 or b < 0:
        return None
    hit, queried = float(hits[b]) - float(hits[a]), float(queries[b]) - float(queries[a])
    if hit < 0 or queried < 0:
        return None
    return PrefixCacheWindow(queried_tokens=queried, hit_tokens=hit)
