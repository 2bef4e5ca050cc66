"""The content chunks of a run's records, kept as compact columns and queried without expanding them.

A million 128-token records carry 128 million chunk offsets. Expanded the way the tables once
used them (wall-clock arrival of every chunk as float64, its tokens as float32, and every
per-token ITL value as float32) they take 2 GB; :class:`RequestChunks` keeps each chunk's
offset as recorded (float64 seconds after the request's start) and its ``chunk_tokens`` count in
the smallest integer type that holds it, in blocks of consecutive records, with per-record
summaries beside them. Everything the analysis reads is derived from these, block by block:

* ITL values (:meth:`RequestChunks.itl_ms`): exactly :func:`envelope.metrics.itl_values_ms`
  rounded to float32, as the loader always stored them;
* chunk arrivals with their attributed tokens (:meth:`RequestChunks.arrivals`): each content chunk
  carries its ``chunk_tokens`` when they add up to the record's ``output_tokens``, else the output
  tokens spread evenly, so a record's attributed tokens always sum to its output tokens; a record
  with output tokens but no chunk times gets them all at the end of its flight
  (``in_flight_end_unix_s``); a record without output tokens attributes none;
* tokens that arrived inside a window (:meth:`RequestChunks.tokens_between`), read from the
  per-record totals for every request that streamed wholly inside or outside it, and from the
  chunks only for those straddling an edge;
* a token histogram over time (:meth:`RequestChunks.token_histogram`) and the last arrival up to
  an instant (:meth:`RequestChunks.last_arrival_at_or_before`).

Record masks are boolean arrays over the frame's rows (``Run.frame``), in its order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

__all__ = ["RequestChunks", "RequestChunksBuilder", "ChunkBlock", "compact_ints"]


def compact_ints(values: np.ndarray) -> np.ndarray:
    """``values`` (integers) in the smallest integer dtype that holds them all exactly; when they are
    all equal, one value broadcast to their shape (read-only, no memory per element: the usual
    one token per chunk)."""
    if not values.size:
        return values.astype(np.uint8)
    lo, hi = int(values.min()), int(values.max())
    dtype = np.result_type(np.min_scalar_type(lo), np.min_scalar_type(hi))
    if lo == hi:
        return np.broadcast_to(np.array(lo, dtype=dtype), values.shape)
    return values.astype(dtype, copy=False)


def _join_ints(parts: list[np.ndarray]) -> np.ndarray:
    """:func:`compact_ints` parts joined, staying one broadcast value when they all are the same one."""
    if parts and all(p.strides == (0,) for p in parts) and len({(p.dtype, p[0]) for p in parts if p.size}) <= 1:
        first = next((p for p in parts if p.size), None)
        value = np.array(first[0], dtype=first.dtype) if first is not None else np.array(0, dtype=np.uint8)
        return np.broadcast_to(value, (sum(p.size for p in parts),))
    return np.concatenate(parts)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class ChunkBlock:
    """The chunks of the frame rows ``[row_start, row_stop)``.

    ``starts[i]`` is where row ``row_start + i``'s chunks begin in ``offsets_s``/``tokens``
    (``starts[-1]`` is their length). ``tokens`` holds each chunk's ``chunk_tokens`` count where
    the record's ``chunk_tokens`` matched its chunks, else 1.
    """

    row_start: int
    row_stop: int
    starts: np.ndarray  # int64, rows + 1
    offsets_s: np.ndarray  # float64: seconds after the request's start, as recorded
    tokens: np.ndarray  # smallest integer dtype (see compact_ints: may be one value broadcast)

    @property
    def chunks(self) -> int:
        return int(self.offsets_s.size)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class RequestChunks:
    """Every content chunk of a run's records (see the module docstring).

    Per record (frame row): ``n_chunks`` content chunks; ``ok`` (no error); ``itl_tokens_usable``:
    its ``chunk_tokens`` give the tokens per chunk for ITL (one count >= 1 per chunk);
    ``tokens_exact``: its ``chunk_tokens`` give the attributed tokens (they sum to its output
    tokens); ``attributed_output_tokens``: output tokens it attributes (0: none); ``itl_counts``:
    its ITL values; ``wall_start_unix_s`` and ``in_flight_end_unix_s`` as in the frame;
    ``arrival_min_unix_s``/``arrival_max_unix_s``/``arrival_tokens``: the earliest and latest
    arrival of its attributed chunks (NaN: none) and their tokens.
    """

    blocks: tuple[ChunkBlock, ...]
    n_chunks: np.ndarray
    ok: np.ndarray
    itl_tokens_usable: np.ndarray
    tokens_exact: np.ndarray
    attributed_output_tokens: np.ndarray
    itl_counts: np.ndarray
    wall_start_unix_s: np.ndarray
    in_flight_end_unix_s: np.ndarray
    arrival_min_unix_s: np.ndarray
    arrival_max_unix_s: np.ndarray
    arrival_tokens: np.ndarray  # float64: the sum of the record's attributed float32 tokens
    _block_rows: np.ndarray = field(init=False, repr=False)  # row_start of each block, for lookups

    def __post_init__(self) -> None:
        object.__setattr__(self, "_block_rows", np.array([b.row_start for b in self.blocks], dtype=np.int64))

    @classmethod
    def empty(cls) -> "RequestChunks":
        f, i, b = np.empty(0), np.empty(0, dtype=np.int64), np.empty(0, dtype=bool)
        return cls(blocks=(), n_chunks=i, ok=b, itl_tokens_usable=b, tokens_exact=b, attributed_output_tokens=i,
                   itl_counts=i, wall_start_unix_s=f, in_flight_end_unix_s=f, arrival_min_unix_s=f,
                   arrival_max_unix_s=f, arrival_tokens=f)

    def __len__(self) -> int:
        return int(self.n_chunks.size)

    def __repr__(self) -> str:
        return f"RequestChunks(records={len(self)}, chunks={self.total_chunks}, blocks={len(self.blocks)})"

    @property
    def total_chunks(self) -> int:
        """Content chunks recorded, over every record."""
        return int(sum(b.chunks for b in self.blocks))

    @property
    def nbytes(self) -> int:
        arrays = [getattr(self, f) for f in ("n_chunks", "ok", "itl_tokens_usable", "tokens_exact",
                                              "attributed_output_tokens", "itl_counts", "wall_start_unix_s",
                                              "in_flight_end_unix_s", "arrival_min_unix_s", "arrival_max_unix_s",
                                              "arrival_tokens")]
        return sum(a.nbytes for a in arrays) + sum(
            b.starts.nbytes + b.offsets_s.nbytes + (0 if b.tokens.strides == (0,) else b.tokens.nbytes)
            for b in self.blocks)

    # -- ITL ---------------------------------------------------------------------------------

    def itl_ms(self, records: np.ndarray | None = None) -> np.ndarray:
        """The per-token ITL values (ms) of the successful ``records`` (None: all), in row order.

        What :func:`envelope.metrics.itl_values_ms` gives, rounded to float32 as the run loader
        always kept them (~7 significant digits of ms). A new array the caller may reorder.
        """
        sel_all = self.ok & (self.n_chunks >= 2)
        if records is not None:
            sel_all = sel_all & records
        out = np.empty(int(self.itl_counts[sel_all].sum()), dtype=np.float32)
        pos = 0
        for block in self.blocks:
            span = slice(block.row_start, block.row_stop)
            sel = sel_all[span]
            if not sel.any():
                continue
            n = self.n_chunks[span]
            whole = bool(sel.all())  # a stage's records come in long runs: most blocks are all in or all out
            lengths = n if whole else n[sel]
            chunk_sel = None if whole else np.repeat(sel, n)
            gaps = np.diff(block.offsets_s if whole else block.offsets_s[chunk_sel])
            # drop the "gap" from one record's last chunk to the next record's first
            keep = np.ones(gaps.size, dtype=bool)
            keep[np.cumsum(lengths)[:-1] - 1] = False
            gaps = gaps[keep]
            if not _all_ones(block.tokens):
                usable = np.repeat(self.itl_tokens_usable[span] if whole else self.itl_tokens_usable[span][sel], lengths)
                k = np.where(usable, block.tokens if whole else block.tokens[chunk_sel], 1)[1:][keep]
                if k.size and int(k.max()) > 1:
                    # a chunk of k tokens gives k values of gap / k (see envelope.metrics)
                    gaps = np.repeat(gaps / k, k)
            out[pos:pos + gaps.size] = gaps * 1000.0  # rounded to float32 as astype rounds
            pos += gaps.size
        if pos != out.size:  # the counts and the values come from one rule; a mismatch is a bug
            raise AssertionError(f"ITL values {pos} != counted {out.size}")
        return out

    # -- attributed chunks ---------------------------------------------------------------------

    def _attributing(self) -> np.ndarray:
        return self.attributed_output_tokens > 0

    def attributed_total(self, records: np.ndarray | None = None) -> float:
        """Output tokens attributed to chunks, summed (float32 tokens added in float64)."""
        tokens = self.arrival_tokens if records is None else self.arrival_tokens[records]
        return float(tokens.sum(dtype=np.float64))

    def arrivals(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(arrival_unix_s, tokens)`` of every attributed chunk of ``rows`` (ascending row indices;
        None: all rows), in row then chunk order; float64 and float32."""
        times: list[np.ndarray] = []
        tokens: list[np.ndarray] = []
        for t, tok in self._arrival_parts(rows):
            times.append(t)
            tokens.append(tok)
        if not times:
            return np.empty(0), np.empty(0, dtype=np.float32)
        return np.concatenate(times), np.concatenate(tokens)

    def _arrival_parts(self, rows: np.ndarray | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Arrivals and tokens, one part per block, of the attributed chunks of ``rows`` (ascending
        row indices; None: every row), in row then chunk order."""
        attributing = self._attributing()
        if rows is not None:
            rows = rows[attributing[rows]]
            if not rows.size:
                return
            which = np.searchsorted(self._block_rows, rows, side="right") - 1
            cuts = np.flatnonzero(np.diff(which)) + 1
            groups = {int(which[part[0]]): rows[part] for part in np.split(np.arange(rows.size), cuts)}
        for i, block in enumerate(self.blocks):
            span = slice(block.row_start, block.row_stop)
            if rows is None:
                sel = attributing[span]
            elif i in groups:
                sel = np.zeros(block.row_stop - block.row_start, dtype=bool)
                sel[groups[i] - block.row_start] = True
            else:
                continue
            if sel.any():
                yield _arrivals(sel, self.n_chunks[span], block, wall_start_unix_s=self.wall_start_unix_s[span],
                                in_flight_end_unix_s=self.in_flight_end_unix_s[span],
                                output_tokens=self.attributed_output_tokens[span],
                                tokens_exact=self.tokens_exact[span])

    def tokens_between(self, start_unix_s: float, end_unix_s: float, records: np.ndarray | None = None) -> float:
        """Attributed tokens of ``records``' chunks that arrived in ``[start, end)``, summed in float64.

        A request whose chunks all arrived inside (or all outside) counts through its total; only
        those straddling an edge are read chunk by chunk.
        """
        take = self._attributing() if records is None else (records & self._attributing())
        lo, hi = self.arrival_min_unix_s, self.arrival_max_unix_s
        inside = take & (lo >= start_unix_s) & (hi < end_unix_s)
        total = float(self.arrival_tokens[inside].sum(dtype=np.float64))
        straddle = take & ~inside & (lo < end_unix_s) & (hi >= start_unix_s)
        rows = np.flatnonzero(straddle)
        if rows.size:
            for t, tok in self._arrival_parts(rows):
                total += float(tok[(t >= start_unix_s) & (t < end_unix_s)].sum(dtype=np.float64))
        return total

    def last_arrival_unix_s(self) -> float | None:
        """The latest arrival of any attributed chunk (None: there is none)."""
        hi = self.arrival_max_unix_s[~np.isnan(self.arrival_max_unix_s)]
        return float(hi.max()) if hi.size else None

    def last_arrival_at_or_before(self, t_unix_s: float) -> float | None:
        """The latest arrival of an attributed chunk at or before ``t_unix_s`` (None: none)."""
        lo, hi = self.arrival_min_unix_s, self.arrival_max_unix_s
        best = -np.inf
        whole = hi <= t_unix_s
        if whole.any():
            best = float(hi[whole].max())
        rows = np.flatnonzero((lo <= t_unix_s) & ~whole)
        if rows.size:
            for t, _ in self._arrival_parts(rows):
                seen = t[t <= t_unix_s]
                if seen.size:
                    best = max(best, float(seen.max()))
        return None if best == -np.inf else best

    def token_histogram(self, edges: np.ndarray, zero_unix_s: float) -> np.ndarray:
        """Attributed tokens per bucket of arrival time since ``zero_unix_s``; ``edges`` evenly spaced.

        Equal buckets let numpy bin by arithmetic instead of a search (``np.histogram`` with a
        range), so a chunk within a rounding error of an edge may fall in the neighbouring bucket:
        this is for plots.
        """
        sums = np.zeros(edges.size - 1)
        bins, span = edges.size - 1, (float(edges[0]), float(edges[-1]))
        attributing = self._attributing()
        for block in self.blocks:
            rows = slice(block.row_start, block.row_stop)
            n = self.n_chunks[rows]
            if attributing[rows].all() and (n > 0).all() and self.tokens_exact[rows].all():
                # every chunk of the block, with its own count: no per-chunk selection needed
                t = np.repeat(self.wall_start_unix_s[rows] - zero_unix_s, n) + block.offsets_s
                if block.tokens.strides == (0,):  # one count for all: count chunks, then scale
                    part, _ = np.histogram(t, bins=bins, range=span)
                    sums += part * float(block.tokens[0]) if block.tokens.size else 0.0
                else:
                    sums += np.histogram(t, bins=bins, range=span, weights=block.tokens.astype(np.float64))[0]
                continue
            for t, tok in self._arrival_parts(np.flatnonzero(attributing[rows]) + block.row_start):
                sums += np.histogram(t - zero_unix_s, bins=bins, range=span, weights=tok)[0]
        return sums


def _all_ones(tokens: np.ndarray) -> bool:
    """Whether a block's token counts are all 1 (one broadcast 1: no memory to read)."""
    return tokens.strides == (0,) and (not tokens.size or int(tokens[0]) == 1)


def _arrivals(sel: np.ndarray, n_chunks: np.ndarray, block: ChunkBlock, *, wall_start_unix_s: np.ndarray,
              in_flight_end_unix_s: np.ndarray, output_tokens: np.ndarray,
              tokens_exact: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(arrival_unix_s, tokens)`` of the attributed chunks of ``block``'s rows that ``sel`` marks (all
    of them attributing), in row then chunk order. The per-row arrays are the block's rows'."""
    chunked = sel & (n_chunks > 0)
    n = n_chunks[chunked]
    whole = bool(chunked.all())
    chunk_sel = None if whole else np.repeat(chunked, n_chunks)
    offsets = block.offsets_s if whole else block.offsets_s[chunk_sel]
    times = np.repeat(wall_start_unix_s[chunked], n) + offsets
    raw = (block.tokens if whole else block.tokens[chunk_sel]).astype(np.float32)
    exact = tokens_exact[chunked]
    if exact.all():
        tokens = raw
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            spread = (output_tokens[chunked] / n).astype(np.float32)  # out / n, in float32 as always
        tokens = np.where(np.repeat(exact, n), raw, np.repeat(spread, n))
    pseudo = sel & (n_chunks == 0)
    if pseudo.any():
        # a record with no chunk times attributes its tokens to one moment: the end of its flight
        where = (np.cumsum(np.where(chunked, n_chunks, 0)) - np.where(chunked, n_chunks, 0))[pseudo]
        times = np.insert(times, where, in_flight_end_unix_s[pseudo])
        tokens = np.insert(tokens, where, output_tokens[pseudo].astype(np.float32))
    return times, tokens


class RequestChunksBuilder:
    """Takes the chunks of consecutive batches of records (:meth:`add`) and gives the
    :class:`RequestChunks` of them all (:meth:`result`); blocks hold about ``block_chunks`` chunks."""

    def __init__(self, *, block_chunks: int = 1 << 18) -> None:
        self.block_chunks = block_chunks
        self._rows = 0
        self._block_start = 0
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (n_chunks, offsets, tokens)
        self._pending_chunks = 0
        self._blocks: list[ChunkBlock] = []
        self._records: dict[str, list[np.ndarray]] = {name: [] for name in _RECORD_ARRAYS}

    def add(self, *, n_chunks: np.ndarray, offsets_s: np.ndarray, tokens: np.ndarray, ok: np.ndarray,
            itl_tokens_usable: np.ndarray, tokens_exact: np.ndarray, attributed_output_tokens: np.ndarray,
            itl_counts: np.ndarray, wall_start_unix_s: np.ndarray, in_flight_end_unix_s: np.ndarray) -> None:
        """One batch of records: per-record arrays, and the chunks of them all (``offsets_s``, and
        ``tokens`` per chunk: the ``chunk_tokens`` count where it matched the chunks, else 1)."""
        n_chunks = np.asarray(n_chunks, dtype=np.int64)
        if offsets_s.size != int(n_chunks.sum()) or tokens.size != offsets_s.size:
            raise ValueError("offsets and tokens must hold n_chunks chunks per record")
        rows = n_chunks.size
        attributed = np.asarray(attributed_output_tokens, dtype=np.int64)
        lo = np.full(rows, np.nan)
        hi = np.full(rows, np.nan)
        total = np.zeros(rows)
        chunked = (attributed > 0) & (n_chunks > 0)
        if chunked.any():
            # per record with chunks (reduceat's segments must cover them all), then those attributing
            some = n_chunks > 0
            at = (np.cumsum(n_chunks) - n_chunks)[some]
            mine = chunked[some]
            # wall + offset is monotonic in the offset: the extreme arrivals are wall + the extreme offsets
            lo[chunked] = wall_start_unix_s[chunked] + np.minimum.reduceat(offsets_s, at)[mine]
            hi[chunked] = wall_start_unix_s[chunked] + np.maximum.reduceat(offsets_s, at)[mine]
            n = n_chunks[chunked]
            exact = tokens_exact[chunked]
            # the float32 tokens of _arrivals, added up: exact counts are small integers (exact in
            # float32 and float64), and n equal float32 values sum to n times the value exactly
            exact_sum = np.add.reduceat(tokens.astype(np.float32), at, dtype=np.float64)[mine]
            with np.errstate(divide="ignore", invalid="ignore"):
                spread = (attributed[chunked] / n).astype(np.float32).astype(np.float64) * n
            total[chunked] = np.where(exact, exact_sum, spread)
        pseudo = (attributed > 0) & (n_chunks == 0)
        lo[pseudo] = hi[pseudo] = in_flight_end_unix_s[pseudo]
        total[pseudo] = attributed[pseudo].astype(np.float32)
        arrays = {"n_chunks": n_chunks, "ok": ok, "itl_tokens_usable": itl_tokens_usable,
                  "tokens_exact": tokens_exact, "attributed_output_tokens": attributed,
                  "itl_counts": itl_counts, "wall_start_unix_s": wall_start_unix_s,
                  "in_flight_end_unix_s": in_flight_end_unix_s, "arrival_min_unix_s": lo,
                  "arrival_max_unix_s": hi, "arrival_tokens": total}
        for name, dtype in _RECORD_ARRAYS.items():
            values = np.asarray(arrays[name], dtype=dtype)
            if values.shape != (rows,):
                raise ValueError(f"{name}: one value per record expected")
            self._records[name].append(values)
        self._pending.append((n_chunks, np.asarray(offsets_s, dtype=np.float64), compact_ints(tokens)))
        self._pending_chunks += offsets_s.size
        self._rows += rows
        if self._pending_chunks >= self.block_chunks:
            self._close_block()

    def _close_block(self) -> None:
        if not self._pending:
            return
        if len(self._pending) == 1:  # a batch as large as a block: kept as it came (no copy)
            n, offsets, tokens = self._pending[0]
        else:
            n = np.concatenate([p[0] for p in self._pending])
            offsets = np.concatenate([p[1] for p in self._pending])
            tokens = _join_ints([p[2] for p in self._pending])  # numpy's common type: still the smallest
        self._pending = []
        self._pending_chunks = 0
        starts = np.zeros(n.size + 1, dtype=np.int64)
        np.cumsum(n, out=starts[1:])
        self._blocks.append(ChunkBlock(row_start=self._block_start, row_stop=self._rows, starts=starts,
                                       offsets_s=offsets, tokens=tokens))
        self._block_start = self._rows

    def result(self) -> RequestChunks:
        self._close_block()
        arrays = {}
        for name, dtype in _RECORD_ARRAYS.items():
            parts = self._records[name]
            arrays[name] = np.concatenate(parts) if parts else np.empty(0, dtype=dtype)
            parts.clear()
        return RequestChunks(blocks=tuple(self._blocks), **arrays)


_RECORD_ARRAYS: dict[str, type] = {
    "n_chunks": np.int64, "ok": np.bool_, "itl_tokens_usable": np.bool_, "tokens_exact": np.bool_,
    "attributed_output_tokens": np.int64, "itl_counts": np.int64, "wall_start_unix_s": np.float64,
    "in_flight_end_unix_s": np.float64, "arrival_min_unix_s": np.float64, "arrival_max_unix_s": np.float64,
    "arrival_tokens": np.float64,
}
