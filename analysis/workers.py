"""The load generators of a distributed run, from ``RUN/workers.json``.

The master of a distributed run (``--processes N``, or workers on other hosts)
writes ``workers.json``: one entry per worker process with its status
(``running``, ``finished``, ``lost``, ``left``), when the master last heard
from it and when it ended, the records it shipped, and the offset of its wall
clock to the master's. A single-process run has no such file, and nothing here
says anything about it.

A worker ``lost`` (silent for the heartbeat timeout) or ``left`` (quit) before
the schedule ended took its users or its share of the arrival rate with it:
Locust gives them to the other workers only at the next stage change, so the
offered load of the stage it ended in fell from then on. A stage is hit from
when the load fell (for a lost worker, when it was last heard; for one that
left, when it quit) to when the master noticed (``ended_unix_s``).

Everything here is a pure function of the parsed file, the stages, and the
records frame; times are on the master's clock.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import orjson

from envelope.rundir import WORKERS_FILE
from envelope.stages import StageRecord

__all__ = [
    "WORKERS_FILE",
    "PLACEMENT_SLACK_S",
    "ENDED_STATUSES",
    "WorkerEnding",
    "LoadGenerators",
    "read_workers",
    "worker_label",
    "worst_clock_uncertainty_s",
    "placement_tolerance_s",
    "records_per_worker",
    "worker_endings",
    "stage_endings",
    "ending_reason",
    "ending_sentence",
    "ending_summary_line",
    "describe_load_generators",
    "load_generator_lines",
]

PLACEMENT_SLACK_S = 1.0  # stage boundaries and record starts come from different processes
ENDED_STATUSES = ("lost", "left")
RECENT_RATE_S = 10.0  # how far back a lost worker's recent record rate is measured

_FLOAT_FIELDS = ("first_seen_unix_s", "last_heard_unix_s", "ended_unix_s", "clock_offset_s", "clock_uncertainty_s")
_INT_FIELDS = ("stage_index_at_end", "records_received", "record_batches", "record_gaps")
_STR_FIELDS = ("worker_id", "node_id", "host", "status")
_REPORT_FIELDS = ("users", "in_flight", "open_loop")
_INFO_FIELDS = ("written_unix_s", "heartbeat_timeout_s", "ship_interval_s")


def read_workers(run_dir: str | Path, missing: list[str]) -> tuple[list[dict], dict]:
    """``(workers, info)`` from ``run_dir/workers.json``; ``([], {})`` when it is absent.

    Each worker is a dict with the documented keys, numbers as float/int or
    None; a value of the wrong type becomes None. ``info`` holds the file's
    top-level numbers (``heartbeat_timeout_s``, ``ship_interval_s``, ...).
    An unreadable file, or wrong values, add one line each to ``missing``.
    """
    path = Path(run_dir) / WORKERS_FILE
    if not path.is_file():
        return [], {}
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        missing.append(f"{WORKERS_FILE}: unreadable ({' '.join(str(exc).split())[:200]}); "
                       "nothing is said about the load generators")
        return [], {}
    if not isinstance(data, dict) or not isinstance(data.get("workers"), list):
        missing.append(f"{WORKERS_FILE}: not an object with a \"workers\" list; "
                       "nothing is said about the load generators")
        return [], {}
    bad: list[str] = []
    info: dict[str, Any] = {"schema_version": data.get("schema_version", data.get("schema"))}
    for key in _INFO_FIELDS:
        info[key] = _float(data.get(key), key, bad)
    workers = []
    skipped = 0
    for i, entry in enumerate(data["workers"]):
        if not isinstance(entry, dict):
            skipped += 1
            continue
        w: dict[str, Any] = dict(entry)
        for key in _STR_FIELDS:
            v = entry.get(key)
            w[key] = v if isinstance(v, str) and v else None
            if v is not None and w[key] is None:
                bad.append(f"workers[{i}].{key}")
        for key in _FLOAT_FIELDS:
            w[key] = _float(entry.get(key), f"workers[{i}].{key}", bad)
        for key in _INT_FIELDS:
            w[key] = _int(entry.get(key), f"workers[{i}].{key}", bad)
        report = entry.get("last_report")
        if isinstance(report, dict):
            w["last_report"] = {k: _int(report.get(k), f"workers[{i}].last_report.{k}", bad) for k in _REPORT_FIELDS}
        else:
            if report is not None:
                bad.append(f"workers[{i}].last_report")
            w["last_report"] = None
        if w["host"] is None and w["worker_id"] and ":" in w["worker_id"]:
            w["host"] = w["worker_id"].rsplit(":", 1)[0]
        workers.append(w)
    if skipped:
        missing.append(f"{WORKERS_FILE}: {skipped} worker entry(ies) not a JSON object; skipped")
    if bad:
        missing.append(f"{WORKERS_FILE}: {len(bad)} value(s) of the wrong type ignored (first: {bad[0]})")
    return workers, info


def _float(v: Any, where: str, bad: list[str]) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        bad.append(where)
        return None
    return float(v)


def _int(v: Any, where: str, bad: list[str]) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v) or v < 0:
        bad.append(where)
        return None
    return int(v)


def worker_label(worker: Mapping[str, Any], index: int = 0) -> str:
    """How the report names a worker: its worker_id (``host:pid``), else Locust's node id."""
    return worker.get("worker_id") or worker.get("node_id") or f"worker #{index + 1}"


