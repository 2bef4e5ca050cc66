"""Per-request metrics as pure functions over request records.

Records are taken as mappings with the keys of
:class:`envelope.records.RequestRecord` (the JSON form). Scalar functions
return seconds, or None when the metric is undefined for that record (a failed
request, no first token, fewer than two output tokens for TPOT).
:func:`per_request_frame` and :func:`itl_values_ms` compute the same numbers
for many records at once, in milliseconds.

Definitions follow vLLM's benchmark (``vllm bench serve``) except where noted:

- A *token chunk* is a chunk with ``choices`` that carries a new output token:
  its continuous ``usage.completion_tokens`` rose, or, without usage, it
  carries text, reasoning or tool calls (see
  :class:`envelope.stream.StreamObserver`). A token whose text is held back
  (empty content) counts; the role-only first chunk does not.
- TTFT = ``t_first_token_s - t_start_s``, the first token chunk. Differs:
  vLLM's benchmark stops the clock at the first chunk that has ``choices``,
  which for chat is the role-only chunk; vLLM sends it in the same engine step
  as the first token, so the two rarely differ by much.
- E2E = ``t_last_token_s - t_start_s``: it ends at the last token chunk, not at
  ``[DONE]`` or the usage-only chunk. Differs slightly: vLLM's ends at the last
  chunk with ``choices``, which may be a finish chunk that adds no token.
- TPOT = ``(E2E - TTFT) / (output_tokens - 1)`` with ``output_tokens`` from
  ``usage.completion_tokens`` (the client estimate when the server sent none).
  Undefined below two output tokens (vLLM leaves such requests out as well).
- ITL is **per token**, where vLLM's is per chunk. The gap before token chunk
  ``i >= 1`` is spread over the ``k_i`` tokens that chunk carried: it contributes
  ``k_i`` values of ``gap / k_i``. ``k_i`` comes from ``chunk_tokens``; when that
  is missing, does not match the chunks, or holds a count below one, each chunk
  counts as one token (vLLM's per-chunk ITL). Tokens beyond the first carried by
  the *first* token chunk (``k_0 - 1``) contribute no ITL values: they arrived
  together with the first token, and that wait is TTFT, not ITL. So a request
  whose chunks each carry one token gives exactly vLLM's ITL values.
- Only successful requests (``error_category`` null) have TTFT, E2E, TPOT or ITL.
- :func:`percentiles` uses numpy's default linear interpolation, as vLLM does;
  an empty input gives NaN where vLLM reports 0.
"""

from __future__ import annotations

import math
from itertools import chain
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "ttft_s",
    "e2e_s",
    "tpot_s",
    "itl_s",
    "request_output_tokens_per_s",
    "send_lag_s",
    "ttft_from_intended_s",
    "e2e_from_intended_s",
    "achieved_send_rate_per_s",
    "percentiles",
    "per_request_frame",
    "itl_values_ms",
    "FRAME_COLUMNS",
    "usable_chunk_tokens",
]

_IDENTITY_COLUMNS = (
    "run_id",
    "request_id",
    "worker_id",
    "client",
    "endpoint",
    "pass_name",
    "stage_index",
    "stage_name",
)

FRAME_COLUMNS: tuple[str, ...] = _IDENTITY_COLUMNS + (
    "wall_start_unix_s",
    "ok",
    "error_category",
    "http_status",
    "prompt_tokens",
    "output_tokens",
    "output_tokens_estimated",
    "requested_output_tokens",
    "ttft_ms",
    "tpot_ms",
    "e2e_ms",
    "request_output_tokens_per_s",
    "send_lag_ms",
    "ttft_from_intended_ms",
    "e2e_from_intended_ms",
    "n_chunks",
    "multi_token_chunks",
    "itl_mean_ms",
    "user_id",
    "client_stall_max_ms",
)


def _ok(rec: Mapping[str, Any]) -> bool:
    return rec.get("error_category") is None


def usable_chunk_tokens(offsets: Sequence[float], tokens: Sequence[int] | None) -> Sequence[int] | None:
    """``chunk_tokens`` when it describes every chunk with counts >= 1, else None."""
    if tokens and len(tokens) == len(offsets) and min(tokens) >= 1:
        return tokens
    return None


def ttft_s(rec: Mapping[str, Any]) -> float | None:
    """Time to first token: first token chunk minus request start."""
    t_first = rec.get("t_first_token_s")
    if t_first is None or not _ok(rec):
        return None
    return t_first - rec["t_start_s"]


