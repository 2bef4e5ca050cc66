"""Small pieces the analysis modules share: one threshold, metric names, SLO keys and number text.

What belongs here: constants and pure helpers that more than one of
:mod:`analysis.envelope`, :mod:`analysis.broke` and :mod:`analysis.plots` use
with the same meaning. Anything used by one module stays in that module.

The write-ups format numbers two ways, and each keeps its own so that no
sentence changes: :func:`plain_number` (envelope sentences: levels and counts,
``1234``) and :func:`grouped_number` (what-broke-first sentences: measured
values against limits, ``1,234``, ``?`` when missing). Likewise
:func:`adaptive_percent` (``85%``, ``2.5%``) and :func:`percent` (fixed digits).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "KV_PRESSURE_RATIO",
    "METRIC_NAMES",
    "split_key",
    "finite",
    "plain_number",
    "grouped_number",
    "percent",
    "adaptive_percent",
]

KV_PRESSURE_RATIO = 0.9  # KV-cache use at or above this counts as KV-cache pressure

METRIC_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2e": "E2E"}


def split_key(key: str) -> tuple[str, str]:
    """An SLO or table key's metric and percentile: ``ttft_p95_ms`` -> ``("ttft", "p95")``; else ``(key, "")``."""
    parts = key.split("_")
    return (parts[0], parts[1]) if len(parts) >= 3 else (key, "")


def finite(v: Any) -> bool:
    """True for a finite int or float (bools and missing values are not numbers here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plain_number(v: float) -> str:
    """A level or count without separators: whole numbers in full, under 10 to two significant digits.

    ``v`` must be a finite number (``12.0`` -> ``12``, ``2.25`` -> ``2.2``, ``1234`` -> ``1234``).
    """
    v = float(v)
    return str(int(v)) if v == int(v) else f"{v:.2g}" if abs(v) < 10 else f"{v:.0f}"


def grouped_number(v: Any) -> str:
    """A measured value with thousands separators: ``1,234``, ``2.2``; ``?`` if not a finite number."""
    if not finite(v):
        return "?"
    v = float(v)
    return f"{v:,.0f}" if abs(v) >= 10 or v == int(v) else f"{v:.2g}"


def percent(ratio: Any, *, digits: int = 0) -> str:
    """A ratio as a percentage with fixed ``digits``: ``0.853`` -> ``85%``; ``?`` if not a finite number."""
    if not finite(ratio):
        return "?"
    return f"{100 * float(ratio):.{digits}f}%"


def adaptive_percent(ratio: Any) -> str:
    """A ratio as a percentage, one decimal only under 10% and not whole: ``85%``, ``2.5%``, ``2%``."""
    if not finite(ratio):
        return "?"
    p = 100 * ratio
    return percent(ratio, digits=0 if p >= 10 or p == int(p) else 1)
