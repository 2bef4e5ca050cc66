"""Per-request records: the frozen record type, its JSON-lines writer and reader.

A record holds only what was observed while the request ran: monotonic
timestamps from the worker that sent it, chunk arrival offsets, and the token
counts the server reported. Every duration (TTFT, TPOT, ITL, E2E) is computed
later by :mod:`envelope.metrics`.

Timestamps named ``t_*_s`` are ``time.perf_counter()`` readings of one worker
process; they are only meaningful as differences within one record. The single
wall-clock reading, ``wall_start_unix_s``, places the record in a stage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import IO, Iterable, Iterator

import orjson

__all__ = [
    "SCHEMA_VERSION",
    "ErrorCategory",
    "RequestRecord",
    "RecordWriter",
    "read_records",
    "iter_record_files",
    "RECORD_FIELDS",
    "record_from_dict",
    "upgrade_record",
]

SCHEMA_VERSION = 1


class ErrorCategory(StrEnum):
    """The failure categories a record can carry (``None`` = success).

    A ``StrEnum``: each member is its string (``ErrorCategory.CANCELLED ==
    "cancelled"``), and JSON, CSV and f-strings write the plain string, so
    records on disk hold the same values as before it was an enum. The set is
    closed: an HTTP error status maps to one of the ``HTTP_*`` members through
    :meth:`for_status` (a specific status, else ``http_4xx`` / ``http_5xx``).
    """

    HTTP_400 = "http_400"
    HTTP_401 = "http_401"
    HTTP_403 = "http_403"
    HTTP_404 = "http_404"
    HTTP_429 = "http_429"
    HTTP_4XX = "http_4xx"  # any other 4xx
    HTTP_500 = "http_500"
    HTTP_503 = "http_503"
    HTTP_5XX = "http_5xx"  # any other 5xx
    CONNECT_ERROR = "connect_error"  # refused, unreachable, DNS
    CONNECTION_RESET = "connection_reset"  # dropped while streaming
    CONNECTION_CLOSED = "connection_closed"  # closed by the server before any response byte
    TIMEOUT_CONNECT = "timeout_connect"
    TIMEOUT_FIRST_TOKEN = "timeout_first_token"
    TIMEOUT_TOTAL = "timeout_total"
    MALFORMED_SSE = "malformed_sse"  # an event whose JSON does not parse
    STREAM_ERROR_EVENT = "stream_error_event"  # 200 with an error object in the stream
    INCOMPLETE_STREAM = "incomplete_stream"  # ended without [DONE]
    MISSING_USAGE = "missing_usage"  # no usage, though asked for and given to earlier requests
    CLIENT_ERROR = "client_error"  # a bug or unexpected exception in the client
    CANCELLED = "cancelled"  # stopped by the load generator itself (run ended or interrupted)

    @staticmethod
    def for_status(status: int) -> "ErrorCategory":
        """The category for an HTTP error status: ``http_<status>`` for a specific one, else the class."""
        if status in _SPECIFIC_STATUSES:
            return ErrorCategory(f"http_{status}")
        if 400 <= status < 500:
            return ErrorCategory.HTTP_4XX
        return ErrorCategory.HTTP_5XX


# statuses with a category of their own (the rest are http_4xx / http_5xx)
_SPECIFIC_STATUSES = frozenset({400, 401, 403, 404, 429, 500, 503})


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestRecord:
    """What one request did, as observed by the worker that sent it."""

    # identity
    run_id: str
    request_id: str
    worker_id: str  # "<host>:<pid>" of the load-generator process
    client: str  # client (user class) name from the scenario
    endpoint: str  # "chat" or "completions"
    pass_name: str
    stage_index: int  # index of the stage in the whole scenario, 0-based
    stage_name: str
    # time
    wall_start_unix_s: float  # wall clock at t_start_s, to place the record in a stage
    t_start_s: float  # request about to be sent
    t_intended_s: float | None = None  # open-loop: when it should have been sent
    t_first_byte_s: float | None = None  # response headers received
    t_first_event_s: float | None = None  # first SSE event (often role-only)
    t_first_token_s: float | None = None  # first token chunk (see envelope.stream.StreamObserver)
    t_last_token_s: float | None = None  # last token chunk (not the stream's end)
    t_done_s: float | None = None  # stream finished or failed
    # arrival of every token chunk, seconds after t_start_s
    chunk_offsets_s: tuple[float, ...] = ()
    # tokens carried by each of those chunks (from continuous usage), None if unknown
    chunk_tokens: tuple[int, ...] | None = None
    # tokens
    prompt_tokens: int | None = None  # server usage.prompt_tokens
    output_tokens: int | None = None  # server usage.completion_tokens, else the estimate
    output_tokens_estimated: bool = False  # True when output_tokens is the client estimate
    output_tokens_client_estimate: int | None = None  # token chunks counted by the client
    # where prompt_tokens/output_tokens came from: "server" (usage), "tokenizer" (the model's tokenizer on
    # this machine, for a server without usage or with --count-tokens tokenizer), "chunks" (an estimate)
    token_source: str | None = None
    # with token_source "tokenizer": what the server's usage said, when it said anything (to compare)
    prompt_tokens_server: int | None = None
    output_tokens_server: int | None = None
    requested_prompt_tokens: int | None = None
    requested_output_tokens: int | None = None
    # outcome
    http_status: int | None = None
    error_category: str | None = None  # an ErrorCategory (read back: its plain string)
    error_detail: str | None = None  # short, never contains a secret
    # opt-in only
    # who sent it, and what the load generator did meanwhile
    user_id: str | None = None  # "<worker_id>/<n>" of the Locust user (None: open loop, no user)
    client_stall_max_ms: float | None = None  # worst event-loop stall of this process that overlapped it
    # where the request came from, for workloads that are not synthetic
    source_index: int | None = None  # the entry of the dataset or trace file it was made from (0-based)
    conversation_id: str | None = None  # multi-turn conversation, or a trace's session
    turn_index: int | None = None  # the turn within the conversation (0-based)
    prompt_text: str | None = None
    completion_text: str | None = None
    schema: int = SCHEMA_VERSION

    @property
    def ok(self) -> bool:
        return self.error_category is None

    def to_json_line(self) -> bytes:
        return orjson.dumps(self) + b"\n"


RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(RequestRecord))


class RecordWriter:
    """Append records as JSON lines to one file, one ``write`` per record.

    The file is opened unbuffered with ``O_APPEND``, so every record reaches the
    OS as a single write: an interrupt can lose the record being written but
    never leaves a torn line that later records would follow.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.count = 0

    def write(self, record: RequestRecord) -> None:
        if self._fd is None:
            raise ValueError(f"record writer for {self.path} is closed")
        os.write(self._fd, record.to_json_line())
        self.count += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RecordWriter(path={str(self.path)!r}, count={self.count})"


