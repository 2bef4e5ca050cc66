"""``sources.json``: the dataset and trace files a run drew its requests from, and their lengths.

Written by the Locust side once the server's tokenizer has measured every entry
(``locustfiles/sources.py``); the report states these distributions next to the
envelope, since an envelope is only true for the traffic it was measured with.
Paths are written as given in the scenario; no entry's text is ever written here.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import orjson

from envelope.rundir import SOURCES_FILE, atomic_write_json

__all__ = ["LengthSummary", "SourceEntry", "write_source_log", "read_source_log"]

SCHEMA_VERSION = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class LengthSummary:
    """Token counts of a file's usable entries: how many, p50, p95, max (nearest-rank percentiles)."""

    count: int
    p50: int | None
    p95: int | None
    max: int | None

    @classmethod
    def of(cls, values: Sequence[int]) -> "LengthSummary":
        ordered = sorted(int(v) for v in values)
        if not ordered:
            return cls(count=0, p50=None, p95=None, max=None)

        def rank(q: float) -> int:
            return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

        return cls(count=len(ordered), p50=rank(0.50), p95=rank(0.95), max=ordered[-1])

    @classmethod
    def from_json(cls, data: Any) -> "LengthSummary":
        data = data if isinstance(data, Mapping) else {}

        def whole(key: str) -> int | None:
            v = data.get(key)
            return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        return cls(count=whole("count") or 0, p50=whole("p50"), p95=whole("p95"), max=whole("max"))


@dataclass(frozen=True, kw_only=True, slots=True)
class SourceEntry:
    """One dataset or trace file as the run used it.

    ``entries``: read from the file; ``skipped_too_long``: entries whose prompt plus
    output would not fit the server's ``max_model_len`` (never sent);
    ``prompt_tokens`` and ``output_tokens``: the usable entries' lengths in the
    served model's tokens (``output_tokens`` counts only entries that give one).
    ``exact`` is False when lengths are estimates (the server has no ``/tokenize``).
    """

    kind: str  # dataset | trace
    path: str
    format: str
    entries: int
    skipped_too_long: int
    prompt_tokens: LengthSummary
    output_tokens: LengthSummary
    stages: tuple[str, ...] = ()  # the stages that drew from it
    exact: bool = True

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["stages"] = list(self.stages)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SourceEntry":
        return cls(kind=str(data.get("kind") or "dataset"), path=str(data.get("path") or ""),
                   format=str(data.get("format") or ""), entries=int(data.get("entries") or 0),
                   skipped_too_long=int(data.get("skipped_too_long") or 0),
                   prompt_tokens=LengthSummary.from_json(data.get("prompt_tokens")),
                   output_tokens=LengthSummary.from_json(data.get("output_tokens")),
                   stages=tuple(str(s) for s in data.get("stages") or ()), exact=bool(data.get("exact", True)))


def write_source_log(run_dir: str | os.PathLike[str], entries: Sequence[SourceEntry]) -> Path:
    """Write ``sources.json`` atomically; returns its path."""
    path = Path(run_dir) / SOURCES_FILE
    atomic_write_json(path, {"schema_version": SCHEMA_VERSION, "sources": [e.to_json() for e in entries]})
    return path


def read_source_log(run_dir: str | os.PathLike[str]) -> list[SourceEntry]:
    """The sources a run logged; an empty list when it has none (a synthetic workload) or the file is unreadable."""
    path = Path(run_dir) / SOURCES_FILE
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return []
    items = data.get("sources") if isinstance(data, Mapping) else None
    return [SourceEntry.from_json(item) for item in items or () if isinstance(item, Mapping)]
