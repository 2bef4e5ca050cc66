"""Failed requests: exact counts by category, Locust's own count of them, and a server that stopped answering.

Counts cover every record of the run (not only the steady-state windows of
the envelope table). ``cancelled`` (a request the load generator itself
stopped) is not a failure and is counted apart.

A server *stopped answering* when, from some moment to the end of the run,
every request that ended failed without any answer from the server: refused
(``connect_error``), closed before any response byte (``connection_closed``),
dropped mid-stream (``connection_reset``) or not connected in time
(``timeout_connect``). The moment is when the first of those requests ended;
at least :data:`MIN_STOP_REQUESTS` such requests are needed. Requests that get
an HTTP error, an error event or a timeout while connected *were* answered
(a slow or overloaded server is a measurement, not an outage). Every stage
still running at that moment, and every later one, says nothing about the
envelope: above the last stage that finished before it, the envelope is unknown.
Failed ``/metrics`` samples after the last good one corroborate it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import IO, Any, Sequence

import numpy as np
import pandas as pd

from analysis.chunks import RequestChunks
from envelope.records import ErrorCategory
from envelope.stages import StageRecord

__all__ = [
    "NO_ANSWER_CATEGORIES",
    "MIN_STOP_REQUESTS",
    "FailureCount",
    "ServerStop",
    "failure_counts",
    "locust_failure_counts",
    "write_failures_csv",
    "server_stop",
    "run_server_stop",
    "server_stop_sentence",
]

NO_ANSWER_CATEGORIES = frozenset({
    ErrorCategory.CONNECT_ERROR,
    ErrorCategory.CONNECTION_CLOSED,
    ErrorCategory.CONNECTION_RESET,
    ErrorCategory.TIMEOUT_CONNECT,
})
MIN_STOP_REQUESTS = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class FailureCount:
    """Records of one error category: the whole run, and per stage (``(stage_index, stage_name, n)``)."""

    category: str
    requests: int
    by_stage: tuple[tuple[int | None, str, int], ...]

    @property
    def is_failure(self) -> bool:
        return self.category != ErrorCategory.CANCELLED


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerStop:
    """When the server stopped answering, and what shows it (see the module docstring)."""

    t_unix_s: float  # the first request of the final unanswered run ended here
    last_answer_unix_s: float | None  # the last response data before it (a finished request or a chunk)
    stage_index: int | None  # the stage running at t_unix_s (None: outside every stage)
    stage_name: str | None
    pass_name: str | None
    requests: int  # requests that ended from t_unix_s on (every one unanswered)
    categories: tuple[tuple[str, int], ...]  # those requests by category, most first
    affected_stage_indices: tuple[int, ...]  # stages still running at t_unix_s, and every later one
    metrics_last_ok_unix_s: float | None = None  # the last good /metrics sample
    metrics_failed_from_unix_s: float | None = None  # the first failed sample after it
    metrics_failed_samples: int = 0  # failed samples after the last good one
    metrics_error: str | None = None  # the error of the first of them


def failure_counts(frame: pd.DataFrame, stages: Sequence[StageRecord]) -> list[FailureCount]:
    """Records of every error category (``cancelled`` included), most first, with a per-stage split."""
    if frame.empty or "error_category" not in frame.columns:
        return []
    cats = frame["error_category"].to_numpy(dtype=object)
    failed = frame["error_category"].notna().to_numpy(dtype=bool)
    if not failed.any():
        return []
    idx = frame["stage_index"].to_numpy(dtype=float, na_value=np.nan)
    names = {s.stage_index: s.stage_name for s in stages}
    order = {s.stage_index: i for i, s in enumerate(sorted(stages, key=lambda s: float(s.start_unix_s)))}
    per: dict[str, Counter] = {}
    for cat, si in zip(cats[failed].tolist(), idx[failed].tolist()):
        key = None if math.isnan(si) else int(si)
        per.setdefault(str(cat), Counter())[key] += 1
    out = []
    for cat, counter in per.items():
        by_stage = sorted(counter.items(), key=lambda kv: (order.get(kv[0], len(order)) if kv[0] is not None
                                                          else len(order) + 1, kv[0] or 0))
        out.append(FailureCount(
            category=cat, requests=sum(counter.values()),
            by_stage=tuple((si, names.get(si, f"stage {si}" if si is not None else "no stage"), n)
                           for si, n in by_stage),
        ))
    return sorted(out, key=lambda f: (not f.is_failure, -f.requests, f.category))


_LOCUST_ERROR = re.compile(r"""^\s*(?:[A-Za-z_][\w.]*\(\s*['"])?([a-z][a-z0-9_]*)(?::|['"]\)|$)""")


def locust_failure_counts(failures: pd.DataFrame | None, *, request_type: str = "E2E") -> dict[str, int] | None:
    """Occurrences in Locust's failures CSV by error category (our errors read ``category: detail``).

    Only rows of ``request_type`` count (the E2E entry is one per request).
    An error that names no category is counted under ``"?"``. None without the CSV.
    """
    if failures is None or "Error" not in failures.columns or "Occurrences" not in failures.columns:
        return None
    out: Counter = Counter()
    methods = failures["Method"].astype(str) if "Method" in failures.columns else None
    for i, (error, n) in enumerate(zip(failures["Error"].astype(str), failures["Occurrences"])):
        if methods is not None and methods.iloc[i] != request_type:
            continue
        m = _LOCUST_ERROR.match(error)
        out[m.group(1) if m else "?"] += int(n)
    return dict(out)


def write_failures_csv(counts: Sequence[FailureCount], sink: IO[str]) -> None:
    """Long format to a text sink: ``category,stage_index,stage_name,requests`` (one line per stage)."""
    import csv

    writer = csv.writer(sink, lineterminator="\n")
    writer.writerow(("category", "stage_index", "stage_name", "requests"))
    for f in counts:
        for si, name, n in f.by_stage:
            writer.writerow((f.category, "" if si is None else si, name, n))


def server_stop(
    frame: pd.DataFrame,
    stages: Sequence[StageRecord],
    *,
    metrics: pd.DataFrame | None = None,
    metrics_failed: pd.DataFrame | None = None,
    chunks: RequestChunks | None = None,
    min_requests: int = MIN_STOP_REQUESTS,
) -> ServerStop | None:
    """The moment the server stopped answering for good, or None (see the module docstring).

    ``frame`` needs ``error_category``, ``wall_start_unix_s`` and ``in_flight_end_unix_s``
    (as :func:`analysis.load.load_run` builds it); ``metrics``/``metrics_failed`` are the
    good and failed ``/metrics`` samples; ``chunks`` the records' content chunks (their arrivals).
    """
    if frame.empty or "in_flight_end_unix_s" not in frame.columns:
        return None
    series = frame["error_category"]
    end = frame["in_flight_end_unix_s"].to_numpy(dtype=float, na_value=np.nan)
    keep = (series != ErrorCategory.CANCELLED).to_numpy(dtype=bool) & ~np.isnan(end)
    if not keep.any():
        return None
    cats, end = series.to_numpy(dtype=object)[keep], end[keep]
    no_answer = series.isin(NO_ANSWER_CATEGORIES).to_numpy(dtype=bool)[keep]
    # The final run of unanswered requests in end-time order: those that ended after the last
    # answered one (one that ended at the same instant does not count as after it).
    if (~no_answer).any():
        last_answered = float(end[~no_answer].max())
        after = no_answer & (end > last_answered)
    else:
        last_answered = None
        after = no_answer.copy()
    if int(after.sum()) < min_requests:
        return None
    t_stop = float(end[after].min())
    last_answer = last_answered
    if chunks is not None:
        seen = chunks.last_arrival_at_or_before(t_stop)
        if seen is not None:
            last_answer = max(seen, last_answer if last_answer is not None else -math.inf)
    by_cat = Counter(str(c) for c in cats[after].tolist())
    ordered = sorted(stages, key=lambda s: float(s.start_unix_s))
    running = None
    for s in ordered:
        s_end = s.end_unix_s
        if float(s.start_unix_s) <= t_stop and (s_end is None or t_stop < float(s_end)):
            running = s
    affected = tuple(s.stage_index for s in ordered if s.end_unix_s is None or float(s.end_unix_s) > t_stop)
    m_ok, m_from, m_n, m_err = _metrics_gap(metrics, metrics_failed)
    return ServerStop(
        t_unix_s=t_stop,
        last_answer_unix_s=last_answer,
        stage_index=None if running is None else running.stage_index,
        stage_name=None if running is None else running.stage_name,
        pass_name=None if running is None else running.pass_name,
        requests=int(after.sum()),
        categories=tuple(sorted(by_cat.items(), key=lambda kv: (-kv[1], kv[0]))),
        affected_stage_indices=affected,
        metrics_last_ok_unix_s=m_ok,
        metrics_failed_from_unix_s=m_from,
        metrics_failed_samples=m_n,
        metrics_error=m_err,
    )


def run_server_stop(run: Any) -> ServerStop | None:
    """:func:`server_stop` of a loaded :class:`analysis.load.Run`."""
    telemetry = getattr(run, "telemetry", {}) or {}
    return server_stop(run.frame, run.stages, metrics=telemetry.get("metrics"),
                       metrics_failed=telemetry.get("metrics_failed"),
                       chunks=getattr(run, "chunks", None))


def _metrics_gap(metrics: pd.DataFrame | None,
                 failed: pd.DataFrame | None) -> tuple[float | None, float | None, int, str | None]:
    """(last good sample, first failed sample after it, failed samples after it, first error)."""
    last_ok = None
    if metrics is not None and not metrics.empty and "t_unix_s" in metrics.columns:
        t = pd.to_numeric(metrics["t_unix_s"], errors="coerce").dropna()
        if len(t):
            last_ok = float(t.max())
    if failed is None or failed.empty or "t_unix_s" not in failed.columns:
        return last_ok, None, 0, None
    f = failed.assign(t_unix_s=pd.to_numeric(failed["t_unix_s"], errors="coerce")).dropna(subset=["t_unix_s"])
    if last_ok is not None:
        f = f[f["t_unix_s"] > last_ok]
    if f.empty:
        return last_ok, None, 0, None
    f = f.sort_values("t_unix_s", kind="stable")
    error = f["error"].iloc[0] if "error" in f.columns else None
    return last_ok, float(f["t_unix_s"].iloc[0]), int(len(f)), (None if error is None else str(error))


def server_stop_sentence(stop: ServerStop, *, zero_unix_s: float,
                         stages: Sequence[StageRecord] = ()) -> str:
    """The stop in plain words; times count from ``zero_unix_s`` (the run's start)."""
    where = f" (stage {stop.stage_name})" if stop.stage_name else " (after the last stage)"
    cats = ", ".join(f"{c} {n:,}" for c, n in stop.categories)
    text = (f"The server stopped answering at {stop.t_unix_s - zero_unix_s:,.1f} s{where}: every one of the "
            f"{stop.requests:,} requests that ended from then on got no answer ({cats})")
    if stop.last_answer_unix_s is not None:
        text += f"; the last response data arrived at {stop.last_answer_unix_s - zero_unix_s:,.1f} s"
    text += "."
    if stop.metrics_failed_from_unix_s is not None:
        text += (f" Its /metrics failed from {stop.metrics_failed_from_unix_s - zero_unix_s:,.1f} s on "
                 f"({stop.metrics_failed_samples:,} failed samples; first: {stop.metrics_error}).")
    elif stop.metrics_last_ok_unix_s is not None and stop.metrics_last_ok_unix_s < stop.t_unix_s:
        text += f" The last good /metrics sample was at {stop.metrics_last_ok_unix_s - zero_unix_s:,.1f} s."
    names = {s.stage_index: s.stage_name for s in stages}
    affected = [str(names.get(i, i)) for i in stop.affected_stage_indices]
    if affected:
        text += (f" The envelope above that point is unknown: {', '.join(affected)} "
                 f"{'is' if len(affected) == 1 else 'are'} not judged.")
    else:
        text += " Every stage had finished before it, so the envelope is not affected."
    return text
