"""Load a run directory into one in-memory :class:`Run` for the tables and plots.

Records are the only source of latency numbers. They are read column by column
(:mod:`analysis.record_files`: pyarrow's JSON reader, or the Parquet copy kept
beside the records) and turned into the frame without a Python loop over records
(:mod:`analysis.columnar`); per-chunk values that do not fit a one-row-per-request
frame (chunk offsets and token counts, from which ITL values and chunk arrivals
are derived) are kept compact in :class:`analysis.chunks.RequestChunks`.

Every part of the directory except the records is optional; what is absent or
unreadable is described in :attr:`Run.missing`.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa

from analysis.chunks import RequestChunks
from analysis.columnar import ORIGIN_COLUMNS, LoadedRecords, RecordsAccumulator
from analysis.record_files import CACHE_MIN_BYTES, read_record_tables
from analysis.server_latency import SERVER_HISTOGRAMS
from analysis.tokens import TokenAudit
from analysis.workers import PLACEMENT_SLACK_S, placement_tolerance_s, read_workers
from envelope.records import iter_record_files
from envelope.rundir import RunInfo
from envelope.search_log import SearchEntry, read_search_log
from envelope.source_log import SourceEntry, read_source_log
from envelope.stages import StageKind, StageRecord, StagesFileError, read_stages

__all__ = [
    "Run",
    "RunDirError",
    "Completeness",
    "load_run",
    "records_frame",
    "run_start_unix_s",
    "completeness",
    "BATCH_RECORDS",
    "ORIGIN_COLUMNS",
    "LoadedRecords",
]

BATCH_RECORDS = 20_000  # records per per_request_frame call (records_frame): bounds the dicts held at once


class RunDirError(ValueError):
    """The directory cannot be analysed at all; ``str()`` is one line."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Run:
    """One run directory, loaded.

    ``frame`` has one row per record (the columns of ``per_request_frame``, the
    origin columns and ``in_flight_end_unix_s``: :data:`analysis.columnar.FRAME_COLUMNS`);
    ``chunks`` holds every record's content chunks, from which ITL values and
    chunk arrivals are derived (:class:`analysis.chunks.RequestChunks`).
    ``token_audit`` is computed from the records as they stream past (see
    :mod:`analysis.tokens`).

    ``workers`` / ``workers_info``: a distributed run's ``workers.json`` (its
    worker entries and top-level numbers; see :mod:`analysis.workers`), empty
    for a single-process run. ``placement_tolerance_s``: how far a record's
    start may lie outside its stage's wall-clock boundaries before it is
    counted in ``records_outside_stage`` (1 s plus the worst worker clock
    uncertainty).
    """

    run_dir: Path
    info: RunInfo
    server: dict
    stages: list[StageRecord]
    frame: pd.DataFrame
    chunks: RequestChunks = field(default_factory=RequestChunks.empty)
    # metrics (good samples only), metrics_failed (t_unix_s, error of failed samples), gpu, host
    telemetry: dict[str, pd.DataFrame] = field(default_factory=dict)
    locust: dict[str, pd.DataFrame] = field(default_factory=dict)  # stats, history, failures
    missing: list[str] = field(default_factory=list)
    skipped_lines: list[str] = field(default_factory=list)
    stages_from_records: bool = False
    token_audit: TokenAudit = field(default_factory=TokenAudit)
    workers: list[dict] = field(default_factory=list)
    workers_info: dict = field(default_factory=dict)
    placement_tolerance_s: float = PLACEMENT_SLACK_S
    records_outside_stage: int = 0
    searches: list[SearchEntry] = field(default_factory=list)  # search.json: the search passes as they ran
    sources: list[SourceEntry] = field(default_factory=list)  # sources.json: dataset and trace files drawn from

    @property
    def name(self) -> str:
        return self.info.run_id or self.run_dir.name

    def __repr__(self) -> str:
        return (
            f"Run(run_dir={str(self.run_dir)!r}, records={len(self.frame)}, "
            f"stages={len(self.stages)}, missing={len(self.missing)})"
        )


