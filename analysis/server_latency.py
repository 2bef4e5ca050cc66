"""Where the time goes: the server's own latency histograms over a stage's window.

vLLM's ``/metrics`` histograms are cumulative since the server started. For one
window, the delta between the last sample at or before the window's start and
the last sample at or before its end holds the requests the server *finished*
in between (the client's percentiles count requests that *started* in the
window: the two populations overlap, they are not the same requests).

From each delta: the mean (sum / count) and p50/p95 interpolated inside the
buckets as Prometheus' ``histogram_quantile`` does, so a server percentile is
only as fine as its bucket bounds. The client's mean TTFT minus the server's is
the time spent outside the engine: the API front end, the network and the load
generator itself.

Pure functions; :mod:`analysis.table` feeds them the metrics samples.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import Any, Mapping, Sequence

from analysis.rows import ServerLatency
from envelope.telemetry import histogram_delta, histogram_quantile

__all__ = [
    "SERVER_HISTOGRAMS",
    "window_deltas",
    "histogram_mean_s",
    "bucket_width_s",
    "server_latency",
]

# our histogram field -> the column stem in ServerLatency
SERVER_HISTOGRAMS: dict[str, str] = {
    "ttft_s": "ttft",
    "queue_s": "queue",
    "prefill_s": "prefill",
    "decode_s": "decode",
    "e2e_s": "e2e",
}
"""The histograms the decomposition reads (analysis keeps only these of each sample)."""


def _at_or_before(times_s: Sequence[float], t: float) -> int | None:
    i = bisect_right(times_s, t) - 1
    return i if i >= 0 else None


def window_deltas(times_s: Sequence[float], histograms: Sequence[Mapping[str, Any] | None],
                  start_s: float, end_s: float) -> dict[str, dict | None] | None:
    """Per histogram field, its delta over the window ``[start_s, end_s]``.

    ``times_s`` (sorted) and ``histograms`` are the samples in time order (each a
    sample's ``histograms`` mapping, or None). ``None`` for the whole window when no
    sample lies at or before its start; per field, None when either sample lacks
    the histogram or its counts went down (the server restarted: no delta).
    """
    a = _at_or_before(times_s, start_s)
    b = _at_or_before(times_s, end_s)
    if a is None or b is None:
        return None
    ha, hb = (h if isinstance(h, Mapping) else {} for h in (histograms[a], histograms[b]))
    out: dict[str, dict | None] = {}
    for field in SERVER_HISTOGRAMS:
        try:
            out[field] = histogram_delta(ha.get(field), hb.get(field))
        except (ValueError, KeyError, TypeError):  # a reset, other bounds, a malformed sample
            out[field] = None
    return out


def histogram_mean_s(hist: Mapping[str, Any] | None) -> float | None:
    """``sum / count``; None without observations."""
    if hist is None or not hist["count"] or hist["count"] <= 0:
        return None
    return float(hist["sum"]) / float(hist["count"])


def bucket_width_s(hist: Mapping[str, Any] | None, value_s: float | None) -> float | None:
    """The width of the bucket ``value_s`` falls in (the first from 0); inf above the last finite bound."""
    if hist is None or value_s is None or not hist["buckets"]:
        return None
    lower = 0.0
    for le, _ in hist["buckets"]:
        if value_s <= le:
            return float(le) - lower
        lower = float(le)
    return math.inf


def _ms(value_s: float | None) -> float | None:
    return None if value_s is None else value_s * 1000.0


def server_latency(deltas: Mapping[str, dict | None] | None, *, client_ttft_mean_ms: float | None) -> ServerLatency:
    """The :class:`~analysis.rows.ServerLatency` cells of one window's histogram deltas.

    A histogram whose delta holds no request gives None cells. ``server_requests_finished``
    is the E2E histogram's count delta. ``outside_engine_ttft_mean_ms`` = client mean TTFT -
    server mean TTFT (None when either is missing).
    """
    if deltas is None:
        return ServerLatency()
    cells: dict[str, Any] = {}
    for field, stem in SERVER_HISTOGRAMS.items():
        hist = deltas.get(field)
        mean = histogram_mean_s(hist)
        if mean is None:
            continue
        cells[f"server_{stem}_mean_ms"] = _ms(mean)
        cells[f"server_{stem}_p50_ms"] = _ms(histogram_quantile(hist, 0.50))
        cells[f"server_{stem}_p95_ms"] = _ms(histogram_quantile(hist, 0.95))
    e2e = deltas.get("e2e_s")
    if e2e is not None:
        cells["server_requests_finished"] = int(round(e2e["count"]))
    ttft_mean = histogram_mean_s(deltas.get("ttft_s"))
    if ttft_mean is not None:
        cells["server_ttft_mean_bucket_ms"] = _ms(bucket_width_s(deltas["ttft_s"], ttft_mean))
        client = client_ttft_mean_ms
        if client is not None and math.isfinite(client):
            cells["outside_engine_ttft_mean_ms"] = client - ttft_mean * 1000.0
    return ServerLatency(**cells)