def e2e_s(rec: Mapping[str, Any]) -> float | None:
    """End-to-end latency: last token chunk minus request start."""
    t_last = rec.get("t_last_token_s")
    if t_last is None or not _ok(rec):
        return None
    return t_last - rec["t_start_s"]


def tpot_s(rec: Mapping[str, Any]) -> float | None:
    """Time per output token after the first: ``(E2E - TTFT) / (output_tokens - 1)``."""
    out = rec.get("output_tokens")
    if out is None or out < 2:
        return None
    ttft, e2e = ttft_s(rec), e2e_s(rec)
    if ttft is None or e2e is None:
        return None
    return (e2e - ttft) / (out - 1)


def itl_s(rec: Mapping[str, Any]) -> list[float]:
    """Per-token inter-token latencies of one request (empty when undefined)."""
    offsets = rec.get("chunk_offsets_s") or ()
    if len(offsets) < 2 or not _ok(rec):
        return []
    tokens = usable_chunk_tokens(offsets, rec.get("chunk_tokens"))
    values: list[float] = []
    for i in range(1, len(offsets)):
        gap = offsets[i] - offsets[i - 1]
        k = tokens[i] if tokens is not None else 1
        if k == 1:
            values.append(gap)
        else:
            values.extend([gap / k] * k)
    return values


def request_output_tokens_per_s(rec: Mapping[str, Any]) -> float | None:
    """Output tokens divided by E2E for one request (None when undefined)."""
    out = rec.get("output_tokens")
    e2e = e2e_s(rec)
    if out is None or e2e is None or e2e <= 0:
        return None
    return out / e2e


def send_lag_s(rec: Mapping[str, Any]) -> float | None:
    """Open loop only: how late the request was sent, ``t_start_s - t_intended_s``."""
    intended = rec.get("t_intended_s")
    if intended is None:
        return None
    return rec["t_start_s"] - intended


def ttft_from_intended_s(rec: Mapping[str, Any]) -> float | None:
    """Open loop only: TTFT as the user who meant to send at ``t_intended_s`` saw it (TTFT + send lag)."""
    intended, t_first = rec.get("t_intended_s"), rec.get("t_first_token_s")
    if intended is None or t_first is None or not _ok(rec):
        return None
    return t_first - intended


def e2e_from_intended_s(rec: Mapping[str, Any]) -> float | None:
    """Open loop only: E2E measured from the intended send time (E2E + send lag)."""
    intended, t_last = rec.get("t_intended_s"), rec.get("t_last_token_s")
    if intended is None or t_last is None or not _ok(rec):
        return None
    return t_last - intended


def achieved_send_rate_per_s(wall_starts_unix_s: Iterable[float], start_unix_s: float, end_unix_s: float) -> float:
    """Requests actually sent inside ``[start, end)`` per second: what an open-loop stage delivered.

    A send that slipped past the stage's end (a busy client, a full concurrency
    cap) does not count, so a client that falls behind shows a shortfall.
    """
    if end_unix_s <= start_unix_s:
        raise ValueError("the window must have a positive length")
    sent = sum(1 for t in wall_starts_unix_s if start_unix_s <= t < end_unix_s)
    return sent / (end_unix_s - start_unix_s)


def percentiles(values: Iterable[float | None], qs: Sequence[float] = (50, 90, 95, 99), *,
                overwrite_input: bool = False) -> dict[str, float]:
    """``{"p50": …, …, "mean": …}`` of ``values`` (None and NaN ignored).

    Uses numpy's default linear interpolation, like vLLM's benchmark. With no
    values every entry is NaN. Keys are ``f"p{q:g}"`` (``p99.9`` for 99.9).

    ``overwrite_input``: ``values`` is an array the caller no longer needs,
    which may be reordered instead of copied (tens of millions of ITL values
    are hundreds of MB). A float32 one is then not converted either: its
    percentiles come out exactly as from its float64 copy (see
    :func:`_float32_percentiles`); its mean is accumulated in float64.
    """
    if isinstance(values, np.ndarray):
        if overwrite_input and values.dtype == np.float32:
            return _float32_percentiles(values, qs)
        arr = values.astype(float, copy=False)  # no Python walk: runs hold tens of millions of ITL values
        scratch = overwrite_input or arr is not values  # astype made a copy of our own
    else:
        arr = np.asarray([v for v in values if v is not None], dtype=float)
        scratch = True
    # a sum is NaN when any value is (or +inf meets -inf): no mask the size of arr for clean data
    if np.isnan(arr.sum()):
        arr = arr[~np.isnan(arr)]
        scratch = True
    if arr.size == 0:
        out = {f"p{q:g}": math.nan for q in qs}
        out["mean"] = math.nan
        return out
    mean = float(arr.mean())  # before np.percentile may reorder arr: the same sum, in the same order
    points = np.percentile(arr, list(qs), overwrite_input=scratch)
    out = {f"p{q:g}": float(p) for q, p in zip(qs, points)}
    out["mean"] = mean
    return out


