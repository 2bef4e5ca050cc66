"""Records to the run's frame, chunks and token audit: column by column from Arrow, or record by record.

:class:`RecordsAccumulator` takes records in batches, either as Arrow tables of
:data:`analysis.record_files.RECORD_SCHEMA` (:meth:`~RecordsAccumulator.add_table`: numpy over whole
columns, no Python loop over records or chunks) or as dicts (:meth:`~RecordsAccumulator.add_records`:
:func:`envelope.metrics.per_request_frame` and per-record Python, the reference the columnar path is
tested against and the path for values that do not fit the schema). Both give the same frame, the
same chunks (:class:`analysis.chunks.RequestChunks`) and the same token audit; batches of either
kind may follow each other in one run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from analysis.chunks import RequestChunks, RequestChunksBuilder
from analysis.tokens import TokenAudit, TokenAuditBuilder
from envelope import metrics

__all__ = ["LoadedRecords", "RecordsAccumulator", "ORIGIN_COLUMNS", "FRAME_COLUMNS"]

ORIGIN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("source_index", "Int64"), ("conversation_id", "object"), ("turn_index", "Int64"))
"""Where a request came from (dataset entry, conversation and turn): frame columns beside
``per_request_frame``'s, None/NA for synthetic workloads and records written before they existed."""

FRAME_COLUMNS: tuple[str, ...] = metrics.FRAME_COLUMNS + tuple(n for n, _ in ORIGIN_COLUMNS) + ("in_flight_end_unix_s",)
"""The run frame's columns, in order."""

# How each frame column is built. "text": str where any value is (pandas' str dtype, NaN for None),
# object of None where none is; as pandas infers it from the records' values.
_TEXT = ("run_id", "request_id", "worker_id", "client", "endpoint", "pass_name", "stage_name", "error_category",
         "user_id")
_NULLABLE_INT = ("stage_index", "http_status", "prompt_tokens", "output_tokens", "requested_output_tokens",
                 "source_index", "turn_index")
_INT = ("n_chunks", "multi_token_chunks")
_BOOL = ("ok", "output_tokens_estimated")
_OBJECT = ("conversation_id",)
_KIND = {**{c: "text" for c in _TEXT}, **{c: "Int64" for c in _NULLABLE_INT}, **{c: "int64" for c in _INT},
         **{c: "bool" for c in _BOOL}, **{c: "object" for c in _OBJECT}}


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadedRecords:
    """A run's records: one frame row per record (:data:`FRAME_COLUMNS`), their chunks, the token audit."""

    frame: pd.DataFrame
    chunks: RequestChunks
    token_audit: TokenAudit


