"""Read a run's record files (JSON lines, one per worker) as Arrow tables, with a Parquet copy beside them.

The JSON lines stay the contract: workers write them, and nothing here changes them. Reading them
is what costs at scale (a million 128-token records are 1.8 GB of text and 128 million numbers), so:

* **Columnar parse.** Each file is cut into blocks of whole lines and parsed by pyarrow's JSON
  reader into the columns of :data:`RECORD_SCHEMA` (fields the analysis does not read are skipped).
* **Exact skipping.** The per-line reader (:func:`envelope.records.read_records`) skips a line that
  does not parse and reports it by file and line number, and reports a line holding a JSON value
  that is not an object. Arrow's reader fails the whole block on such a line, and accepts a few
  that the per-line reader refuses (``NaN``/``Infinity``, a byte-order mark, ``null``, two objects
  on one line, invalid UTF-8). A block where the parse fails, where one of those may be present,
  or whose rows are not one per non-empty line, is read again line by line with orjson: the
  skipped lines are reported exactly as before and the good ones parsed by Arrow. A block whose
  values do not fit the schema (a string where a number belongs) is handed on as dicts, to be
  read by the per-record path (:func:`analysis.load.records_frame`).
* **Parquet copy.** A large file read entirely through Arrow is written once as Parquet under the
  run's ``cache/records/``, with its skipped lines and a fingerprint of the JSON file (size,
  modification time in ns, hash of its first and last 64 KiB) in the Parquet metadata. It is used
  only while the fingerprint still matches, so a file that grew or changed is read afresh (and its
  copy rewritten). ``cache/`` can be deleted at any time; a run directory that cannot be written
  to is simply read without it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from envelope.records import upgrade_record

__all__ = ["RECORD_SCHEMA", "CACHE_VERSION", "CACHE_MIN_BYTES", "BLOCK_BYTES", "cache_path",
           "read_record_tables"]

# Every record field the analysis reads. t_end_s: the name t_last_token_s had in runs written before
# the rename (the loader applies envelope.records.upgrade_record's rule to the columns).
RECORD_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("request_id", pa.string()), ("worker_id", pa.string()), ("client", pa.string()),
    ("endpoint", pa.string()), ("pass_name", pa.string()), ("stage_index", pa.int64()), ("stage_name", pa.string()),
    ("wall_start_unix_s", pa.float64()), ("t_start_s", pa.float64()), ("t_intended_s", pa.float64()),
    ("t_first_byte_s", pa.float64()), ("t_first_token_s", pa.float64()), ("t_last_token_s", pa.float64()),
    ("t_end_s", pa.float64()), ("t_done_s", pa.float64()),
    ("chunk_offsets_s", pa.list_(pa.float64())), ("chunk_tokens", pa.list_(pa.int64())),
    ("prompt_tokens", pa.int64()), ("output_tokens", pa.int64()), ("output_tokens_estimated", pa.bool_()),
    ("output_tokens_client_estimate", pa.int64()), ("requested_prompt_tokens", pa.int64()),
    ("requested_output_tokens", pa.int64()), ("http_status", pa.int64()), ("error_category", pa.string()),
    ("user_id", pa.string()), ("client_stall_max_ms", pa.float64()), ("source_index", pa.int64()),
    ("conversation_id", pa.string()), ("turn_index", pa.int64()),
])

CACHE_VERSION = "1"  # bump when RECORD_SCHEMA or what a cached file holds changes
CACHE_MIN_BYTES = 16 * 2**20  # smaller files parse in well under a second: no copy
BLOCK_BYTES = 4 * 2**20  # JSON per Arrow parse: measured fastest on 2 cores among 1-64 MiB
CACHE_ROWS = 16_384  # rows per Parquet row group
READ_ROWS = 4_096  # rows per batch read back: ~0.5M chunks, whose columns stay in the CPU's caches
_FINGERPRINT_BYTES = 64 * 1024
_META = b"envelope."

_PARSE = pa_json.ParseOptions(explicit_schema=RECORD_SCHEMA, unexpected_field_behavior="ignore")
_READ = pa_json.ReadOptions(use_threads=True, block_size=1 << 20)
_BOM = b"\xef\xbb\xbf"  # Arrow's parser skips a byte-order mark at a line's start; orjson refuses the line


def cache_path(run_dir: str | os.PathLike[str], record_file: str | os.PathLike[str]) -> Path:
    """Where the Parquet copy of ``record_file`` (a file of ``run_dir``'s records/) lives."""
    return Path(run_dir) / "cache" / "records" / (Path(record_file).stem + ".parquet")


def read_record_tables(files: Sequence[Path], *, skipped: list[str], run_dir: Path | None = None,
                       cache_min_bytes: int | None = CACHE_MIN_BYTES) -> Iterator[pa.Table | list[dict]]:
    """The records of ``files`` in file then line order, as Arrow tables of :data:`RECORD_SCHEMA`,
    or as lists of dicts (upgraded field names) for blocks whose values do not fit it.

    Lines that are not records are described in ``skipped``, as :func:`envelope.records.read_records`
    and :func:`analysis.load.load_run` always described them. With ``run_dir`` and ``cache_min_bytes``
    (None: no copies) a file of at least that many bytes is read from, or copied to, its Parquet copy.
    """
    for path in files:
        try:
            stat = path.stat()
        except OSError:
            stat = None
        cached = run_dir is not None and cache_min_bytes is not None and stat is not None \
            and stat.st_size >= cache_min_bytes
        if cached:
            fingerprint = _fingerprint(path, stat)
            tables = _read_cache(cache_path(run_dir, path), fingerprint, path, skipped)
            if tables is not None:
                yield from tables
                continue
            yield from _read_json_cached(path, cache_path(run_dir, path), fingerprint, skipped)
        else:
            yield from _read_json(path, skipped)


@dataclass(slots=True)
class _FileSkips:
    """The skipped lines of one file, as the cache stores them: (line, message or None for unreadable)."""

    entries: list[tuple[int, str | None]]


def _unreadable(path: Path, lineno: int) -> str:
    return f"{path}:{lineno}: unreadable record line skipped"


def _not_object(obj: object) -> str:
    return f"records/: a line holds {type(obj).__name__} {str(obj)[:40]!r}, not a JSON object; skipped"


def _read_json(path: Path, skipped: list[str], skips: _FileSkips | None = None) -> Iterator[pa.Table | list[dict]]:
    for block, first_line in _blocks(path):
        yield from _parse_block(block, path, first_line, skipped, skips)


def _blocks(path: Path) -> Iterator[tuple[bytes, int]]:
    """``(bytes, number of its first line)`` of whole lines, about :data:`BLOCK_BYTES` each; the last
    may lack its newline (a torn last record)."""
    first_line = 1
    rest = b""
    with open(path, "rb") as fh:
        while True:
            data = fh.read(BLOCK_BYTES)
            if not data:
                if rest:
                    yield rest, first_line
                return
            data = rest + data if rest else data
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # one line longer than a block: read on
                rest = data
                continue
            block, rest = data[:cut], data[cut:]
            yield block, first_line
            first_line += block.count(b"\n")


def _parse_block(block: bytes, path: Path, first_line: int, skipped: list[str],
                 skips: _FileSkips | None) -> Iterator[pa.Table | list[dict]]:
    table = _arrow_block(block)
    if table is not None:
        yield table
        return
    # line by line, as envelope.records.read_records reads
    good: list[bytes] = []
    objects: list[dict] = []
    for i, line in enumerate(block.split(b"\n")):
        if not line.strip():
            continue
        lineno = first_line + i
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            skipped.append(_unreadable(path, lineno))
            if skips is not None:
                skips.entries.append((lineno, None))
            continue
        if not isinstance(obj, dict):
            message = _not_object(obj)
            skipped.append(message)
            if skips is not None:
                skips.entries.append((lineno, message))
            continue
        good.append(line)
        objects.append(obj)
    if not good:
        return
    table = _arrow_block(b"\n".join(good) + b"\n", lines=len(good))
    if table is not None:
        yield table
    else:
        yield [upgrade_record(obj) for obj in objects]


def _arrow_block(block: bytes, *, lines: int | None = None) -> pa.Table | None:
    """``block`` parsed by Arrow, or None when the per-line reader might read it differently."""
    if lines is None:
        lines = _plain_lines(block)
        if lines is None:
            return None
    if lines == 0:
        return None
    try:
        table = pa_json.read_json(pa.BufferReader(block), read_options=_READ, parse_options=_PARSE)
    except (pa.ArrowException, ValueError):
        return None
    if table.num_rows != lines or _has_null_rows(table) or _has_null_list_items(table):
        return None
    return table


def _plain_lines(block: bytes) -> int | None:
    """The non-empty lines of ``block``, or None when it may hold text Arrow and orjson read differently.

    ASCII text (so valid UTF-8, and no byte-order mark) without ``NaN`` or ``Inf`` needs no more
    checking; single-byte searches first, since records rarely hold an ``N`` or an ``I``.
    """
    if not block.isascii():
        try:
            block.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if _BOM in block:
            return None
    if (b"N" in block and b"NaN" in block) or (b"I" in block and b"Inf" in block):
        return None
    lines = block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
    if b"\n\n" in block or block.startswith(b"\n"):
        # empty lines: Arrow skips them, and so does the per-line reader
        newlines = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == ord("\n"))
        lines -= int(np.count_nonzero(np.diff(newlines) == 1)) + (1 if block.startswith(b"\n") else 0)
    return lines