def _float32_percentiles(arr: np.ndarray, qs: Sequence[float]) -> dict[str, float]:
    """:func:`percentiles` of a float32 array that may be reordered, without a float64 copy.

    numpy interpolates between two neighbouring order statistics ``a <= b`` in float64 (the
    quantiles and weights are float64 for a list of them), except ``b - a``, which it takes in
    the array's float32. That difference is exact when ``b <= 2a`` (Sterbenz's lemma; likewise
    for negatives, or when either is 0), so the result is then the float64 computation's, bit for
    bit. Each neighbour pair numpy may have used is checked; if one is not so close, the
    percentiles are computed from a float64 copy after all.
    """
    if np.isnan(arr.sum()):
        arr = arr[~np.isnan(arr)]
    n = arr.size
    if n == 0:
        return {**{f"p{q:g}": math.nan for q in qs}, "mean": math.nan}
    mean = float(arr.mean(dtype=np.float64))
    points = np.percentile(arr, list(qs), overwrite_input=True)
    # numpy's lower neighbour is floor((n - 1) q / 100) up to rounding: check one rank either side
    ranks = sorted({r for q in qs for k in [math.floor(q / 100 * (n - 1))] for r in range(k - 1, k + 3) if 0 <= r < n})
    arr.partition(ranks)
    stats = dict(zip(ranks, arr[ranks].astype(np.float64).tolist()))
    if not all(_exact_difference(stats[r], stats[r + 1]) for r in ranks if r + 1 in stats):
        points = np.percentile(arr.astype(np.float64), list(qs))
    return {**{f"p{q:g}": float(p) for q, p in zip(qs, points)}, "mean": mean}


def _exact_difference(a: float, b: float) -> bool:
    """Whether ``b - a`` (``a <= b``, both float32 values) is exact in float32."""
    if a == b or a == 0.0 or b == 0.0:
        return True
    if a > 0.0:
        return b <= 2.0 * a
    if b < 0.0:
        return a >= 2.0 * b
    return False


def _float_column(values: list[Any]) -> np.ndarray:
    # numpy turns None into NaN for float arrays
    return np.array(values, dtype=float) if values else np.empty(0, dtype=float)