class RecordsAccumulator:
    """Adds batches of records (Arrow tables or dicts) and gives the :class:`LoadedRecords` of them all."""

    def __init__(self, *, block_chunks: int = 1 << 18) -> None:
        self._columns: dict[str, list[Any]] = {c: [] for c in FRAME_COLUMNS}
        self._chunks = RequestChunksBuilder(block_chunks=block_chunks)
        self._audit = TokenAuditBuilder()
        self._rows = 0

    # -- Arrow ------------------------------------------------------------------------------------

    def add_table(self, table: pa.Table) -> None:
        """Records as an Arrow table with (at least) the columns of ``RECORD_SCHEMA``."""
        n = table.num_rows
        if n == 0:
            return
        table = table.combine_chunks()
        col = {name: _array(table.column(name)) for name in table.column_names}

        ok = _is_null(col["error_category"])
        t_start = _floats(col["t_start_s"])
        t_first = _floats(col["t_first_token_s"])
        t_last = _floats(col["t_last_token_s"])
        if "t_end_s" in col and col["t_end_s"].null_count < n:
            # envelope.records.upgrade_record: records written before the rename carry t_end_s
            t_last = np.where(np.isnan(t_last), _floats(col["t_end_s"]), t_last)
        out_values, out_missing = _ints(col["output_tokens"])
        out = np.where(out_missing, np.nan, out_values.astype(float))

        # chunk offsets: one list per record (null: none)
        offsets_list = col["chunk_offsets_s"]
        n_chunks = _lengths(offsets_list)
        offsets = offsets_list.flatten().to_numpy(zero_copy_only=False)  # a view of Arrow's buffer
        chunk_start = np.cumsum(n_chunks) - n_chunks
        has = n_chunks > 0
        first_offset = np.full(n, np.nan)
        last_offset = np.full(n, np.nan)
        first_offset[has] = offsets[chunk_start[has]]
        last_offset[has] = offsets[chunk_start[has] + n_chunks[has] - 1]

        # chunk_tokens: used only where it has one count per chunk
        tokens_list = col["chunk_tokens"]
        token_lengths = _lengths(tokens_list)
        token_values = tokens_list.flatten().to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        matched = ~_is_null(tokens_list) & (token_lengths == n_chunks) & has
        t_min, t_sum, t_max, t_ones, t_zeros, tok_first = _segment_stats(token_values, token_lengths)
        if token_values.size == offsets.size and np.array_equal(matched, has):
            per_chunk_tokens = token_values  # the common case: every record with chunks has their counts
        else:
            per_chunk_tokens = np.ones(offsets.size, dtype=np.int64)
            per_chunk_tokens[np.repeat(matched, n_chunks)] = token_values[np.repeat(matched, token_lengths)]
        usable = matched & (t_min >= 1)  # envelope.metrics.usable_chunk_tokens

        frame_cols: dict[str, Any] = {}
        for name in _TEXT + _OBJECT:
            frame_cols[name] = col[name]
        frame_cols["wall_start_unix_s"] = wall = _floats(col["wall_start_unix_s"])
        frame_cols["ok"] = ok
        for name in _NULLABLE_INT:
            frame_cols[name] = _ints(col[name])
        frame_cols["output_tokens_estimated"] = _bools(col["output_tokens_estimated"])

        # envelope.metrics.per_request_frame, operation for operation
        nan = np.nan
        ttft = np.where(ok, t_first - t_start, nan)
        e2e = np.where(ok, t_last - t_start, nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            tpot = np.where(out >= 2, (e2e - ttft) / (out - 1), nan)
            tps = np.where(e2e > 0, out / e2e, nan)
        frame_cols["ttft_ms"] = ttft * 1000.0
        frame_cols["tpot_ms"] = tpot * 1000.0
        frame_cols["e2e_ms"] = e2e_ms = e2e * 1000.0
        frame_cols["request_output_tokens_per_s"] = tps
        intended = _floats(col["t_intended_s"])
        frame_cols["send_lag_ms"] = (t_start - intended) * 1000.0
        frame_cols["ttft_from_intended_ms"] = (ttft + t_start - intended) * 1000.0
        frame_cols["e2e_from_intended_ms"] = (e2e + t_start - intended) * 1000.0
        frame_cols["n_chunks"] = n_chunks
        frame_cols["multi_token_chunks"] = np.where(usable, n_chunks - t_ones, 0)
        later_tokens = np.where(usable, t_sum - tok_first, n_chunks - 1)
        itl = ok & (n_chunks >= 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            frame_cols["itl_mean_ms"] = np.where(itl, (last_offset - first_offset) / later_tokens, nan) * 1000.0
        frame_cols["user_id"] = col["user_id"]
        frame_cols["client_stall_max_ms"] = _floats(col["client_stall_max_ms"])

        # analysis.load: in flight for E2E (success) or until the last thing seen (failure)
        flight_s = np.where(ok & ~np.isnan(e2e_ms), e2e_ms / 1000.0, np.nan)
        seen = _floats(col["t_done_s"])
        for name in ("t_last_token_s", "t_first_token_s", "t_first_byte_s"):
            t = t_last if name == "t_last_token_s" else _floats(col[name])
            seen = np.where(np.isnan(seen), t, seen)
        since = seen - t_start
        failed = np.isnan(flight_s)
        flight_s[failed] = np.where(np.isnan(since[failed]), 0.0, np.where(since[failed] > 0.0, since[failed], 0.0))
        frame_cols["in_flight_end_unix_s"] = end = wall + flight_s
        self._append(frame_cols, n)

        itl_counts = np.where(itl, later_tokens, 0)
        attributed = np.where(out_missing | (out_values <= 0), 0, out_values)
        self._chunks.add(n_chunks=n_chunks, offsets_s=offsets, tokens=per_chunk_tokens, ok=ok,
                         itl_tokens_usable=usable, tokens_exact=matched & (t_sum == out_values),
                         attributed_output_tokens=attributed, itl_counts=itl_counts, wall_start_unix_s=wall,
                         in_flight_end_unix_s=end)

        estimate, estimate_missing = _ints(col["output_tokens_client_estimate"])
        prompt, prompt_missing = _ints(col["prompt_tokens"])
        asked, asked_missing = _ints(col["requested_prompt_tokens"])
        self._audit.add_columns(
            ok=ok, n_chunks=n_chunks, client_estimate=np.where(estimate_missing, n_chunks, estimate),
            output_tokens=out_values, output_tokens_missing=out_missing,
            estimated=frame_cols["output_tokens_estimated"], chunk_tokens_known=matched & (t_min >= 0),
            chunk_tokens_ones=t_ones, chunk_tokens_zeros=t_zeros, chunk_tokens_sum=t_sum, chunk_tokens_max=t_max,
            prompt_tokens=prompt, prompt_tokens_missing=prompt_missing, requested_prompt_tokens=asked,
            requested_prompt_tokens_missing=asked_missing)

    # -- dicts ------------------------------------------------------------------------------------

    def add_records(self, batch: Sequence[Mapping]) -> None:
        """Records as dicts (field names upgraded, see :func:`envelope.records.upgrade_record`)."""
        if not batch:
            return
        frame = metrics.per_request_frame(batch)
        if len(frame) != len(batch):  # everything here relies on one row per record, in order
            raise ValueError("per_request_frame did not return one row per record")
        n = len(batch)
        e2e_ms = frame["e2e_ms"].to_numpy(dtype=float, na_value=np.nan)
        flight_s = np.array([_flight_s(rec, e2e_ms[i]) for i, rec in enumerate(batch)], dtype=float)
        wall = frame["wall_start_unix_s"].to_numpy(dtype=float)
        cols: dict[str, Any] = {}
        for name in FRAME_COLUMNS:
            if name in _TEXT or name in _OBJECT:
                cols[name] = _text_part([_origin_value(rec, name) for rec in batch] if name in _OBJECT
                                        else [rec.get(name) for rec in batch])
            elif name in _NULLABLE_INT:
                values = (frame[name].array if name in frame.columns
                          else pd.array([_origin_value(rec, name) for rec in batch], dtype="Int64"))
                cols[name] = (values.to_numpy(dtype=np.int64, na_value=0), values.isna())
            elif name == "in_flight_end_unix_s":
                cols[name] = wall + flight_s
            else:
                cols[name] = frame[name].to_numpy()
        self._append(cols, n)

        n_chunks = np.empty(n, dtype=np.int64)
        usable = np.zeros(n, dtype=bool)
        exact = np.zeros(n, dtype=bool)
        attributed = np.zeros(n, dtype=np.int64)
        itl_counts = np.empty(n, dtype=np.int64)
        offsets: list[float] = []
        tokens: list[int] = []
        for i, rec in enumerate(batch):
            recorded = rec.get("chunk_offsets_s") or ()
            count = len(recorded)
            n_chunks[i] = count
            offsets.extend(recorded)
            per_chunk = rec.get("chunk_tokens")
            matched = per_chunk is not None and len(per_chunk) == count and count > 0
            tokens.extend(per_chunk if matched else (1,) * count)
            usable[i] = metrics.usable_chunk_tokens(recorded, per_chunk) is not None
            out = rec.get("output_tokens") or 0
            attributed[i] = out if out > 0 else 0
            exact[i] = matched and sum(per_chunk) == out
            itl_counts[i] = _itl_count(rec)
            self._audit.add(rec)
        self._chunks.add(n_chunks=n_chunks, offsets_s=np.asarray(offsets, dtype=np.float64),
                         tokens=np.asarray(tokens, dtype=np.int64), ok=frame["ok"].to_numpy(dtype=bool),
                         itl_tokens_usable=usable, tokens_exact=exact, attributed_output_tokens=attributed,
                         itl_counts=itl_counts, wall_start_unix_s=wall, in_flight_end_unix_s=wall + flight_s)

    # -- result -----------------------------------------------------------------------------------

    def _append(self, cols: Mapping[str, Any], n: int) -> None:
        for name in FRAME_COLUMNS:
            self._columns[name].append(cols[name])
        self._rows += n

    def result(self) -> LoadedRecords:
        """The frame, chunks and audit of every record added (the accumulator is spent)."""
        chunks = self._chunks.result()
        if not self._rows:
            frame = metrics.per_request_frame([])
            for name, dtype in ORIGIN_COLUMNS:
                frame[name] = pd.array([], dtype=dtype)
            frame["in_flight_end_unix_s"] = pd.Series(dtype=float)
        else:
            # one column at a time, dropping its parts at once: the peak holds one column twice
            data = {name: _join(_KIND.get(name, "float"), self._columns.pop(name)) for name in FRAME_COLUMNS}
            frame = pd.DataFrame(data, columns=list(FRAME_COLUMNS), copy=False)
        self._columns = {c: [] for c in FRAME_COLUMNS}
        return LoadedRecords(frame=frame, chunks=chunks, token_audit=self._audit.result())


# -- Arrow columns to numpy -----------------------------------------------------------------------


def _array(column: pa.ChunkedArray) -> pa.Array:
    return column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)


def _is_null(array: pa.Array) -> np.ndarray:
    return pc.is_null(array).to_numpy(zero_copy_only=False)


def _floats(array: pa.Array) -> np.ndarray:
    """float64, NaN for null."""
    return array.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def _ints(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(int64 values with 0 for null, null mask)."""
    return pc.fill_null(array, 0).to_numpy(zero_copy_only=False), _is_null(array)


def _bools(array: pa.Array) -> np.ndarray:
    """bool, False for null (``bool(rec.get(name, False))``)."""
    return pc.fill_null(array, False).to_numpy(zero_copy_only=False)


def _lengths(array: pa.Array) -> np.ndarray:
    """Elements of each list, 0 for a null list."""
    return pc.fill_null(pc.list_value_length(array), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _segment_stats(values: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per segment of ``values`` (``lengths`` each, in order): min, sum, max, count of 1s, count of 0s,
    first value; 0 for an empty segment."""
    n = lengths.size
    out = [np.zeros(n, dtype=np.int64) for _ in range(6)]
    full = lengths > 0
    if values.size:
        at = (np.cumsum(lengths) - lengths)[full]
        out[0][full] = np.minimum.reduceat(values, at)
        out[1][full] = np.add.reduceat(values, at)
        out[2][full] = np.maximum.reduceat(values, at)
        out[3][full] = np.add.reduceat(values == 1, at, dtype=np.int64)
        out[4][full] = np.add.reduceat(values == 0, at, dtype=np.int64)
        out[5][full] = values[at]
    return tuple(out)


# -- the frame's columns --------------------------------------------------------------------------


def _text_part(values: list[Any]) -> pa.Array | np.ndarray:
    """A text column's part from record values: Arrow strings, or objects when some value is not a str."""
    if all(v is None or isinstance(v, str) for v in values):
        return pa.array(values, type=pa.string())
    return np.array(values, dtype=object)


def _join(kind: str, parts: list[Any]) -> Any:
    if kind in ("text", "object"):
        if all(isinstance(p, pa.Array) for p in parts):
            strings = pa.chunked_array(parts, type=pa.string())
            if kind == "text" and strings.null_count < len(strings):
                return strings.to_pandas()  # pandas' str dtype, as it infers for str values
            return np.concatenate([p.to_numpy(zero_copy_only=False) for p in strings.chunks]) \
                if strings.num_chunks else np.empty(0, dtype=object)
        return np.concatenate([p.to_numpy(zero_copy_only=False).astype(object) if isinstance(p, pa.Array)
                               else p for p in parts])
    if kind == "Int64":
        values = np.concatenate([p[0] for p in parts]).astype(np.int64, copy=False)
        mask = np.concatenate([np.asarray(p[1], dtype=bool) for p in parts])
        return pd.arrays.IntegerArray(values, mask)
    dtype = {"int64": np.int64, "bool": np.bool_, "float": np.float64}[kind]
    return np.concatenate([np.asarray(p, dtype=dtype) for p in parts])


# -- per record, for dicts (the reference the columns are tested against) -------------------------


def _origin_value(rec: Mapping, name: str) -> Any:
    v = rec.get(name)
    if name == "conversation_id":
        return None if v is None else str(v)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _itl_count(rec: Mapping) -> int:
    """How many ITL values :func:`envelope.metrics.itl_values_ms` gives this record."""
    offsets = rec.get("chunk_offsets_s") or ()
    n = len(offsets)
    if n < 2 or rec.get("error_category") is not None:
        return 0
    tokens = metrics.usable_chunk_tokens(offsets, rec.get("chunk_tokens"))
    return sum(tokens) - tokens[0] if tokens else n - 1


def _flight_s(rec: Mapping, e2e_ms: float) -> float:
    """Seconds the request was in flight: E2E for successes, done - start for failures."""
    if rec.get("error_category") is None and not math.isnan(e2e_ms):
        return e2e_ms / 1000.0
    t0 = rec.get("t_start_s")
    for key in ("t_done_s", "t_last_token_s", "t_first_token_s", "t_first_byte_s"):
        t = rec.get(key)
        if t is not None and t0 is not None:
            return max(0.0, t - t0)
    return 0.0