def worst_clock_uncertainty_s(workers: Sequence[Mapping[str, Any]]) -> float:
    """The largest ``clock_uncertainty_s`` of any worker (0 when none is known)."""
    values = [w["clock_uncertainty_s"] for w in workers if w.get("clock_uncertainty_s") is not None]
    return max(values, default=0.0)


def placement_tolerance_s(workers: Sequence[Mapping[str, Any]]) -> float:
    """How far a record's start may lie outside its stage's wall-clock boundaries before it is noted.

    1 s of slack (different processes) plus the worst worker clock uncertainty.
    """
    return PLACEMENT_SLACK_S + worst_clock_uncertainty_s(workers)


def records_per_worker(frame: Any, workers: Sequence[Mapping[str, Any]]) -> tuple[dict[str, int], str]:
    """Records per ``worker_id`` and where the counts come from (``"records"`` or ``"workers.json"``).

    From the records frame's ``worker_id`` column when it has one; else each
    worker's ``records_received``.
    """
    if frame is not None and "worker_id" in getattr(frame, "columns", ()):
        counts = frame["worker_id"].dropna().astype(str).value_counts(sort=False)
        return {str(k): int(v) for k, v in counts.items()}, "records"
    return ({w["worker_id"]: int(w.get("records_received") or 0) for w in workers if w.get("worker_id")},
            WORKERS_FILE)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerEnding:
    """A worker that was lost or left before the schedule ended; times are on the master's clock.

    ``t_s`` and ``last_heard_t_s`` count from the table's time zero
    (:func:`analysis.load.run_start_unix_s`). ``stage_*`` is the stage running
    at ``ended_unix_s`` by the master's stage boundaries. ``in_flight``: a lost
    worker's requests in flight at its last report (not in the run).
    """

    worker: str
    host: str | None
    status: str  # lost | left
    ended_unix_s: float
    t_s: float
    last_heard_unix_s: float | None
    last_heard_t_s: float | None
    stage_index: int | None
    stage_name: str | None
    records_in_run: int
    in_flight: int | None
    ship_interval_s: float | None
    recent_records_per_s: float | None  # a lost worker's record rate over the RECENT_RATE_S before it went silent
    affected_stages: tuple[str, ...] = ()  # names of the stages whose offered load it cut (see stage_endings)

    @property
    def load_fell_unix_s(self) -> float:
        """When its load stopped: last heard for a lost worker, else when it ended."""
        if self.status == "lost" and self.last_heard_unix_s is not None:
            return min(self.last_heard_unix_s, self.ended_unix_s)
        return self.ended_unix_s

    @property
    def utc(self) -> str:
        return _utc(self.ended_unix_s)


def _utc(t_unix_s: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t_unix_s))


def _stage_at(stages: Sequence[StageRecord], t_unix_s: float) -> StageRecord | None:
    for s in stages:
        if float(s.start_unix_s) <= t_unix_s < float(s.end_unix_s):
            return s
    return None