def load_run(run_dir: str | os.PathLike[str], *, cache_min_bytes: int | None = CACHE_MIN_BYTES) -> Run:
    """Read ``run_dir``; raise :class:`RunDirError` when it is not a run directory.

    A record file of at least ``cache_min_bytes`` is read from its Parquet copy under ``cache/``, or
    copied there as it is read (see :mod:`analysis.record_files`); None: never.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise RunDirError(f"{root}: not a directory")
    has_records = (root / "records").is_dir()
    if not has_records and not (root / "stages.json").is_file():
        raise RunDirError(f"{root}: not a run directory (no records/ and no stages.json)")
    missing: list[str] = []
    skipped: list[str] = []

    info = RunInfo.from_json(_read_json_object(root / "run.json", missing, "run.json"), run_id=root.name)
    server = _read_json_object(root / "server.json", missing, "server.json")
    stages = _read_stages(root, missing)
    workers, workers_info = read_workers(root, missing)
    try:
        searches = read_search_log(root)
    except ValueError as exc:
        searches = []
        missing.append(f"search.json: {exc}; the search passes are reported as plain stages")

    files = iter_record_files(root)
    if not files:
        missing.append("records/: no record files, so no latency or throughput numbers")
    acc = RecordsAccumulator()
    # Arrow's default allocator (mimalloc) keeps what the parse freed: ~300 MiB for a million
    # records. The system's malloc gives it back, and the reading is no slower with it.
    pool = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        for part in read_record_tables(files, skipped=skipped, run_dir=root, cache_min_bytes=cache_min_bytes):
            if isinstance(part, pa.Table):
                acc.add_table(part)
            else:
                for batch in _batches(part, BATCH_RECORDS):
                    acc.add_records(batch)
        loaded = acc.result()
    finally:
        pa.set_memory_pool(pool)
    _return_freed_memory()
    frame = loaded.frame

    stages_from_records = False
    if stages is None:
        stages = _stages_from_records(frame)
        stages_from_records = True
        if stages:
            missing.append(
                "stages.json: stages rebuilt from records (no target users or SLOs; "
                "windows span each stage's records)"
            )
    _complete_stages(stages, frame, info, missing)
    tolerance_s = placement_tolerance_s(workers)
    outside = _check_stage_placement(stages, frame, missing, tolerance_s=tolerance_s)

    telemetry = _read_telemetry(root / "telemetry", missing, skipped)
    locust = _read_locust(root / "locust", missing)
    if skipped:
        missing.append(f"{len(skipped)} unreadable line(s) skipped (first: {skipped[0]})")
    return Run(
        run_dir=root,
        info=info,
        server=server,
        stages=stages,
        frame=frame,
        chunks=loaded.chunks,
        telemetry=telemetry,
        locust=locust,
        missing=missing,
        skipped_lines=skipped,
        stages_from_records=stages_from_records,
        token_audit=loaded.token_audit,
        workers=workers,
        workers_info=workers_info,
        placement_tolerance_s=tolerance_s,
        records_outside_stage=outside,
        searches=searches,
        sources=read_source_log(root),
    )


def _return_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc only; elsewhere nothing).

    Reading leaves the heap full of holes where the per-batch parts were (~300 MiB for a
    million records) that glibc keeps until told: ``malloc_trim``, as Dask's worker memory
    docs recommend for the same pattern.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


def records_frame(records: Iterable[Mapping], *, batch_records: int = BATCH_RECORDS) -> LoadedRecords:
    """The frame, chunks and token audit of record dicts, record by record (see :mod:`analysis.columnar`).

    Any JSON value that is not an object is ignored; :func:`load_run` reads files column by column.
    """
    acc = RecordsAccumulator()
    for batch in _batches((r for r in records if isinstance(r, dict)), batch_records):
        acc.add_records(batch)
    return acc.result()


def _batches(records: Iterable[Mapping], size: int) -> Iterator[list[Mapping]]:
    batch: list[Mapping] = []
    for rec in records:
        batch.append(rec)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _read_json_object(path: Path, missing: list[str], label: str) -> dict:
    if not path.is_file():
        missing.append(f"{label}: absent")
        return {}
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        missing.append(f"{label}: unreadable ({_one_line(exc)})")
        return {}
    if not isinstance(data, dict):
        missing.append(f"{label}: not a JSON object")
        return {}
    return data


def _read_stages(root: Path, missing: list[str]) -> list[StageRecord] | None:
    try:
        return read_stages(root, problems=missing)
    except FileNotFoundError:
        missing.append("stages.json: absent")
    except StagesFileError as exc:
        missing.append(str(exc))
    return None


def _stages_from_records(frame: pd.DataFrame) -> list[StageRecord]:
    if frame.empty:
        return []
    stages = []
    grouped = frame.groupby(["stage_index", "pass_name", "stage_name"], sort=True, dropna=True)
    for (idx, pass_name, stage_name), g in grouped:
        stages.append(StageRecord(pass_index=None, pass_name=pass_name, stage_index=int(idx), stage_name=stage_name,
                                  kind=StageKind.USERS, start_unix_s=float(g["wall_start_unix_s"].min()),
                                  end_unix_s=float(g["in_flight_end_unix_s"].max()), derived=True))
    return stages


def _complete_stages(stages: list[StageRecord], frame: pd.DataFrame, info: RunInfo, missing: list[str]) -> None:
    """Give every stage an end time: the next stage's start, the run's end, or its last record."""
    stages.sort(key=lambda s: (s.start_unix_s, s.stage_index))
    for i, stage in enumerate(stages):
        if stage.end_unix_s is not None:
            continue
        if i + 1 < len(stages):
            end = stages[i + 1].start_unix_s
            how = "the next stage's start"
        elif info.ended_unix_s is not None:
            end = info.ended_unix_s
            how = "the run's end"
        else:
            mine = frame.loc[frame["stage_index"] == stage.stage_index, "in_flight_end_unix_s"]
            end = float(mine.max()) if len(mine) else stage.start_unix_s
            how = "its last record's end"
        stages[i] = stage.replace(end_unix_s=max(end, stage.start_unix_s), end_inferred=True)
        missing.append(f"stages.json: stage {stage.stage_name!s} has no end time; used {how}")


def _check_stage_placement(stages: list[StageRecord], frame: pd.DataFrame, missing: list[str], *,
                           tolerance_s: float = PLACEMENT_SLACK_S) -> int:
    """Note records whose stage_index is unknown or whose start lies outside their stage.

    Records stay in the stage their stage_index names (the one the master
    announced); the wall clock only checks it. Returns how many started more
    than ``tolerance_s`` outside their stage.
    """
    if frame.empty or not stages:
        return 0
    idx = frame["stage_index"].to_numpy(dtype=float, na_value=np.nan)
    known = np.array([s.stage_index for s in stages])
    unknown = ~np.isin(idx, known)
    if unknown.any():
        missing.append(f"{int(unknown.sum())} record(s) name a stage_index absent from stages.json")
    if any(s.derived for s in stages):
        return 0
    start = frame["wall_start_unix_s"].to_numpy(dtype=float)
    outside = np.zeros(len(frame), dtype=bool)
    for s in stages:
        mine = idx == s.stage_index
        # slack: stage boundaries and record starts come from different processes (and clocks)
        outside |= mine & ((start < s.start_unix_s - tolerance_s) | (start > s.end_unix_s + tolerance_s))
    n = int(outside.sum())
    if n:
        missing.append(
            f"{n} record(s) started outside their stage's wall-clock boundaries by more than {tolerance_s:.2f} s "
            "(kept in the stage their stage_index names)"
        )
    return n


def _read_jsonl(path: Path, skipped: list[str]) -> list[dict]:
    rows = []
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                skipped.append(f"{path}:{lineno}: unreadable telemetry line skipped")
                continue
            if isinstance(obj, dict):
                rows.append(obj)
    return rows


def _read_telemetry(tdir: Path, missing: list[str], skipped: list[str]) -> dict[str, pd.DataFrame]:
    out: dict[str, pd.DataFrame] = {}
    for name in ("metrics", "gpu", "host"):
        path = tdir / f"{name}.jsonl"
        if not path.is_file():
            missing.append(f"telemetry/{name}.jsonl: absent")
            continue
        try:
            rows = _read_jsonl(path, skipped)
        except OSError as exc:
            missing.append(f"telemetry/{name}.jsonl: unreadable ({_one_line(exc)})")
            continue
        if name == "metrics":
            rows = [_metrics_row(r) for r in rows]
        elif name == "gpu":
            flat = []
            for r in rows:
                for g in r.get("gpus") or []:
                    if isinstance(g, dict):
                        flat.append({"t_unix_s": r.get("t_unix_s"), **g})
            if rows and not flat:
                reason = next((r.get("reason") for r in rows if r.get("absent")), None)
                missing.append(f"telemetry/gpu.jsonl: no GPU samples ({reason or 'none recorded'})")
            rows = flat
        frame = pd.DataFrame(rows)
        if "t_unix_s" in frame.columns:
            frame = frame.sort_values("t_unix_s", kind="stable", ignore_index=True)
        if name == "metrics" and not frame.empty and "ok" in frame.columns:
            good = frame["ok"].fillna(False).astype(bool)
            if not good.all():
                # failed samples (server gone, timeouts) mark telemetry gaps
                cols = [c for c in ("t_unix_s", "error") if c in frame.columns]
                out["metrics_failed"] = frame.loc[~good, cols].reset_index(drop=True)
            frame = frame[good].reset_index(drop=True)
        out[name] = frame
    return out


def _metrics_row(sample: dict) -> dict:
    """A metrics sample with only the histograms the server-latency decomposition reads."""
    hists = sample.get("histograms")
    row = {k: v for k, v in sample.items() if k != "histograms"}
    if isinstance(hists, dict):
        row["histograms"] = {k: hists.get(k) for k in SERVER_HISTOGRAMS if isinstance(hists.get(k), dict)}
    return row


def _read_locust(ldir: Path, missing: list[str]) -> dict[str, pd.DataFrame]:
    out: dict[str, pd.DataFrame] = {}
    if not ldir.is_dir():
        missing.append("locust/: absent (not needed: numbers come from records)")
        return out
    for key, fname in (("stats", "locust_stats.csv"), ("history", "locust_stats_history.csv"),
                       ("failures", "locust_failures.csv")):
        path = ldir / fname
        if not path.is_file():
            continue
        try:
            out[key] = pd.read_csv(path)
        except (OSError, ValueError) as exc:
            missing.append(f"locust/{fname}: unreadable ({_one_line(exc)})")
    return out


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def run_start_unix_s(run: Any) -> float:
    """The zero of the table's window columns: run.json's start, else the first stage or record."""
    started = run.info.started_unix_s
    if started is not None:
        return float(started)
    if run.stages:
        return float(min(s.start_unix_s for s in run.stages))
    if len(run.frame):
        return float(run.frame["wall_start_unix_s"].min())
    return 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Completeness:
    """Whether a run ran its whole schedule, from run.json's ``status`` and the stages.

    ``partial`` is True for a run that stopped early (status ``partial``, a
    ``running`` left by a killed load generator, ``failed``, or fewer stages
    than ``planned_stages``); ``reasons`` says why, one sentence each.
    """

    status: str | None
    partial: bool
    reasons: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """``partial run``, ``failed run``, ``complete run`` or ``run status unknown``."""
        if self.partial:
            return "failed run" if self.status == "failed" else "partial run"
        return "complete run" if self.status else "run status unknown"


_COMPLETE = ("complete", "completed")


def completeness(run: Any) -> Completeness:
    """How complete ``run`` is (see :class:`Completeness`)."""
    info: RunInfo = run.info
    status = str(info.status) if info.status is not None else None
    reasons: list[str] = []
    if status is None:
        reasons.append("run.json gives no status, so whether the run finished is unknown.")
    elif status == "running":
        reasons.append("run.json still says \"running\": the load generator stopped without finishing "
                       "(killed, or still running when this report was made).")
    elif status == "partial":
        reasons.append("run.json says \"partial\": the run was interrupted or did not run its schedule to the end.")
    elif status == "failed":
        failure = info.failure
        reasons.append("run.json says \"failed\"" + (f": {failure}" if failure else "") + ".")
    elif status not in _COMPLETE:
        reasons.append(f"run.json says {status!r}, not \"complete\".")
    planned = info.planned_stages
    ran = len(run.stages)
    short = planned is not None and ran < planned
    if short:
        reasons.append(f"{ran} of {planned} planned stages ran.")
    inferred = [s.stage_name for s in run.stages if s.end_inferred]
    if inferred:
        reasons.append(f"Stage {inferred[-1]} has no recorded end: it was cut short, and its end is inferred.")
    if status is None:
        partial = short or bool(inferred)
    else:
        partial = status not in _COMPLETE or short
    return Completeness(status=status, partial=partial,
                        reasons=tuple(reasons) if (partial or status is None) else ())