def _has_null_rows(table: pa.Table) -> bool:
    """A row with every field null: a ``null`` line (not a record) or a ``{}`` one (a record): ask orjson."""
    every = None
    for column in table.columns:
        missing = pc.is_null(column)
        every = missing if every is None else pc.and_(every, missing)
        if not pc.any(every).as_py():
            return False
    return bool(every is not None and pc.any(every).as_py())


def _has_null_list_items(table: pa.Table) -> bool:
    """A null inside ``chunk_offsets_s`` or ``chunk_tokens``: left to the per-record path."""
    for name in ("chunk_offsets_s", "chunk_tokens"):
        for chunk in table.column(name).chunks:
            if chunk.flatten().null_count:
                return True
    return False


# -- the Parquet copy ------------------------------------------------------------------------------------


def _fingerprint(path: Path, stat: os.stat_result) -> dict[bytes, bytes]:
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as fh:
            digest.update(fh.read(_FINGERPRINT_BYTES))
            if stat.st_size > _FINGERPRINT_BYTES:
                fh.seek(max(stat.st_size - _FINGERPRINT_BYTES, _FINGERPRINT_BYTES))
                digest.update(fh.read(_FINGERPRINT_BYTES))
    except OSError:
        return {}
    return {_META + b"cache_version": CACHE_VERSION.encode(), _META + b"source_size": str(stat.st_size).encode(),
            _META + b"source_mtime_ns": str(stat.st_mtime_ns).encode(),
            _META + b"source_digest": digest.hexdigest().encode()}