def worker_endings(run: Any, *, zero_unix_s: float) -> list[WorkerEnding]:
    """Every worker of ``run.workers`` whose status is lost or left, in the order they ended."""
    workers = getattr(run, "workers", None) or []
    info = getattr(run, "workers_info", None) or {}
    stages = getattr(run, "stages", None) or []
    frame = getattr(run, "frame", None)
    counts, _ = records_per_worker(frame, workers)
    out = []
    for i, w in enumerate(workers):
        if w.get("status") not in ENDED_STATUSES:
            continue
        ended = w.get("ended_unix_s")
        if ended is None:
            ended = w.get("last_heard_unix_s")
        if ended is None:
            continue  # no time at all: listed in the table, but nothing can be placed
        stage = _stage_at(stages, ended)
        heard = w.get("last_heard_unix_s")
        report = w.get("last_report") or {}
        lost = w["status"] == "lost"
        fell = min(heard, ended) if lost and heard is not None else ended
        out.append(WorkerEnding(
            worker=worker_label(w, i), host=w.get("host"), status=w["status"], ended_unix_s=ended,
            t_s=ended - zero_unix_s, last_heard_unix_s=heard,
            last_heard_t_s=None if heard is None else heard - zero_unix_s,
            stage_index=None if stage is None else stage.stage_index,
            stage_name=None if stage is None else stage.stage_name,
            records_in_run=counts.get(w.get("worker_id") or "", 0),
            in_flight=report.get("in_flight") if lost else None,
            ship_interval_s=info.get("ship_interval_s"),
            recent_records_per_s=_recent_rate(frame, w.get("worker_id"), heard) if lost else None,
            affected_stages=tuple(s.stage_name for s in stages if _cut(s, ended, fell) is not None),
        ))
    out.sort(key=lambda e: e.ended_unix_s)
    return out


def _recent_rate(frame: Any, worker_id: str | None, until_unix_s: float | None) -> float | None:
    """Records per second the worker finished over the RECENT_RATE_S before ``until_unix_s``."""
    if worker_id is None or until_unix_s is None or frame is None or not len(frame):
        return None
    if "worker_id" not in frame.columns or "in_flight_end_unix_s" not in frame.columns:
        return None
    ends = frame.loc[frame["worker_id"] == worker_id, "in_flight_end_unix_s"].to_numpy(dtype=float)
    if not ends.size:
        return None
    since = max(until_unix_s - RECENT_RATE_S, float(frame["wall_start_unix_s"].min()))
    if until_unix_s <= since:
        return None
    n = int(((ends > since) & (ends <= until_unix_s)).sum())
    return n / (until_unix_s - since)


def stage_endings(endings: Sequence[WorkerEnding], stage: StageRecord) -> list[dict[str, Any]]:
    """The endings that cut ``stage``'s offered load, as the table's ``load_generators_ended`` cell.

    A stage is hit when a worker ended in it (``ended_unix_s`` in [start, end)),
    or when a lost worker went silent in it before the master declared it lost
    in a later stage. Each item: ``worker``, ``status``, ``t_s`` (when it
    ended) and ``silent_t_s`` (set only for the earlier stage a lost worker
    went silent in).
    """
    out = []
    for e in endings:
        how = _cut(stage, e.ended_unix_s, e.load_fell_unix_s)
        if how == "ended":
            out.append({"worker": e.worker, "status": e.status, "t_s": e.t_s, "silent_t_s": None})
        elif how == "silent":
            silent_t_s = e.t_s - (e.ended_unix_s - e.load_fell_unix_s)
            out.append({"worker": e.worker, "status": e.status, "t_s": e.t_s, "silent_t_s": silent_t_s})
    return out


def _cut(stage: StageRecord, ended_unix_s: float, fell_unix_s: float) -> str | None:
    """``"ended"`` when the worker ended in ``stage``, ``"silent"`` when it was silent (not yet declared
    lost) during part of it, else None."""
    start, end = float(stage.start_unix_s), float(stage.end_unix_s)
    if start <= ended_unix_s < end:
        return "ended"
    if fell_unix_s < end and ended_unix_s >= start:
        return "silent"
    return None


def ending_reason(item: Mapping[str, Any]) -> str:
    """One :func:`stage_endings` item as a reason the stage is not trustworthy."""
    who = f"load generator {item['worker']}"
    if item.get("silent_t_s") is not None:
        what = f"{who} went silent at {_t(item['silent_t_s'])} (declared lost at {_t(item['t_s'])})"
    elif item.get("status") == "lost":
        what = f"{who} was lost at {_t(item['t_s'])}"
    else:
        what = f"{who} left at {_t(item['t_s'])}"
    return what + "; the offered load fell for the rest of the stage"