def per_request_frame(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per record with the per-request metrics, in milliseconds.

    Columns are :data:`FRAME_COLUMNS`. Undefined metrics are NaN; integer
    columns are nullable (``Int64``). Agrees with the scalar functions.
    ``n_chunks`` counts token chunks; ``multi_token_chunks`` those carrying more
    than one token (0 without usable ``chunk_tokens``); ``itl_mean_ms`` is the
    mean of the request's per-token ITL values.
    """
    recs = records if isinstance(records, list) else list(records)
    columns: dict[str, Any] = {}
    for name in _IDENTITY_COLUMNS:
        columns[name] = [r.get(name) for r in recs]
    columns["stage_index"] = pd.array(columns["stage_index"], dtype="Int64")
    columns["wall_start_unix_s"] = _float_column([r.get("wall_start_unix_s") for r in recs])

    errors = [r.get("error_category") for r in recs]
    ok = np.array([e is None for e in errors], dtype=bool)
    columns["ok"] = ok
    columns["error_category"] = errors
    columns["http_status"] = pd.array([r.get("http_status") for r in recs], dtype="Int64")
    columns["prompt_tokens"] = pd.array([r.get("prompt_tokens") for r in recs], dtype="Int64")
    out_list = [r.get("output_tokens") for r in recs]
    columns["output_tokens"] = pd.array(out_list, dtype="Int64")
    columns["output_tokens_estimated"] = np.array(
        [bool(r.get("output_tokens_estimated", False)) for r in recs], dtype=bool
    )
    columns["requested_output_tokens"] = pd.array([r.get("requested_output_tokens") for r in recs], dtype="Int64")

    t_start = _float_column([r.get("t_start_s") for r in recs])
    ttft = _float_column([r.get("t_first_token_s") for r in recs]) - t_start
    e2e = _float_column([r.get("t_last_token_s") for r in recs]) - t_start
    nan = np.nan
    ttft = np.where(ok, ttft, nan)
    e2e = np.where(ok, e2e, nan)
    out = _float_column(out_list)
    with np.errstate(divide="ignore", invalid="ignore"):
        tpot = np.where(out >= 2, (e2e - ttft) / (out - 1), nan)
        tps = np.where(e2e > 0, out / e2e, nan)
    columns["ttft_ms"] = ttft * 1000.0
    columns["tpot_ms"] = tpot * 1000.0
    columns["e2e_ms"] = e2e * 1000.0
    columns["request_output_tokens_per_s"] = tps
    intended = _float_column([r.get("t_intended_s") for r in recs])
    columns["send_lag_ms"] = (t_start - intended) * 1000.0
    columns["ttft_from_intended_ms"] = (ttft + t_start - intended) * 1000.0
    columns["e2e_from_intended_ms"] = (e2e + t_start - intended) * 1000.0

    n_chunks: list[int] = []
    multi: list[int] = []
    itl_mean: list[float] = []
    for r, good in zip(recs, ok.tolist()):
        offsets = r.get("chunk_offsets_s") or ()
        n = len(offsets)
        tokens = usable_chunk_tokens(offsets, r.get("chunk_tokens"))
        n_chunks.append(n)
        if tokens is None:
            multi.append(0)
            later_tokens = n - 1
        else:
            multi.append(n - tokens.count(1))  # counts are >= 1 here
            later_tokens = sum(tokens) - tokens[0]
        # The per-token values telescope: their sum is last minus first offset.
        if good and n >= 2:
            itl_mean.append((offsets[-1] - offsets[0]) / later_tokens)
        else:
            itl_mean.append(nan)
    columns["n_chunks"] = np.array(n_chunks, dtype=np.int64)
    columns["multi_token_chunks"] = np.array(multi, dtype=np.int64)
    columns["itl_mean_ms"] = _float_column(itl_mean) * 1000.0
    # who sent it and the load generator's worst stall meanwhile (absent in runs before they were recorded)
    columns["user_id"] = [r.get("user_id") for r in recs]
    columns["client_stall_max_ms"] = _float_column([r.get("client_stall_max_ms") for r in recs])
    return pd.DataFrame(columns, columns=list(FRAME_COLUMNS))


def itl_values_ms(records: Iterable[Mapping[str, Any]]) -> np.ndarray:
    """All per-token ITL values of the successful records, concatenated, in ms.

    The same values as :func:`itl_s` (times 1000), computed without a Python
    loop over chunks.
    """
    offsets_list: list[Sequence[float]] = []
    tokens_list: list[Sequence[int] | None] = []
    for r in records:
        offsets = r.get("chunk_offsets_s")
        if not offsets or len(offsets) < 2 or r.get("error_category") is not None:
            continue
        offsets_list.append(offsets)
        tokens_list.append(usable_chunk_tokens(offsets, r.get("chunk_tokens")))
    if not offsets_list:
        return np.empty(0, dtype=float)
    lengths = np.fromiter((len(o) for o in offsets_list), dtype=np.int64, count=len(offsets_list))
    total = int(lengths.sum())
    flat = np.fromiter(chain.from_iterable(offsets_list), dtype=float, count=total)
    if any(t is not None for t in tokens_list):
        k = np.fromiter(
            chain.from_iterable(t if t is not None else (1,) * len(o) for o, t in zip(offsets_list, tokens_list)),
            dtype=np.int64,
            count=total,
        )
    else:
        k = None
    gaps = np.diff(flat)
    # drop the "gap" from one record's last chunk to the next record's first
    starts = np.cumsum(lengths)[:-1]
    keep = np.ones(total - 1, dtype=bool)
    keep[starts - 1] = False
    gaps = gaps[keep]
    if k is not None:
        k_later = k[1:][keep]
        if k_later.size and int(k_later.max()) > 1:
            gaps = np.repeat(gaps / k_later, k_later)
    gaps *= 1000.0
    return gaps