def _read_cache(cache: Path, fingerprint: dict[bytes, bytes], path: Path,
                skipped: list[str]) -> Iterator[pa.Table] | None:
    """The copy's tables when it matches ``fingerprint``, else None (absent, stale or unreadable)."""
    if not fingerprint or not cache.is_file():
        return None
    try:
        # pre_buffer would read the whole file into memory ahead of the batches: ~500 MiB for 250,000 records
        parquet = pq.ParquetFile(cache, pre_buffer=False, buffer_size=1 << 20)
        meta = parquet.metadata.metadata or {}
        if any(meta.get(k) != v for k, v in fingerprint.items()):
            return None
        if not parquet.schema_arrow.remove_metadata().equals(RECORD_SCHEMA):
            return None
        entries = orjson.loads(meta.get(_META + b"skipped", b"[]"))
    except (OSError, pa.ArrowException, ValueError):
        return None
    for lineno, message in entries:
        skipped.append(_unreadable(path, lineno) if message is None else message)
    return _cached_tables(parquet)


def _cached_tables(parquet: pq.ParquetFile) -> Iterator[pa.Table]:
    for batch in parquet.iter_batches(batch_size=READ_ROWS, use_threads=False):
        yield pa.Table.from_batches([batch])


def _read_json_cached(path: Path, cache: Path, fingerprint: dict[bytes, bytes],
                      skipped: list[str]) -> Iterator[pa.Table | list[dict]]:
    """Read ``path`` as JSON lines and write its Parquet copy as it goes, when every block fits the schema."""
    writer = _CacheWriter.open(cache) if fingerprint else None
    skips = _FileSkips(entries=[])
    try:
        for item in _read_json(path, skipped, skips):
            if writer is not None:
                if not isinstance(item, pa.Table) or not writer.add(item):
                    # dicts (the copy could not say the same: read this file from JSON every time),
                    # or the copy cannot be written (a full disk): the records are read all the same
                    writer.discard()
                    writer = None
            yield item
        if writer is not None:
            try:
                unchanged = _fingerprint(path, path.stat()) == fingerprint
            except OSError:
                unchanged = False
            if unchanged:
                writer.finish({**fingerprint, _META + b"skipped": orjson.dumps(skips.entries)})
                writer = None
    finally:
        if writer is not None:
            writer.discard()


class _CacheWriter:
    """A Parquet copy being written to a temporary file beside its place; renamed into it when finished."""

    def __init__(self, cache: Path, tmp: Path, writer: pq.ParquetWriter) -> None:
        self.cache, self.tmp, self.writer = cache, tmp, writer
        self.pending: list[pa.Table] = []
        self.rows = 0

    @classmethod
    def open(cls, cache: Path) -> "_CacheWriter | None":
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=cache.stem + ".", suffix=".tmp", dir=cache.parent)
            os.close(fd)
            tmp = Path(name)
            # floats do not repeat: no dictionary for them; no statistics (nothing filters on them)
            dictionary = [f.name + (".list.element" if pa.types.is_list(f.type) else "") for f in RECORD_SCHEMA
                          if f.type not in (pa.float64(), pa.list_(pa.float64()))]
            return cls(cache, tmp, pq.ParquetWriter(tmp, RECORD_SCHEMA, compression="none", use_dictionary=dictionary,
                                                    write_statistics=False))
        except (OSError, pa.ArrowException):
            return None

    def add(self, table: pa.Table) -> bool:
        """Queue ``table`` for the copy; False when writing failed."""
        self.pending.append(table)
        self.rows += table.num_rows
        if self.rows >= CACHE_ROWS:
            try:
                self._flush()
            except (OSError, pa.ArrowException):
                return False
        return True

    def _flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=CACHE_ROWS)
            self.pending = []
            self.rows = 0

    def finish(self, metadata: dict[bytes, bytes]) -> None:
        try:
            self._flush()
            self.writer.add_key_value_metadata(metadata)
            self.writer.close()
            os.replace(self.tmp, self.cache)
        except (OSError, pa.ArrowException):
            self.discard()

    def discard(self) -> None:
        try:
            self.writer.close()
        except (OSError, pa.ArrowException):
            pass
        self.tmp.unlink(missing_ok=True)