def _t(t_s: float) -> str:
    return f"{t_s:+,.1f} s"


def _where(e: WorkerEnding) -> str:
    return f"during stage {e.stage_name}" if e.stage_name is not None else "outside every stage"


def ending_sentence(e: WorkerEnding) -> str:
    """The report's sentence for one lost or left worker: who, when, which stage, what the run lacks."""
    on = f" on host {e.host}" if e.host and not e.worker.startswith(f"{e.host}:") else ""
    if e.status == "lost":
        text = f"Load generator {e.worker}{on} was lost at {e.utc} ({_t(e.t_s)}, {_where(e)})"
        if e.last_heard_t_s is not None:
            text += (f": the master last heard from it at {_t(e.last_heard_t_s)} and declared it lost after "
                     f"{e.t_s - e.last_heard_t_s:,.1f} s of silence")
        text += f". {e.records_in_run:,} of its records are in the run. Not in the run: "
        lost = []
        if e.in_flight is not None:
            lost.append(f"the {e.in_flight:,} request(s) it had in flight at its last report")
        else:
            lost.append("the requests it had in flight (it never reported how many)")
        interval = f"{e.ship_interval_s:g} s" if e.ship_interval_s is not None else "shipping interval"
        recent = ""
        if e.recent_records_per_s is not None and e.ship_interval_s is not None:
            recent = (f" (at the {e.recent_records_per_s:.3g} records/s it made over the {RECENT_RATE_S:g} s before, "
                      f"about {e.recent_records_per_s * e.ship_interval_s:.1f})")
        lost.append(f"the records it made in its last {interval} before going silent, which it never shipped{recent}")
        text += " and ".join(lost) + "."
    else:
        text = (f"Load generator {e.worker}{on} left at {e.utc} ({_t(e.t_s)}, {_where(e)}): it quit before the "
                f"schedule ended. {e.records_in_run:,} of its records are in the run; "
                "none are expected missing because it left.")
    if e.affected_stages:
        names = ", ".join(e.affected_stages)
        text += (f" Its users or share of the rate were not replaced until the next stage, so the offered load of "
                 f"{names} fell {_since(e)}: "
                 f"{'that stage is' if len(e.affected_stages) == 1 else 'those stages are'} marked not trustworthy.")
    return text


def _since(e: WorkerEnding) -> str:
    return "from then on" if e.affected_stages[0] == e.stage_name else "from when it went silent"


def ending_summary_line(e: WorkerEnding) -> str:
    """One terminal line for a lost or left worker."""
    verb = "was lost" if e.status == "lost" else "left"
    text = f"Load generator {e.worker} {verb} at {e.utc} ({_t(e.t_s)}, {_where(e)})"
    if e.affected_stages:
        many = len(e.affected_stages) > 1
        text += (f"; the offered load of {', '.join(e.affected_stages)} fell {_since(e)} "
                 f"({'stages' if many else 'stage'} not trustworthy)")
    if e.status == "lost" and e.in_flight:
        text += f"; {e.in_flight:,} request(s) in flight on it are not in the run"
    return text + "."


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadGenerators:
    """What the report says about a distributed run's load generators."""

    workers: tuple[dict, ...]  # as read from workers.json
    hosts: tuple[str, ...]
    records: dict[str, int]  # records per worker_id
    records_source: str  # "records" (the records' worker_id) or "workers.json" (records_received)
    unlisted: dict[str, int]  # records from worker ids that workers.json does not list
    max_abs_clock_offset_s: float | None
    max_clock_uncertainty_s: float | None
    unmeasured_clocks: int  # workers with no clock offset
    placement_tolerance_s: float
    records_outside_stage: int
    endings: tuple[WorkerEnding, ...]
    gaps: tuple[tuple[str, int], ...]  # (worker, records missing from its batch sequence)