def iter_record_files(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The record files of a run directory, one per worker process, sorted."""
    return sorted((Path(run_dir) / "records").glob("*.jsonl"))


def read_records(
    sources: Iterable[str | os.PathLike[str]] | str | os.PathLike[str] | IO[bytes],
    *,
    skipped: list[str] | None = None,
) -> Iterator[dict]:
    """Yield record dicts from JSON-lines files (or one open binary file).

    Fields renamed since older runs were written come back under their current
    names (see :func:`upgrade_record`). A line that does not parse (a torn last line after a crash) is skipped and
    described in ``skipped`` when a list is given, so callers can report it.
    """
    if hasattr(sources, "read"):
        yield from _read_lines(sources, "<stream>", skipped)  # type: ignore[arg-type]
        return
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    for src in sources:
        with open(src, "rb") as fh:
            yield from _read_lines(fh, str(src), skipped)


def _read_lines(fh: IO[bytes], name: str, skipped: list[str] | None) -> Iterator[dict]:
    for lineno, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            if skipped is not None:
                skipped.append(f"{name}:{lineno}: unreadable record line skipped")
            continue
        yield upgrade_record(obj) if isinstance(obj, dict) else obj


# The name t_last_token_s had in runs written before it was renamed (it never meant the stream's end).
_OLD_T_LAST_TOKEN = "t_end_s"


def upgrade_record(data: dict) -> dict:
    """Give a parsed record line's fields their current names, in place; returns ``data``.

    Records written before the rename carry ``t_end_s``; it becomes
    ``t_last_token_s`` (a line that already has the new key keeps it). Readers
    of record files call this once per line, so nothing downstream looks for the
    old name.
    """
    if _OLD_T_LAST_TOKEN in data:
        old = data.pop(_OLD_T_LAST_TOKEN)
        data.setdefault("t_last_token_s", old)
    return data


def record_from_dict(data: dict) -> RequestRecord:
    """Rebuild a :class:`RequestRecord` from a parsed JSON line (unknown keys ignored, old names read)."""
    if _OLD_T_LAST_TOKEN in data:
        data = upgrade_record(dict(data))
    kwargs = {k: data[k] for k in RECORD_FIELDS if k in data}
    for key in ("chunk_offsets_s", "chunk_tokens"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    return RequestRecord(**kwargs)

