"""The stage record: one stage as planned and as it ran; the one schema of ``stages.json``.

A :class:`StageRecord` is made from the scenario (:meth:`envelope.scenario.ResolvedStage.record`),
gets its start, end and the load generator's health from the Locust stage clock, is
written by :func:`write_stages` and read back by :func:`read_stages` for the analysis
and the progress display. Nothing else reads or writes ``stages.json``.

File format (``docs/run-directory.md``)::

    {"schema_version": 1, "stages": [{...one StageRecord.to_json() per stage that started...}]}

Files written before the schema version existed hold the bare list; they read the same.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Mapping, Sequence

import orjson

from envelope.rundir import STAGES_FILE, atomic_write_json

__all__ = [
    "STAGES_SCHEMA_VERSION",
    "StageKind",
    "WorkloadSummary",
    "StageRecord",
    "StagesFileError",
    "write_stages",
    "read_stages",
    "stages_path",
    "schedule_completed",
]

STAGES_SCHEMA_VERSION = 1


class StageKind(StrEnum):
    """Closed loop (a number of users) or open loop (a request rate)."""

    USERS = "users"
    RATE = "rate"


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadSummary:
    """What a stage's requests look like, as far as the analysis needs to say it.

    ``prompt_tokens``/``output_tokens``: a number, a distribution's label such as
    ``"uniform(100..300)"``, or None (free output length). A long-context prompt
    is a label (``"fill 0.85 of max_model_len"``) until the server's length is known.
    """

    prompt_tokens: int | str | None = None
    output_tokens: int | str | None = None
    long_context: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "long_context": self.long_context}

    @classmethod
    def from_json(cls, data: Any) -> "WorkloadSummary":
        if not isinstance(data, Mapping):
            return cls()

        def count(v: Any) -> int | str | None:
            if isinstance(v, bool):
                return None
            return v if isinstance(v, (int, str)) else (int(v) if isinstance(v, float) and v.is_integer() else None)

        return cls(prompt_tokens=count(data.get("prompt_tokens")), output_tokens=count(data.get("output_tokens")),
                   long_context=bool(data.get("long_context", False)))


@dataclass(frozen=True, slots=True, kw_only=True)
class StageRecord:
    """One stage: what was asked (load, duration, SLOs, workload) and when it ran.

    ``stage_index`` counts stages across passes from 0 (the records' ``stage_index``).
    Closed-loop stages have ``target_users`` and ``spawn_rate``; open-loop stages
    ``target_rate_per_s``, ``arrival``, ``burstiness`` (gamma only) and
    ``max_concurrency`` (None: uncapped). ``start_unix_s``/``end_unix_s`` are the
    master's wall clock; ``end_unix_s`` is None while the stage runs or when the
    run was cut short in it. ``client_loop_lag_max_ms`` and
    ``client_cpu_max_percent``: the load generator's worst health in the stage.
    ``client_processes``: how many processes sent its requests when it began;
    ``client_budget_streams_per_process`` / ``client_budget_rate_per_s_per_process``:
    what one of them handles accurately (:mod:`envelope.client_budget`), so the
    analysis can flag a stage run with more load per process than that.

    Set only by the analysis, never written: ``end_inferred`` (the end came from
    the next stage's start, the run's end or the last record) and ``derived``
    (no stages.json: the stage was rebuilt from its records).
    """

    stage_index: int
    stage_name: str
    pass_index: int | None = 0
    pass_name: str = ""
    kind: StageKind = StageKind.USERS
    target_users: int | None = None
    spawn_rate: float | None = None
    target_rate_per_s: float | None = None
    duration_s: float | None = None
    slos: Mapping[str, float] = field(default_factory=dict)
    workload: WorkloadSummary = field(default_factory=WorkloadSummary)
    clients: Mapping[str, WorkloadSummary] | None = None  # per client class, when their workloads differ
    client_slos: Mapping[str, Mapping[str, float]] | None = None  # per client class, when their SLOs differ
    arrival: str | None = None
    burstiness: float | None = None
    max_concurrency: int | None = None
    start_unix_s: float | None = None
    end_unix_s: float | None = None
    client_loop_lag_max_ms: float | None = None
    client_cpu_max_percent: float | None = None
    client_processes: int | None = None
    client_budget_streams_per_process: int | None = None
    client_budget_rate_per_s_per_process: float | None = None
    end_inferred: bool = False
    derived: bool = False

    @property
    def open_loop(self) -> bool:
        return self.kind == StageKind.RATE

    def replace(self, **changes: Any) -> "StageRecord":
        return dataclasses.replace(self, **changes)

    def with_client_health(self, *, loop_lag_ms: float | None = None,
                           cpu_percent: float | None = None) -> "StageRecord":
        """This stage keeping the worse of its own and the given load-generator health (rounded to µs/0.001%)."""
        changes: dict[str, float] = {}
        for name, value in (("client_loop_lag_max_ms", loop_lag_ms), ("client_cpu_max_percent", cpu_percent)):
            if value is not None and value > (getattr(self, name) or 0.0):
                changes[name] = round(float(value), 3)
        return dataclasses.replace(self, **changes) if changes else self

    def to_json(self) -> dict[str, Any]:
        """The stages.json entry (open-loop fields only for open-loop stages; ``clients`` only when set)."""
        out: dict[str, Any] = {
            "pass_index": self.pass_index,
            "pass_name": self.pass_name,
            "stage_index": self.stage_index,
            "stage_name": self.stage_name,
            "kind": str(self.kind),
            "target_users": self.target_users,
            "spawn_rate": self.spawn_rate,
            "target_rate_per_s": self.target_rate_per_s,
            "duration_s": self.duration_s,
            "slos": dict(self.slos),
            "workload": self.workload.to_json(),
        }
        if self.open_loop:
            out.update(arrival=self.arrival, burstiness=self.burstiness, max_concurrency=self.max_concurrency)
        if self.clients is not None:
            out["clients"] = {name: w.to_json() for name, w in self.clients.items()}
        if self.client_slos is not None:
            out["client_slos"] = {name: dict(slos) for name, slos in self.client_slos.items()}
        out.update(start_unix_s=self.start_unix_s, end_unix_s=self.end_unix_s,
                   client_loop_lag_max_ms=self.client_loop_lag_max_ms,
                   client_cpu_max_percent=self.client_cpu_max_percent)
        if self.client_processes is not None:
            out.update(client_processes=self.client_processes,
                       client_budget_streams_per_process=self.client_budget_streams_per_process,
                       client_budget_rate_per_s_per_process=self.client_budget_rate_per_s_per_process)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, position: int = 0) -> "StageRecord":
        """Read one stages.json entry; missing fields get the defaults old files imply.

        Raises :class:`ValueError` for an entry no stage can be made of (a start time that is not a number).
        """
        def num(key: str) -> float | None:
            v = data.get(key)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{key} is {v!r}, not a number")
            return float(v)

        def whole(key: str) -> int | None:
            v = data.get(key)
            return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        index = whole("stage_index")
        index = position if index is None else index
        kind = data.get("kind") or "users"
        try:
            kind = StageKind(kind)
        except ValueError:
            raise ValueError(f"kind {kind!r} is neither 'users' nor 'rate'") from None
        slos = data.get("slos") if isinstance(data.get("slos"), Mapping) else {}
        clients = data.get("clients")
        return cls(
            stage_index=index,
            stage_name=str(data.get("stage_name") or f"stage-{index}"),
            pass_index=whole("pass_index") if "pass_index" in data else 0,
            pass_name=str(data.get("pass_name") or ""),
            kind=kind,
            target_users=whole("target_users"),
            spawn_rate=num("spawn_rate"),
            target_rate_per_s=num("target_rate_per_s"),
            duration_s=num("duration_s"),
            slos={str(k): v for k, v in slos.items()},
            workload=WorkloadSummary.from_json(data.get("workload")),
            clients=({str(k): WorkloadSummary.from_json(v) for k, v in clients.items()}
                     if isinstance(clients, Mapping) else None),
            client_slos=_client_slos(data.get("client_slos")),
            arrival=data.get("arrival") if isinstance(data.get("arrival"), str) else None,
            burstiness=num("burstiness"),
            max_concurrency=whole("max_concurrency"),
            start_unix_s=num("start_unix_s"),
            end_unix_s=num("end_unix_s"),
            client_loop_lag_max_ms=num("client_loop_lag_max_ms"),
            client_cpu_max_percent=num("client_cpu_max_percent"),
            client_processes=whole("client_processes"),
            client_budget_streams_per_process=whole("client_budget_streams_per_process"),
            client_budget_rate_per_s_per_process=num("client_budget_rate_per_s_per_process"),
        )


class StagesFileError(ValueError):
    """stages.json cannot be read at all; ``str()`` is one line."""


def stages_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / STAGES_FILE


def write_stages(run_dir: str | os.PathLike[str], stages: Sequence[StageRecord]) -> None:
    """Write ``RUN/stages.json`` (atomically: a reader never sees half a file)."""
    atomic_write_json(stages_path(run_dir),
                      {"schema_version": STAGES_SCHEMA_VERSION, "stages": [s.to_json() for s in stages]})


def read_stages(run_dir: str | os.PathLike[str], *, problems: list[str] | None = None) -> list[StageRecord]:
    """The stages of ``RUN/stages.json``, in file order.

    Raises :class:`FileNotFoundError` when it is absent and :class:`StagesFileError`
    when it is unreadable or not a list of stage objects. An entry that cannot
    be a stage (no start time, a field of the wrong type) is skipped and
    described in ``problems``, when given.
    """
    path = stages_path(run_dir)
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise
    except (OSError, orjson.JSONDecodeError) as exc:
        raise StagesFileError(f"{STAGES_FILE}: unreadable ({' '.join(str(exc).split())[:200]})") from None
    if isinstance(data, dict) and isinstance(data.get("stages"), list):
        data = data["stages"]
    if not isinstance(data, list) or not all(isinstance(s, dict) for s in data):
        raise StagesFileError(f"{STAGES_FILE}: not a list of stage objects")
    out = []
    for i, entry in enumerate(data):
        if entry.get("start_unix_s") is None:
            if problems is not None:
                problems.append(f"{STAGES_FILE}: stage {i} has no start_unix_s; skipped")
            continue
        try:
            out.append(StageRecord.from_json(entry, position=i))
        except ValueError as exc:
            if problems is not None:
                problems.append(f"{STAGES_FILE}: stage {i}: {exc}; skipped")
    return out


def schedule_completed(log: Sequence[StageRecord], planned: Sequence[Any], *, slack_s: float = 2.0) -> bool:
    """True when ``log`` holds every planned stage, each ended, the last one after its full duration.

    ``planned``: the scenario's stages (anything with ``duration_s``); ``slack_s`` allows for the
    shape's once-a-second ticks.
    """
    if not log or len(log) < len(planned):
        return False
    # a search pass runs as many probes as it needs: every planned pass must have run, whatever its stage count
    if {p.pass_name for p in planned if hasattr(p, "pass_name")} - {s.pass_name for s in log}:
        return False
    if any(s.end_unix_s is None or s.start_unix_s is None for s in log):
        return False
    last = log[-1]
    duration = last.duration_s or (getattr(planned[-1], "duration_s", 0.0) if planned else 0.0) or 0.0
    return last.end_unix_s >= last.start_unix_s + float(duration) - slack_s


def _client_slos(data: Any) -> dict[str, dict[str, float]] | None:
    if not isinstance(data, Mapping):
        return None
    return {str(name): {str(k): float(v) for k, v in slos.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for name, slos in data.items() if isinstance(slos, Mapping)}
