"""Request traces read from local files: when each request was sent and how long it was.

Two JSON-lines formats, told apart by the first request's keys unless named:

- ``mooncake``: ``{"timestamp": ms, "input_length", "output_length", "hash_ids": [...]}``
  as published with Mooncake. ``hash_ids`` names the prompt's 512-token blocks
  in order; requests with equal leading ids share that prefix, which is what
  makes a trace exercise the prefix cache. Only the last block may be partial.
- ``jsonl``: ``{"t_s": seconds, "prompt_tokens", "output_tokens", "session_id"?}``.

Entries come back sorted by time. Replaying them is :func:`trace_offsets_s`:
the send offsets from the first request, sped up or rescaled to a mean rate.
Every problem in a file raises :class:`~envelope.config.ConfigError` with one
line, ``file:line: what is wrong``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from envelope.config import ConfigError

# The dataset reader's line-by-line JSON reading, so that both report errors alike.
from envelope.datasets import _error, _json_line, _kind, _lines, _open, _positive_int, _short

__all__ = [
    "MOONCAKE_BLOCK_TOKENS",
    "TraceFormat",
    "TraceEntry",
    "detect_trace_format",
    "read_trace",
    "trace_offsets_s",
    "trace_mean_rate_per_s",
]

MOONCAKE_BLOCK_TOKENS = 512

TraceFormat = Literal["mooncake", "jsonl"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceEntry:
    """One request of a trace; ``index`` and ``line`` say where it is in the file.

    ``t_s`` is the send time in seconds as written (Mooncake's milliseconds / 1000),
    not yet shifted to start at 0. ``hash_ids`` are Mooncake's prompt block ids
    (equal ids mean equal 512-token blocks), empty when the trace has none.
    """

    index: int
    line: int
    t_s: float
    prompt_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()
    session_id: str | None = None


def detect_trace_format(path: str | os.PathLike[str]) -> TraceFormat:
    """The format of a JSON-lines trace, from its first request's keys.

    ``timestamp`` means Mooncake, ``t_s`` the plain format.
    """
    name = str(path)
    with _open(name, path) as fh:
        for lineno, text in _lines(name, fh):
            if not text.strip():
                continue
            value = _json_line(name, lineno, text)
            if not isinstance(value, dict):
                raise _error(name, lineno, f"{_kind(value)}, expected a request object")
            if "timestamp" in value:
                return "mooncake"
            if "t_s" in value:
                return "jsonl"
            raise _error(
                name,
                lineno,
                "cannot tell the trace format: the first request has neither 'timestamp' (mooncake) "
                "nor 't_s' (jsonl); set format: mooncake|jsonl",
            )
    raise _error(name, 1, "no requests: the file is empty")


def read_trace(
    path: str | os.PathLike[str], *, format: Literal["auto", "mooncake", "jsonl"] = "auto"
) -> list[TraceEntry]:
    """Read every request of a trace file, sorted by ``t_s`` (ties keep file order).

    Raises :class:`ConfigError` (``file:line: message``) for anything unreadable
    or malformed, including a file without requests.
    """
    name = str(path)
    if format == "auto":
        format = detect_trace_format(path)
    if format == "mooncake":
        parse = _mooncake_entry
    elif format == "jsonl":
        parse = _jsonl_entry
    else:
        raise ConfigError(f"{name}:1: unknown trace format {format!r}; expected {'|'.join(get_args(TraceFormat))}")
    entries: list[TraceEntry] = []
    with _open(name, path) as fh:
        for lineno, text in _lines(name, fh):
            if not text.strip():
                continue
            value = _json_line(name, lineno, text)
            if not isinstance(value, dict):
                raise _error(name, lineno, f"{_kind(value)}, expected a request object")
            entries.append(parse(name, lineno, value, len(entries)))
    if not entries:
        raise _error(name, 1, "no requests: the file is empty")
    entries.sort(key=lambda entry: entry.t_s)
    return entries


def trace_offsets_s(
    entries: Sequence[TraceEntry], *, speedup: float = 1.0, rate_per_s: float | None = None
) -> list[float]:
    """Send offsets in seconds from the first entry (which gets 0.0), for entries in time order.

    The trace's gaps are divided by ``speedup``; with ``rate_per_s`` they are
    instead scaled so that the mean rate, ``(n - 1) / span``, is ``rate_per_s``.
    """
    if not (math.isfinite(speedup) and speedup > 0):
        raise ValueError(f"speedup must be a positive number, not {speedup!r}")
    if rate_per_s is not None:
        if speedup != 1.0:
            raise ValueError("give speedup or rate_per_s, not both")
        if not (math.isfinite(rate_per_s) and rate_per_s > 0):
            raise ValueError(f"rate_per_s must be a positive number, not {rate_per_s!r}")
    if not entries:
        return []
    times_s = [entry.t_s for entry in entries]
    if any(later < earlier for earlier, later in zip(times_s, times_s[1:])):
        raise ValueError("trace entries are not in time order (read_trace returns them sorted)")
    start_s = times_s[0]
    scale = 1.0 / speedup
    if rate_per_s is not None:
        mean_rate_per_s = trace_mean_rate_per_s(entries)
        if mean_rate_per_s is None:
            raise ValueError("cannot scale a trace to a rate: its requests span no time")
        scale = mean_rate_per_s / rate_per_s
    return [(t_s - start_s) * scale for t_s in times_s]


def trace_mean_rate_per_s(entries: Sequence[TraceEntry]) -> float | None:
    """Requests per second over the trace, ``(n - 1) / span``; None for one entry or a zero span."""
    if len(entries) < 2:
        return None
    span_s = max(entry.t_s for entry in entries) - min(entry.t_s for entry in entries)
    if span_s <= 0:
        return None
    return (len(entries) - 1) / span_s


def _mooncake_entry(name: str, lineno: int, value: dict[str, Any], index: int) -> TraceEntry:
    timestamp_ms = _time(name, lineno, value, "timestamp", "milliseconds")
    prompt_tokens = _count(name, lineno, value, "input_length")
    output_tokens = _count(name, lineno, value, "output_length")
    hash_ids = value.get("hash_ids")
    if hash_ids is None:
        hash_ids = []
    if not isinstance(hash_ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in hash_ids):
        raise _error(name, lineno, f"'hash_ids' is {_short(hash_ids)}, expected a list of integers")
    if hash_ids:
        blocks = len(hash_ids)
        low, high = MOONCAKE_BLOCK_TOKENS * (blocks - 1), MOONCAKE_BLOCK_TOKENS * blocks
        if not low < prompt_tokens <= high:
            raise _error(
                name,
                lineno,
                f"'input_length' {prompt_tokens} does not fit {blocks} hash_ids of {MOONCAKE_BLOCK_TOKENS} tokens "
                f"(expected {low + 1}..{high})",
            )
    return TraceEntry(
        index=index,
        line=lineno,
        t_s=timestamp_ms / 1000,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        hash_ids=tuple(hash_ids),
    )


def _jsonl_entry(name: str, lineno: int, value: dict[str, Any], index: int) -> TraceEntry:
    t_s = _time(name, lineno, value, "t_s", "seconds")
    prompt_tokens = _count(name, lineno, value, "prompt_tokens")
    output_tokens = _count(name, lineno, value, "output_tokens")
    session_id = value.get("session_id")
    if session_id is not None:
        if isinstance(session_id, bool) or not isinstance(session_id, (str, int)):
            raise _error(name, lineno, f"'session_id' is {_short(session_id)}, expected a string or an integer")
        session_id = str(session_id)
    return TraceEntry(
        index=index,
        line=lineno,
        t_s=float(t_s),
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        session_id=session_id,
    )


def _time(name: str, lineno: int, value: dict[str, Any], key: str, unit: str) -> float:
    if key not in value:
        raise _error(name, lineno, f"missing '{key}'")
    t = value[key]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise _error(name, lineno, f"'{key}' is {_short(t)}, expected a number of {unit}")
    if t < 0:
        raise _error(name, lineno, f"'{key}' is negative ({t}); expected {unit} >= 0")
    return t


def _count(name: str, lineno: int, value: dict[str, Any], key: str) -> int:
    if key not in value:
        raise _error(name, lineno, f"missing '{key}'")
    n = value[key]
    if not _positive_int(n):
        raise _error(name, lineno, f"'{key}' is {_short(n)}, expected a positive integer of tokens")
    return n