def describe_load_generators(run: Any, *, zero_unix_s: float) -> LoadGenerators | None:
    """The load generators of ``run`` (an :class:`analysis.load.Run`); None without workers.json."""
    workers = list(getattr(run, "workers", None) or [])
    if not workers:
        return None
    counts, source = records_per_worker(getattr(run, "frame", None), workers)
    listed = {w.get("worker_id") for w in workers}
    offsets = [abs(w["clock_offset_s"]) for w in workers if w.get("clock_offset_s") is not None]
    uncert = [w["clock_uncertainty_s"] for w in workers if w.get("clock_uncertainty_s") is not None]
    return LoadGenerators(
        workers=tuple(workers),
        hosts=tuple(sorted({w["host"] for w in workers if w.get("host")})),
        records=counts,
        records_source=source,
        unlisted={k: v for k, v in counts.items() if k not in listed},
        max_abs_clock_offset_s=max(offsets, default=None),
        max_clock_uncertainty_s=max(uncert, default=None),
        unmeasured_clocks=sum(1 for w in workers if w.get("clock_offset_s") is None),
        placement_tolerance_s=float(getattr(run, "placement_tolerance_s", placement_tolerance_s(workers))),
        records_outside_stage=int(getattr(run, "records_outside_stage", 0)),
        endings=tuple(worker_endings(run, zero_unix_s=zero_unix_s)),
        gaps=tuple((worker_label(w, i), w["record_gaps"]) for i, w in enumerate(workers) if w.get("record_gaps")),
    )


def _ms(v: float | None) -> str:
    """Milliseconds to 3 significant digits, never in exponent form (a skewed clock is 30,000 ms off)."""
    if v is None:
        return "-"
    ms = v * 1000.0
    if abs(ms) >= 100:
        return f"{ms:,.0f}"
    return f"{float(f'{ms:.3g}'):g}" if ms else "0"


def load_generator_lines(lg: LoadGenerators) -> tuple[list[tuple[str, ...]], list[str]]:
    """The load generators as a table (header row first) and sentences, for the report."""
    rows: list[tuple[str, ...]] = [("worker", "host", "status", "records in the run", "received by the master",
                                    "batch gaps", "clock offset ms", "uncertainty ms")]
    for i, w in enumerate(lg.workers):
        wid = w.get("worker_id")
        in_run = lg.records.get(wid, 0) if wid else 0
        received = w.get("records_received")
        rows.append((worker_label(w, i), w.get("host") or "-", w.get("status") or "-", f"{in_run:,}",
                     "-" if received is None else f"{received:,}", f"{w.get('record_gaps') or 0:,}",
                     _ms(w.get("clock_offset_s")), _ms(w.get("clock_uncertainty_s"))))
    n, h = len(lg.workers), len(lg.hosts)
    total = sum(lg.records.get(w.get("worker_id"), 0) for w in lg.workers if w.get("worker_id"))
    source = ("counted from the records' worker_id" if lg.records_source == "records"
              else "as the master counted them (records_received)")
    lines = [
        f"{n:,} load-generator worker process{'es' if n != 1 else ''} on {h:,} host{'s' if h != 1 else ''}"
        + (f" ({', '.join(lg.hosts)})" if lg.hosts else "")
        + f", driven by one master. Records per worker are {source}: {total:,} in all."
    ]
    if lg.unlisted:
        lines.append(f"{sum(lg.unlisted.values()):,} record(s) come from processes {WORKERS_FILE} does not list: "
                     + ", ".join(f"{k} ({v:,})" for k, v in sorted(lg.unlisted.items())) + ".")
    measured = n - lg.unmeasured_clocks
    if measured:
        lines.append(
            f"Clocks: each worker measured the offset of its wall clock to the master's (ping-pong messages) and "
            f"wrote its records' start times on the master's clock. The largest offset corrected was "
            f"{_ms(lg.max_abs_clock_offset_s)} ms, known to within {_ms(lg.max_clock_uncertainty_s)} ms. Durations "
            "are measured on each worker's own monotonic clock and need no correction.")
    if lg.unmeasured_clocks:
        lines.append(f"{lg.unmeasured_clocks:,} worker(s) have no clock offset: their start times are on their own "
                     "wall clock, uncorrected.")
    lines.append(
        "Records are placed in the stage the master announced when each was sent; their start times, on the "
        f"master's clock, agree with the master's stage boundaries within \u00b1{lg.placement_tolerance_s:.2f} s "
        f"({lg.records_outside_stage:,} outside).")
    for e in lg.endings:
        lines.append(ending_sentence(e))
    for worker, gaps in lg.gaps:
        lines.append(f"{gaps:,} record(s) from {worker} were lost in transit: they are missing from its batch "
                     "sequence, and not in the run.")
    return rows, lines

