"""The envelope table: one row per (pass, stage) over the stage's steady-state window.

Steady-state window (the rule the report states):
    start = stage start + ramp + settle, end = stage end, where
    ramp = target_users / spawn_rate for closed-loop ("users") stages (an upper
    bound on Locust's spawn time whatever the previous user count; 0 for "rate"
    stages) and settle = ``WindowRule.settle_s`` (default 5 s). When that leaves
    less than ``WindowRule.min_window_s``, the window is the second half of the
    stage and the row says so in ``window_note``. Stages rebuilt from records
    (no stages.json) use their whole span.

Which requests count:
    * latency percentiles, ``requests``, ``errors``: requests of this stage that
      *started* inside the window. Selecting by start time does not favour short
      requests (selecting by finish time would include the length-biased request
      straddling the window start).
    * ``aggregate_output_tokens_per_s``: output tokens of successful requests
      whose content chunks *arrived* inside the window, divided by the window
      length. Each chunk carries its tokens (``chunk_tokens``, or the request's
      output tokens spread evenly), so a request straddling an edge contributes
      only what it streamed inside; no edge bias, whatever the request length.
    * ``mean_in_flight``: time-weighted mean number of requests of any stage in
      flight during the window; a request is in flight from its start to the end
      of its E2E (success) or to ``t_done_s`` (failure).
      ``quota_mean_in_flight`` is the part of it that a client class's rate
      quota sent beside a users stage's users (requests with an intended send
      time in a users stage); the in-flight rules (a window that waits for a
      step down to drain, the flag for another stage's requests) count users only.
    * ``per_user_output_tokens_per_s`` = aggregate / mean_in_flight: the output
      rate one in-flight request sees (with no think time, the rate per user).
    * ``server_stopped``: the server stopped answering during this stage or
      before it (see :mod:`analysis.failures`); such a row is kept in the table
      but not judged as part of the envelope.
    * ``load_generators_ended``: load-generator workers lost or left during
      the stage (see :mod:`analysis.workers`); their load was not replaced
      until the next stage, so such a stage is not trustworthy.

Per client class (:func:`client_table`, runs whose records name more than one
class): the same window and rules over one class's records only, judged
against that class's SLOs; the server's cells and the load generator's trust
are the stage's.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import IO, Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from analysis.broke import CLIENT_SATURATED_CORE_RATIO, busiest_process_core_ratio
from analysis.chunks import RequestChunks
from analysis.failures import run_server_stop
from analysis.saturation import over_capacity
from analysis.load import run_start_unix_s
from analysis.server_latency import server_latency, window_deltas
from analysis.prefix_cache import prefix_cache_counters, prefix_cache_window
from analysis.rows import (
    ClientRow,
    LATENCY_METRICS,
    PERCENTILES,
    TABLE_COLUMNS,
    LatencyPercentiles,
    OpenLoopCells,
    RequestCounts,
    Goodput,
    ServerLatency,
    ServerTelemetry,
    SloResult,
    StageWindow,
    TableRow,
    Throughput,
    Trust,
    WindowIntegrity,
)
from analysis.workers import ending_reason, stage_endings, worker_endings
from envelope import metrics
from envelope.attainment import Attainment, attainment_target, good_mask, thresholds_from_slos
from envelope.client_budget import over_budget_reason
from envelope.records import ErrorCategory
from envelope.search import probe_sample
from envelope.stages import StageRecord

# SLO keys that set per-request thresholds (judged through attainment, not checked on their own)
PER_REQUEST_KEYS = frozenset({"ttft_ms", "tpot_ms", "e2e_ms", "attainment_min"})

__all__ = [
    "WindowRule",
    "TABLE_COLUMNS",
    "LATENCY_METRICS",
    "PERCENTILES",
    "TableRow",
    "SloResult",
    "steady_window",
    "envelope_table",
    "client_table",
    "WindowSample",
    "window_samples",
    "evaluate_slos",
    "trust_reasons",
    "stalls_matter",
    "few_sample_percentiles",
    "table_totals",
    "write_table_csv",
    "write_table_markdown",
    "markdown_columns",
    "write_client_csv",
    "CLIENT_CSV_COLUMNS",
    "row_cell",
    "SERVER_STOPPED_CELL",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowRule:
    """How the steady-state window of a stage is cut (see the module docstring)."""

    settle_s: float = 5.0
    min_window_s: float = 5.0


# When a stage's numbers stop describing the server (see trust_reasons)
RATE_SHORTFALL_LIMIT = 0.02  # an open-loop stage that sent more than 2% fewer requests than asked
CLIENT_CPU_LIMIT_PERCENT = 90.0  # a load-generator process this busy limits the load it offers
CLIENT_LOOP_LAG_LIMIT_MS = 50.0  # a stall this long delays every chunk read meanwhile
STALLED_SHARE_P95 = 0.05  # stalled requests above this share can set the p95 ...
STALLED_SHARE_P99 = 0.01  # ... and above this one the p99
STALL_SHIFT_LIMIT = 0.10  # leaving stalled requests out moves a reported percentile by more than this
COALESCED_CHUNK_LIMIT = 0.2  # more ITL gaps than this at exactly 0: ITL percentiles describe socket reads
IN_FLIGHT_SLACK = 0.5  # mean in flight above target users + this: the window held another stage's requests


def steady_window(stage: StageRecord, *, rule: WindowRule = WindowRule()) -> tuple[float, float, str]:
    """The steady-state window ``(start_unix_s, end_unix_s, note)`` of one stage."""
    start = float(stage.start_unix_s)
    end = float(stage.end_unix_s)
    if stage.derived:
        return start, end, "whole stage (no stages.json)"
    ramp_s = 0.0
    users, spawn = stage.target_users, stage.spawn_rate
    if not stage.open_loop and users and spawn:
        ramp_s = float(users) / float(spawn)
    ws = start + ramp_s + rule.settle_s
    if end - ws < rule.min_window_s:
        return start + (end - start) / 2.0, end, "short stage: second half used"
    return ws, end, ""


def few_sample_percentiles(n: int) -> list[str]:
    """Percentiles that ``n`` samples cannot support: pNN needs at least 100/(100-NN)."""
    return [f"p{q}" for q in PERCENTILES if n < math.ceil(100 / (100 - q))]


@dataclass(frozen=True, slots=True)
class _Columns:
    """The per-record and per-token arrays every stage's row is cut from, extracted once per run."""

    stage_index: np.ndarray
    start_unix_s: np.ndarray
    end_unix_s: np.ndarray  # in flight until then
    ok: np.ndarray
    category: np.ndarray
    output_tokens: np.ndarray
    prompt_tokens: np.ndarray
    latency_ms: Mapping[str, np.ndarray]  # ttft, tpot, e2e
    send_lag_ms: np.ndarray
    from_intended_ms: Mapping[str, np.ndarray]  # ttft_from_intended, e2e_from_intended
    chunks: RequestChunks  # the whole run's: ITL values and chunk arrivals are read from it
    rows: np.ndarray | None  # these records' rows in the run (None: all of them, in order)
    itl_counts: np.ndarray  # ITL values of each record
    user_id: np.ndarray  # object: "<worker>/<n>", or None (open loop, or runs before user ids were recorded)
    stall_ms: np.ndarray  # the worst load-generator stall during each request (NaN: not recorded)
    flight_t: np.ndarray  # sorted start and end times of every request ...
    flight_n: np.ndarray  # ... and the requests in flight just after each of them
    # a class's rate quota inside a users stage: requests sent on a schedule beside the users (see _quota)
    quota: np.ndarray
    users_flight_t: np.ndarray  # as flight_t/flight_n, less the quota requests
    users_flight_n: np.ndarray

    def subset(self, keep: np.ndarray) -> "_Columns":
        """The same arrays for the records ``keep`` marks only."""
        start, end = self.start_unix_s[keep], self.end_unix_s[keep]
        rows = np.flatnonzero(keep) if self.rows is None else self.rows[keep]
        return _Columns(
            stage_index=self.stage_index[keep], start_unix_s=start, end_unix_s=end, ok=self.ok[keep],
            category=self.category[keep], output_tokens=self.output_tokens[keep],
            prompt_tokens=self.prompt_tokens[keep],
            latency_ms={m: v[keep] for m, v in self.latency_ms.items()}, send_lag_ms=self.send_lag_ms[keep],
            from_intended_ms={c: v[keep] for c, v in self.from_intended_ms.items()},
            chunks=self.chunks, rows=rows, itl_counts=self.itl_counts[keep], user_id=self.user_id[keep],
            stall_ms=self.stall_ms[keep], **_all_flight_steps(start, end, self.quota[keep]),
        )

    def run_mask(self, mask: np.ndarray) -> np.ndarray:
        """``mask`` over these records as a mask over the whole run's (what :attr:`chunks` takes)."""
        if self.rows is None:
            return mask
        out = np.zeros(len(self.chunks), dtype=bool)
        out[self.rows[mask]] = True
        return out

    def itl_ms(self, mask: np.ndarray) -> np.ndarray:
        """The per-token ITL values (ms, float32) of the records ``mask`` marks: a new array."""
        return self.chunks.itl_ms(self.run_mask(mask))

    @classmethod
    def of(cls, run: Any) -> "_Columns":
        frame: pd.DataFrame = run.frame
        n = len(frame)
        ok = frame["ok"].to_numpy(dtype=bool) if n else np.empty(0, dtype=bool)
        stage_index = frame["stage_index"].to_numpy(dtype=float, na_value=np.nan) if n else np.empty(0)
        start = frame["wall_start_unix_s"].to_numpy(dtype=float) if n else np.empty(0)
        end = frame["in_flight_end_unix_s"].to_numpy(dtype=float) if n else np.empty(0)
        quota = _quota(run.stages, stage_index, _num(frame, "send_lag_ms"))
        chunks = getattr(run, "chunks", None)
        if chunks is None and not n:
            chunks = RequestChunks.empty()
        if chunks is None or len(chunks) != n:
            raise ValueError("run.chunks must describe the frame's records, one per row")
        return cls(
            stage_index=stage_index,
            start_unix_s=start,
            end_unix_s=end,
            ok=ok,
            category=frame["error_category"].to_numpy(dtype=object) if n else np.empty(0, dtype=object),
            output_tokens=_num(frame, "output_tokens"),
            prompt_tokens=_num(frame, "prompt_tokens"),
            latency_ms={m: _num(frame, f"{m}_ms") for m in ("ttft", "tpot", "e2e")},
            send_lag_ms=_num(frame, "send_lag_ms"),
            from_intended_ms={c: _num(frame, f"{c}_ms") for c in ("ttft_from_intended", "e2e_from_intended")},
            chunks=chunks,
            rows=None,
            itl_counts=chunks.itl_counts,
            user_id=(frame["user_id"].to_numpy(dtype=object) if n and "user_id" in frame.columns
                     else np.full(n, None, dtype=object)),
            stall_ms=_num(frame, "client_stall_max_ms"),
            **_all_flight_steps(start, end, quota),
        )


def _quota(stages: Sequence[StageRecord], stage_index: np.ndarray, send_lag_ms: np.ndarray) -> np.ndarray:
    """Requests of a users stage that were sent on a schedule (an intended send time): a class's rate quota
    beside the users. They are in flight on top of the users, so the in-flight rules leave them out."""
    closed = [s.stage_index for s in stages if not s.open_loop]
    return ~np.isnan(send_lag_ms) & np.isin(stage_index, closed)


def _all_flight_steps(starts: np.ndarray, ends: np.ndarray, quota: np.ndarray) -> dict[str, np.ndarray]:
    """Every request in flight, and the same less the quota requests (the same arrays when there are none)."""
    steps = _flight_steps(starts, ends)
    users = _flight_steps(starts[~quota], ends[~quota]) if quota.any() else steps
    return {**steps, "quota": quota, "users_flight_t": users["flight_t"], "users_flight_n": users["flight_n"]}


def _flight_steps(starts: np.ndarray, ends: np.ndarray) -> dict[str, np.ndarray]:
    """Requests in flight as a step function: sorted event times and the count just after each."""
    if not len(starts):
        return {"flight_t": np.empty(0), "flight_n": np.empty(0, dtype=np.int64)}
    t = np.concatenate([starts, ends])
    step = np.concatenate([np.ones(len(starts), dtype=np.int64), -np.ones(len(ends), dtype=np.int64)])
    order = np.lexsort((step, t))  # at one instant an end counts before a start
    return {"flight_t": t[order], "flight_n": np.cumsum(step[order])}


@dataclass(frozen=True, slots=True)
class _Selection:
    """Which records of the run a stage's row counts (boolean masks over the records)."""

    mine: np.ndarray  # the stage's records
    in_window: np.ndarray  # ... that started inside the window
    cancelled: np.ndarray  # ... stopped by the load generator itself: neither success nor error
    counted: np.ndarray  # in the window and not cancelled
    ok: np.ndarray  # in the window and successful: the latency population
    departing: np.ndarray  # the stage's requests from users being stopped (left out of all the above)


def envelope_table(run: Any, *, rule: WindowRule = WindowRule()) -> list[TableRow]:
    """One :class:`~analysis.rows.TableRow` per stage of ``run``, in stage order.

    ``run`` is an :class:`analysis.load.Run` (anything with the same attributes).
    """
    cols = _Columns.of(run)
    departing = _departing_requests(run.stages, cols)
    run_start = run_start_unix_s(run)
    endings = worker_endings(run, zero_unix_s=run_start)
    telemetry = getattr(run, "telemetry", {}) or {}
    return [_stage_row(plan, cols, telemetry, run_start=run_start, endings=endings, departing=departing)
            for plan in _plans(run, cols, rule)]


def client_table(run: Any, *, rule: WindowRule = WindowRule(),
                 rows: Sequence[TableRow] | None = None) -> list[ClientRow]:
    """One :class:`~analysis.rows.ClientRow` per (stage, client class), in stage then class order.

    Empty unless the run's records name more than one client class; then every stage gets a row per
    class that sent in it (a stage with one class too, so that a class measured alone can be set against
    the same class measured beside others). Each row is cut as :func:`envelope_table` cuts the stage's
    (the same window, the same rules) from that class's records only, and judged against the class's
    SLOs (``StageRecord.client_slos``, else the stage's). ``rows``: the stage rows already computed with
    the same ``rule`` (their trust and over-capacity verdicts are the classes'; computed when omitted).
    """
    frame = run.frame
    if not len(frame) or "client" not in frame.columns:
        return []
    client = frame["client"].to_numpy(dtype=object)
    named = np.array([isinstance(c, str) and c != "" for c in client], dtype=bool)
    if len(set(client[named])) < 2:
        return []
    cols = _Columns.of(run)
    departing = _departing_requests(run.stages, cols)
    run_start = run_start_unix_s(run)
    telemetry = getattr(run, "telemetry", {}) or {}
    plans = _plans(run, cols, rule)
    if rows is None:
        endings = worker_endings(run, zero_unix_s=run_start)
        rows = [_stage_row(plan, cols, telemetry, run_start=run_start, endings=endings, departing=departing)
                for plan in plans]
    by_stage = {r.stage_index: r for r in rows}
    # each class's records, and the arrays cut down to them, once for every stage
    classes = {name: named & (client == name) for name in sorted(set(client[named]))}
    subsets = {name: cols.subset(keep) for name, keep in classes.items()}
    out: list[ClientRow] = []
    for plan in plans:
        stage = plan.stage
        stage_row = by_stage.get(stage.stage_index)
        mine = (cols.stage_index == stage.stage_index) & named & ~departing
        present = tuple(sorted(set(client[mine])))
        for name in present:
            keep = classes[name]
            slos = dict((stage.client_slos or {}).get(name, stage.slos))
            trust = stage_row.trust if stage_row is not None else Trust()
            row, _ = _window_row(plan, subsets[name], telemetry, run_start=run_start,
                                 departing=departing[keep], slos=slos, trust=trust, client_ttft=False)
            if stage_row is not None:
                row = row.replace(over_capacity=stage_row.goodput.over_capacity,
                                  over_capacity_note=stage_row.goodput.over_capacity_note)
            results = tuple(evaluate_slos(row, slos))
            users = {u for u in cols.user_id[mine & keep] if isinstance(u, str)}
            out.append(ClientRow(client=str(name), client_users=len(users) or None, stage_clients=present,
                                 slos=slos, row=row.replace(slo_results=results, slo_pass=_overall(results))))
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowSample:
    """The records one stage's row counts, as boolean masks over ``run.frame``'s rows.

    ``counted``: the stage's requests that started in its steady-state window, less cancelled ones and
    those of departing users (the population of ``requests``); ``ok``: those that succeeded (the
    population of the latency percentiles).
    """

    stage: StageRecord
    counted: np.ndarray
    ok: np.ndarray


def window_samples(run: Any, *, rule: WindowRule = WindowRule()) -> list[WindowSample]:
    """Per stage of ``run``, in stage order, the records :func:`envelope_table` counts in its row."""
    cols = _Columns.of(run)
    departing = _departing_requests(run.stages, cols)
    out = []
    for plan in _plans(run, cols, rule):
        sel = _plan_select(plan, cols, departing)
        out.append(WindowSample(stage=plan.stage, counted=sel.counted, ok=sel.ok))
    return out


@dataclass(frozen=True, slots=True)
class _StagePlan:
    """How one stage's row is cut: its window rule and window, whether it is a search probe, and whether
    the server had stopped by then."""

    stage: StageRecord
    rule: WindowRule
    probe: bool
    server_stopped: bool
    window_start_unix_s: float
    window_end_unix_s: float
    note: str
    settled_unix_s: float | None


def _plans(run: Any, cols: _Columns, rule: WindowRule) -> list[_StagePlan]:
    stop = run_server_stop(run) if len(run.frame) else None
    stopped_in = set(stop.affected_stage_indices) if stop is not None else set()
    probes = {entry.pass_name: _probe_rule(entry, rule) for entry in getattr(run, "searches", None) or ()}
    plans = []
    for stage in run.stages:
        probe = stage.pass_name in probes
        stage_rule = _ramped(probes[stage.pass_name], stage) if probe else rule
        ws, we, note, settled = _stage_window(stage, cols, stage_rule)
        # a stage the server died in (or after) measured the outage, not the envelope
        plans.append(_StagePlan(stage=stage, rule=stage_rule, probe=probe,
                                server_stopped=stage.stage_index in stopped_in, window_start_unix_s=ws,
                                window_end_unix_s=we, note=note, settled_unix_s=settled))
    return plans


def _probe_rule(entry: Any, rule: WindowRule) -> WindowRule:
    """A search probe's window opens after the search's own ``settle_s`` (the time its live judge skipped)."""
    settle = entry.spec.get("settle_s")
    probe_s = entry.spec.get("probe_s")
    if settle is None and probe_s:
        settle = float(probe_s) / 4.0
    return rule if settle is None else WindowRule(settle_s=float(settle), min_window_s=rule.min_window_s)


def _ramped(rule: WindowRule, stage: StageRecord) -> WindowRule:
    """``rule`` with the stage's ramp counted inside its settle time, as the search counts it."""
    ramp = float(stage.target_users) / float(stage.spawn_rate) if stage.target_users and stage.spawn_rate else 0.0
    return WindowRule(settle_s=max(rule.settle_s - ramp, 0.0), min_window_s=min(rule.min_window_s, 2.0))


def _stage_window(stage: StageRecord, cols: _Columns, rule: WindowRule) -> tuple[float, float, str, float | None]:
    """``(start, end, note, settled)``: the steady window, opened later after a step down in users."""
    ws, we, note = steady_window(stage, rule=rule)
    settled = _settled_at(stage, cols) if not stage.derived else None
    if settled is not None and settled > ws:
        if we - settled >= rule.min_window_s:
            # a step down in users: the window waits until the departing users' requests have drained
            ws = settled
            note = "; ".join(filter(None, [note, f"opened when in flight fell to {stage.target_users}"]))
        else:  # too late to leave a window: keep the usual one, which the in-flight rule then flags
            note = "; ".join(filter(None, [note, f"in flight fell to {stage.target_users} only "
                                                 f"{max(we - settled, 0.0):.1f} s before the end"]))
            settled = None
    return ws, we, note, settled


def _stage_row(plan: _StagePlan, cols: _Columns, telemetry: Mapping[str, pd.DataFrame], *,
               run_start: float, endings: Sequence[Any], departing: np.ndarray) -> TableRow:
    stage = plan.stage
    ws, we = plan.window_start_unix_s, plan.window_end_unix_s
    host_cpu, saturated = _host_cells(telemetry, ws, we)
    trust = Trust(host_cpu_max_core_ratio=host_cpu, client_saturated=saturated, server_stopped=plan.server_stopped,
                  client_loop_lag_max_ms=stage.client_loop_lag_max_ms,
                  client_cpu_max_percent=stage.client_cpu_max_percent,
                  client_over_budget=over_budget_reason(
                      kind=str(stage.kind), target_users=stage.target_users, target_rate_per_s=stage.target_rate_per_s,
                      processes=stage.client_processes, streams_budget=stage.client_budget_streams_per_process,
                      rate_budget_per_s=stage.client_budget_rate_per_s_per_process),
                  load_generators_ended=tuple(stage_endings(endings, stage)))
    row, sel = _window_row(plan, cols, telemetry, run_start=run_start, departing=departing, slos=stage.slos,
                           trust=trust)
    if stage.open_loop:
        row = dataclasses.replace(row, goodput=dataclasses.replace(row.goodput, **_saturation(stage, cols, sel, ws, we)))
    reasons = trust_reasons(row)
    row = row.replace(trustworthy=not reasons, untrustworthy_reasons="; ".join(reasons))
    results = tuple(evaluate_slos(row, stage.slos))
    return row.replace(slo_results=results, slo_pass=_overall(results))


def _window_row(plan: _StagePlan, cols: _Columns, telemetry: Mapping[str, pd.DataFrame], *, run_start: float,
                departing: np.ndarray, slos: Mapping[str, Any], trust: Trust,
                client_ttft: bool = True) -> tuple[TableRow, _Selection]:
    """The row's cells from ``cols`` over the plan's window, SLO verdicts apart; and the selection.

    ``client_ttft``: set the client's mean TTFT against the server's (False for a part of the requests:
    the server's histograms hold them all).
    """
    stage = plan.stage
    ws, we = plan.window_start_unix_s, plan.window_end_unix_s
    sel = _plan_select(plan, cols, departing)
    window = _window(stage, cols, ws, we, plan.note, run_start)
    itl = cols.itl_ms(sel.ok)
    coalesced = float(itl.size - np.count_nonzero(itl)) / itl.size if itl.size else None
    latency = _latency(cols, sel, itl)  # reorders itl
    del itl  # tens of millions of values: gone before the next large array
    settled = plan.settled_unix_s
    row = TableRow(
        window=window,
        counts=_counts(cols, sel),
        latency=latency,
        throughput=_throughput(cols, ws, we, window.mean_in_flight),
        open_loop=_open_loop(stage, cols, sel),
        server=_server_telemetry(telemetry, ws, we),
        server_latency=_server_latency(telemetry, ws, we, latency.ttft_mean_ms if client_ttft else float("nan")),
        integrity=_integrity(cols, sel, latency, coalesced_chunk_share=coalesced,
                             settled_at_s=None if settled is None else settled - run_start),
        trust=trust,
    )
    goodput = _goodput(stage, slos, cols, sel, row.throughput.aggregate_output_tokens_per_s)
    return dataclasses.replace(row, goodput=goodput), sel


def _plan_select(plan: _StagePlan, cols: _Columns, departing: np.ndarray) -> _Selection:
    stage = plan.stage
    # a search probe is short and the next one runs at another level: a request that ran past the probe's end
    # measured that level too, so a probe counts only the requests that ended inside it (as its live judge did)
    return _select(stage, cols, plan.window_start_unix_s, plan.window_end_unix_s, departing,
                   ended_by=float(stage.end_unix_s) if plan.probe and stage.end_unix_s is not None else None)


def _select(stage: StageRecord, cols: _Columns, ws: float, we: float, departing: np.ndarray, *,
            ended_by: float | None = None) -> _Selection:
    """Latency, counts and errors: the stage's requests that *started* inside the window, less those of
    departing users (and, with ``ended_by``, less those still in flight then)."""
    mine = cols.stage_index == stage.stage_index
    leaving = mine & departing
    in_window = mine & ~leaving & (cols.start_unix_s >= ws) & (cols.start_unix_s < we)
    if ended_by is not None:  # a search probe: what its live judge judged (see envelope.search.probe_sample)
        mine_in = np.flatnonzero(in_window)
        chosen = probe_sample(cols.start_unix_s[mine_in], cols.end_unix_s[mine_in], opens_unix_s=ws,
                              closes_unix_s=ended_by)
        in_window = np.zeros_like(in_window)
        in_window[mine_in[chosen]] = True
    # Requests the load generator itself stopped (run ended or interrupted) are neither
    # successes nor server errors: they are counted apart and left out of the error rate.
    cancelled = in_window & (cols.category == ErrorCategory.CANCELLED)
    return _Selection(mine=mine, in_window=in_window, cancelled=cancelled, counted=in_window & ~cancelled,
                      ok=in_window & cols.ok, departing=leaving)


def _departing_requests(stages: Sequence[StageRecord], cols: _Columns) -> np.ndarray:
    """Requests sent in a stage by the users Locust is stopping on a step down in users.

    Locust stops surplus users after the stage has begun; each finishes its current request and may
    send one more, already with the new stage's workload. On a step down from P to T users, of the U
    users that sent in the stage, the min(P - T, U - T) that send nothing in a later stage and whose
    last request in it started earliest are the departing ones. Records without user ids (older runs) name none.
    """
    out = np.zeros(len(cols.ok), dtype=bool)
    known = ~pd.isna(cols.user_id)
    if not known.any():
        return out
    ordered = sorted((s for s in stages if not s.derived), key=lambda s: s.start_unix_s)
    for i, stage in enumerate(ordered[1:], 1):
        previous = ordered[i - 1]
        if stage.open_loop or previous.open_loop or not stage.target_users or not previous.target_users:
            continue
        leaving = previous.target_users - stage.target_users
        if leaving <= 0:
            continue
        mine = (cols.stage_index == stage.stage_index) & known
        later = {s.stage_index for s in ordered[i + 1:]}
        stays = set(cols.user_id[np.isin(cols.stage_index, list(later))]) if later else set()
        last_start: dict[str, float] = {}
        for user, t in zip(cols.user_id[mine], cols.start_unix_s[mine]):
            if user not in stays:
                last_start[user] = max(t, last_start.get(user, -math.inf))
        # the stage's own users keep sending to its end: at most (users seen - target) of them left, whatever
        # the step (a departing user may have been stopped before it sent anything in this stage)
        users_seen = len(set(cols.user_id[mine]))
        gone = sorted(last_start, key=last_start.get)[:max(0, min(leaving, users_seen - stage.target_users))]
        out |= mine & np.isin(cols.user_id, gone)
    return out


def _settled_at(stage: StageRecord, cols: _Columns) -> float | None:
    """Closed loop: the first time from the stage's start at which requests in flight were at most its
    target users (its start when they already were); None for open loop or when they never fell."""
    flight_t, flight_n = cols.users_flight_t, cols.users_flight_n  # a rate quota's requests are not users'
    if stage.open_loop or not stage.target_users or not len(flight_t):
        return None
    start = float(stage.start_unix_s)
    i = int(np.searchsorted(flight_t, start, side="right"))
    before = int(flight_n[i - 1]) if i > 0 else 0
    if before <= stage.target_users:
        return start
    after = np.flatnonzero(flight_n[i:] <= stage.target_users)
    if not after.size or flight_t[i + after[0]] > float(stage.end_unix_s):
        return None
    return float(flight_t[i + after[0]])


def _integrity(cols: _Columns, sel: _Selection, latency: LatencyPercentiles, *, coalesced_chunk_share: float | None,
               settled_at_s: float | None) -> WindowIntegrity:
    """Departing users' requests, and the window's requests touched by a load-generator stall
    (``coalesced_chunk_share``: the share of the window's ITL values that are 0)."""
    departing = int(sel.departing.sum())
    coalesced = coalesced_chunk_share
    stall = cols.stall_ms[sel.counted]
    if not stall.size or np.isnan(stall).all():
        return WindowIntegrity(departing_user_requests=departing, settled_at_s=settled_at_s,
                               coalesced_chunk_share=coalesced)
    stalled = np.nan_to_num(cols.stall_ms, nan=0.0) > CLIENT_LOOP_LAG_LIMIT_MS
    clean = sel.ok & ~stalled
    cells = {}
    for metric, q in (("ttft", 95), ("ttft", 99), ("e2e", 95)):
        values = cols.latency_ms[metric][clean]
        values = values[~np.isnan(values)]
        cells[f"{metric}_p{q}_unstalled_ms"] = float(np.percentile(values, q)) if values.size else None
    n_stalled = int((sel.counted & stalled).sum())
    return WindowIntegrity(departing_user_requests=departing, settled_at_s=settled_at_s,
                           stalled_requests=n_stalled, stalled_share=n_stalled / int(sel.counted.sum()),
                           stall_max_ms=float(np.nanmax(stall)), coalesced_chunk_share=coalesced, **cells)


def _window(stage: StageRecord, cols: _Columns, ws: float, we: float, note: str, run_start: float) -> StageWindow:
    window_s = max(we - ws, 0.0)
    # time-weighted requests of any stage in flight during the window
    overlap = np.clip(np.minimum(cols.end_unix_s, we) - np.maximum(cols.start_unix_s, ws), 0.0, None)
    return StageWindow(
        pass_name=stage.pass_name, stage_name=stage.stage_name, stage_index=stage.stage_index, kind=str(stage.kind),
        target_users=stage.target_users, target_rate_per_s=stage.target_rate_per_s,
        mean_in_flight=float(overlap.sum() / window_s) if window_s > 0 else float("nan"),
        quota_mean_in_flight=(float(overlap[cols.quota].sum() / window_s) if window_s > 0 else float("nan"))
        if cols.quota.any() else None,
        window_start_s=ws - run_start, window_end_s=we - run_start, window_s=window_s, window_note=note,
    )


def _counts(cols: _Columns, sel: _Selection) -> RequestCounts:
    requests = int(sel.counted.sum())
    failed = sel.counted & ~cols.ok
    errors = int(failed.sum())
    cats = Counter(str(c) for c in cols.category[failed])
    ok_requests = int(sel.ok.sum())
    return RequestCounts(
        requests=requests,
        ok_requests=ok_requests,
        errors=errors,
        error_rate=(errors / requests) if requests else float("nan"),
        errors_by_category=", ".join(f"{k}:{v}" for k, v in sorted(cats.items(), key=lambda kv: (-kv[1], kv[0]))),
        cancelled=int(sel.cancelled.sum()),
        itl_samples=int(cols.itl_counts[sel.ok].sum()),
        few_samples=",".join(few_sample_percentiles(ok_requests)),
        prompt_tokens_p50=_median(cols.prompt_tokens[sel.ok]),
        output_tokens_p50=_median(cols.output_tokens[sel.ok]),
        stage_records=int(sel.mine.sum()),
        stage_output_tokens=int(np.nansum(cols.output_tokens[sel.mine])),
    )


def _latency(cols: _Columns, sel: _Selection, itl_ms: np.ndarray) -> LatencyPercentiles:
    """The window's latency percentiles; ``itl_ms``: its ITL values (a scratch array: reordered here)."""
    cells: dict[str, float] = {}
    for m, values in cols.latency_ms.items():
        cells.update(_percentile_cells(m, values[sel.ok], mean=m in ("ttft", "e2e")))
    cells.update(_percentile_cells("itl", itl_ms, overwrite_input=True))
    return LatencyPercentiles(**cells)


def _goodput(stage: StageRecord, slos: Mapping[str, Any], cols: _Columns, sel: _Selection,
             output_tokens_per_s: float) -> Goodput:
    """Attainment of the per-request thresholds of ``slos`` over the window's requests, and goodput.

    Goodput is the window's output rate (tokens of chunks that arrived in it, as in the throughput
    column) times the share of the judged successful requests' output tokens that good requests
    produced, and that in requests at the good requests' mean length: so with every request good,
    goodput equals throughput exactly, rather than a second, noisier count of the same window.
    """
    thresholds = thresholds_from_slos(slos)
    if not thresholds.any:
        return Goodput()
    ttft, e2e = cols.latency_ms["ttft"], cols.latency_ms["e2e"]
    if stage.open_loop:  # judged from when the request was meant to go (its user was waiting from then)
        intended_ttft, intended_e2e = cols.from_intended_ms["ttft_from_intended"], cols.from_intended_ms["e2e_from_intended"]
        ttft = np.where(np.isnan(intended_ttft), ttft, intended_ttft)
        e2e = np.where(np.isnan(intended_e2e), e2e, intended_e2e)
    good = sel.counted & good_mask(cols.ok, ttft, cols.latency_ms["tpot"], e2e, thresholds)
    judged, n_good = int(sel.counted.sum()), int(good.sum())
    share = Attainment.of(n_good, judged)
    good_tokens = float(np.nansum(cols.output_tokens[good]))
    ok_tokens = float(np.nansum(cols.output_tokens[sel.counted & cols.ok]))
    if ok_tokens > 0 and math.isfinite(output_tokens_per_s):
        tokens_per_s = output_tokens_per_s * good_tokens / ok_tokens
        requests_per_s = tokens_per_s / (good_tokens / n_good) if n_good else 0.0
    else:
        tokens_per_s = requests_per_s = 0.0 if judged else float("nan")
    return Goodput(
        good_requests=n_good,
        attainment=share.share if judged else None,
        attainment_low=share.low if judged else None,
        attainment_high=share.high if judged else None,
        attainment_target=attainment_target(slos),
        goodput_requests_per_s=requests_per_s,
        goodput_output_tokens_per_s=tokens_per_s,
    )


def _saturation(stage: StageRecord, cols: _Columns, sel: _Selection, ws: float, we: float) -> dict[str, Any]:
    """Open loop: whether in flight and TTFT kept rising through the window (:mod:`analysis.saturation`)."""
    if we - ws < 3.0 or not len(cols.flight_t):
        return {}
    t = np.arange(ws + 0.5, we, 1.0)
    i = np.searchsorted(cols.flight_t, t, side="right")
    in_flight = np.where(i > 0, cols.flight_n[np.maximum(i - 1, 0)], 0)
    ttft = cols.from_intended_ms["ttft_from_intended"][sel.ok]
    found = over_capacity(t - ws, in_flight, cols.start_unix_s[sel.ok] - ws, ttft,
                          rate_per_s=stage.target_rate_per_s)
    return {"over_capacity": found.over_capacity, "over_capacity_note": found.reason}


def _throughput(cols: _Columns, ws: float, we: float, mean_in_flight: float) -> Throughput:
    """Tokens of successful requests whose chunks *arrived* inside the window, per second of it."""
    window_s = max(we - ws, 0.0)
    tokens = cols.chunks.tokens_between(ws, we, cols.run_mask(cols.ok))
    agg = tokens / window_s if window_s > 0 else float("nan")
    return Throughput(aggregate_output_tokens_per_s=agg,
                      per_user_output_tokens_per_s=(agg / mean_in_flight) if mean_in_flight > 0 else float("nan"))


def _open_loop(stage: StageRecord, cols: _Columns, sel: _Selection) -> OpenLoopCells:
    """Open-loop (rate) stages: what was sent against what was asked, and how late.

    The achieved rate counts the stage's requests actually sent between its start
    and end (a send that slipped past the end does not count); send lag is over
    every request of the stage; latencies from the intended send time are over
    the steady-state window's successes, like the other latencies.
    """
    if not stage.open_loop or not len(cols.ok):
        return OpenLoopCells()
    cells: dict[str, Any] = {"max_concurrency": stage.max_concurrency}
    t0, t1 = float(stage.start_unix_s), float(stage.end_unix_s)
    if t1 > t0:
        cells["achieved_rate_per_s"] = metrics.achieved_send_rate_per_s(cols.start_unix_s[sel.mine], t0, t1)
    lag = cols.send_lag_ms[sel.mine]
    lag = lag[~np.isnan(lag)]
    if lag.size:
        cells["send_lag_p50_ms"], cells["send_lag_p99_ms"] = (float(v) for v in np.percentile(lag, [50, 99]))
    for column, qs in (("ttft_from_intended", (50, 95)), ("e2e_from_intended", (95,))):
        values = cols.from_intended_ms[column][sel.ok]
        values = values[~np.isnan(values)]
        if values.size:
            for q, v in zip(qs, np.percentile(values, qs)):
                cells[f"{column}_p{q}_ms"] = float(v)
    return OpenLoopCells(**cells)


def trust_reasons(row: TableRow) -> list[str]:
    """Why a stage's numbers may describe the load generator rather than the server (empty: none)."""
    reasons = []
    target, achieved = row.window.target_rate_per_s, row.open_loop.achieved_rate_per_s
    if row.window.kind == "rate" and target and achieved is not None and achieved < target * (1 - RATE_SHORTFALL_LIMIT):
        reasons.append(f"sent {achieved:.3g} requests/s of the {target:.3g}/s asked "
                       f"({(1 - achieved / target) * 100:.0f}% short)")
    lag = row.open_loop.send_lag_p99_ms
    if row.window.kind == "rate" and row.open_loop.max_concurrency is None and lag is not None \
            and lag > CLIENT_LOOP_LAG_LIMIT_MS:
        reasons.append(f"sent late: send lag p99 {lag:.0f} ms, over the {CLIENT_LOOP_LAG_LIMIT_MS:.0f} ms a schedule "
                       "allows (the load generator could not keep up with it)")
    trust = row.trust
    cpu = trust.client_cpu_max_percent
    if trust.client_saturated or (cpu is not None and cpu >= CLIENT_CPU_LIMIT_PERCENT):
        reasons.append("load generator CPU-saturated" + (f" ({cpu:.0f}% of a core)" if cpu is not None else ""))
    if trust.client_over_budget:
        reasons.append(trust.client_over_budget)
    integrity = row.integrity
    if integrity.stalled_share is not None:  # the records say which requests a stall touched
        if stalls_matter(row):
            with_, without = row.latency.ttft_p95_ms, integrity.ttft_p95_unstalled_ms
            reasons.append(
                f"load generator stalled over {CLIENT_LOOP_LAG_LIMIT_MS:.0f} ms during {integrity.stalled_requests} "
                f"of {row.counts.requests} requests ({100 * integrity.stalled_share:.0f}%, up to "
                f"{integrity.stall_max_ms:.0f} ms): p95 TTFT {_ms_text(with_)} with them, {_ms_text(without)} without")
    else:  # older records: only the stage's worst stall is known
        lag = trust.client_loop_lag_max_ms
        if lag is not None and lag > CLIENT_LOOP_LAG_LIMIT_MS:
            reasons.append(f"load generator stalled up to {lag:.0f} ms "
                           "(latencies measured meanwhile are late by up to that)")
    target, in_flight, quota = row.window.target_users, row.window.mean_in_flight, row.window.quota_mean_in_flight
    besides = ""
    if quota:  # a class's rate quota sent beside the users: in flight on top of them
        in_flight -= quota
        besides = f" besides {quota:.2f} of rate quotas"
    if row.window.kind == "users" and target and in_flight > target + IN_FLIGHT_SLACK:
        reasons.append(f"mean in flight {in_flight:.2f}{besides} exceeds the {target} users asked "
                       "(requests of another stage's users were still running)")
    reasons += [ending_reason(item) for item in trust.load_generators_ended]
    return reasons


def stalls_matter(row: TableRow) -> bool:
    """Whether the requests a load-generator stall touched can move the stage's reported percentiles.

    True when they are more than 5% of the window's requests (they can set p95), more than 1% where p99
    has the samples to be reported, or when leaving them out moves p95/p99 TTFT or p95 E2E by over 10%.
    """
    integrity = row.integrity
    share = integrity.stalled_share
    if not share:
        return False
    if share > STALLED_SHARE_P95 or (share > STALLED_SHARE_P99 and "p99" not in row.counts.few_samples.split(",")):
        return True
    for with_, without in ((row.latency.ttft_p95_ms, integrity.ttft_p95_unstalled_ms),
                           (row.latency.ttft_p99_ms, integrity.ttft_p99_unstalled_ms),
                           (row.latency.e2e_p95_ms, integrity.e2e_p95_unstalled_ms)):
        if without and math.isfinite(with_) and abs(with_ - without) > STALL_SHIFT_LIMIT * without:
            return True
    return False


def _ms_text(ms: float | None) -> str:
    return "-" if ms is None or not math.isfinite(ms) else f"{ms:.0f} ms"


def evaluate_slos(row: TableRow, slos: Mapping[str, Any]) -> list[SloResult]:
    """Check each SLO of a stage against a table row.

    ``passed`` is False when there is nothing to measure (no successful
    requests), and None for a key this version does not know.
    """
    results = []
    for key, threshold in slos.items():
        if threshold is None or key in PER_REQUEST_KEYS:
            continue
        threshold = float(threshold)
        note = ""
        if key == "error_rate_max":
            measured = row.counts.error_rate
            op = "<="
        elif key == "min_output_tokens_per_s":
            measured = row.throughput.aggregate_output_tokens_per_s
            op = ">="
        elif row.has(key) and key.endswith("_ms"):
            measured = row.value(key)
            op = "<="
            pct = key.rsplit("_", 2)[-2]
            if pct in row.counts.few_samples.split(","):
                note = f"{pct} from {row.counts.ok_requests} samples"
        else:
            results.append(SloResult(key=key, threshold=threshold, measured=None, passed=None, op="?",
                                     note="unknown SLO key; not checked"))
            continue
        if measured is None or (isinstance(measured, float) and math.isnan(measured)):
            results.append(SloResult(key=key, threshold=threshold, measured=None, passed=False, op=op, note="no data"))
            continue
        passed = measured <= threshold if op == "<=" else measured >= threshold
        results.append(SloResult(key=key, threshold=threshold, measured=float(measured), passed=bool(passed), op=op,
                                 note=note))
    attained = _attainment_result(row, slos)
    return results + ([attained] if attained is not None else [])


def _attainment_result(row: TableRow, slos: Mapping[str, Any]) -> SloResult | None:
    """The share of good requests against its target (0.95 unless ``attainment_min`` says otherwise)."""
    g = row.goodput
    if g.attainment_target is None:  # not judged: no per-request thresholds (or a row built by hand)
        return None
    target = attainment_target(slos)
    if g.attainment is None:
        return SloResult(key="attainment_min", threshold=target, measured=None, passed=False, op=">=",
                         note="no data")
    note = f"95% CI {100 * g.attainment_low:.1f}-{100 * g.attainment_high:.1f}%"
    if g.attainment_low < target <= g.attainment_high:
        note += ", not resolved at 95% confidence"
    return SloResult(key="attainment_min", threshold=target, measured=float(g.attainment),
                     passed=bool(g.attainment >= target), op=">=", note=note)


def table_totals(run: Any) -> dict[str, Any]:
    """Totals over every record (not only the windows), for cross-checks."""
    frame = run.frame
    return {
        "records": int(len(frame)),
        "ok_records": int(frame["ok"].sum()) if len(frame) else 0,
        "output_tokens": int(np.nansum(_num(frame, "output_tokens"))),
        "attributed_output_tokens": run.chunks.attributed_total(),
    }


def write_table_csv(rows: Iterable[TableRow], sink: IO[str]) -> None:
    """Write the table as CSV to a text sink (SLO results flattened to one cell)."""
    writer = csv.writer(sink, lineterminator="\n")
    writer.writerow(TABLE_COLUMNS)
    for row in rows:
        writer.writerow([_csv_cell(c, row.value(c)) for c in TABLE_COLUMNS])


MARKDOWN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("pass_name", "pass"), ("stage_name", "stage"), ("target_users", "users"),
    ("mean_in_flight", "in flight"), ("window_s", "window s"), ("requests", "requests"),
    ("error_rate", "error rate"), ("aggregate_output_tokens_per_s", "out tok/s"),
    ("per_user_output_tokens_per_s", "out tok/s per request"),
    ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p95_ms", "TTFT p95 ms"), ("ttft_p99_ms", "TTFT p99 ms"),
    ("tpot_p50_ms", "TPOT p50 ms"), ("itl_p95_ms", "ITL p95 ms"),
    ("e2e_p50_ms", "E2E p50 ms"), ("e2e_p95_ms", "E2E p95 ms"),
    ("server_prefix_cache_hit_ratio", "prefix cache hits"),
    ("ok_requests", "n"), ("few_samples", "few-sample tails"), ("slo_pass", "SLOs"),
    ("achieved_rate_per_s", "req/s sent"), ("send_lag_p99_ms", "send lag p99 ms"),
    ("trustworthy", "load generator"),
)


# columns of MARKDOWN_COLUMNS left out when no row has a value (a server without the metric)
OPTIONAL_MARKDOWN_COLUMNS = frozenset({"server_prefix_cache_hit_ratio"})


def markdown_columns(rows: Sequence[TableRow]) -> tuple[tuple[str, str], ...]:
    """:data:`MARKDOWN_COLUMNS` less the optional ones no row has a value for."""
    return tuple((c, h) for c, h in MARKDOWN_COLUMNS
                 if c not in OPTIONAL_MARKDOWN_COLUMNS or any(row.value(c) is not None for row in rows))


def write_table_markdown(rows: Iterable[TableRow], sink: IO[str]) -> None:
    """Write the main columns of the table as a Markdown table to a text sink."""
    rows = list(rows)
    columns = markdown_columns(rows)
    sink.write("| " + " | ".join(h for _, h in columns) + " |\n")
    sink.write("|" + "|".join("---" for _ in columns) + "|\n")
    for row in rows:
        cells = [row_cell(row, c).replace("|", "\\|") for c, _ in columns]
        sink.write("| " + " | ".join(cells) + " |\n")


CLIENT_CSV_COLUMNS: tuple[str, ...] = ("client", "client_users", "stage_clients", "client_slos", *TABLE_COLUMNS)
"""The columns of ``clients.csv``: the class, its users, the stage's classes, its SLOs, then the table's."""


def write_client_csv(rows: Iterable[ClientRow], sink: IO[str]) -> None:
    """Write per-class rows as CSV to a text sink: the table's columns, led by the class's own."""
    writer = csv.writer(sink, lineterminator="\n")
    writer.writerow(CLIENT_CSV_COLUMNS)
    for r in rows:
        slos = "; ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in r.slos.items())
        writer.writerow([r.client, "" if r.client_users is None else r.client_users, " ".join(r.stage_clients),
                         slos, *(_csv_cell(c, r.row.value(c)) for c in TABLE_COLUMNS)])


SERVER_STOPPED_CELL = "not judged: server stopped"


def row_cell(row: TableRow, column: str) -> str:
    """:func:`format_cell` of one row's column; a stage after the server stopped is not judged."""
    if column == "slo_pass" and row.trust.server_stopped:
        return SERVER_STOPPED_CELL
    if column == "trustworthy" and row.trust.trustworthy is False:
        return f"NOT TRUSTWORTHY: {row.trust.untrustworthy_reasons}"
    if column.startswith("itl_p") and itl_read_batched(row):
        return f"{format_cell(column, row.value(column))} (read-batched)"
    return format_cell(column, row.value(column))


def itl_read_batched(row: TableRow) -> bool:
    """Whether so many of the stage's chunk gaps are 0 (one socket read) that its ITL describes reads."""
    share = row.integrity.coalesced_chunk_share
    return share is not None and share > COALESCED_CHUNK_LIMIT


def format_cell(column: str, value: Any) -> str:
    """A human-readable cell: 3 significant digits, rates as percent, SLOs as pass/FAIL."""
    if column == "slo_pass":
        return {True: "pass", False: "FAIL", None: "-"}.get(value, "-")
    if column == "client_saturated":
        return {True: "not trustworthy: client CPU saturated", False: "ok", None: "-"}.get(value, "-")
    if column == "trustworthy":
        return {True: "ok", False: "NOT TRUSTWORTHY", None: "-"}.get(value, "-")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if column == "error_rate":
        return f"{100 * value:.2f}%"
    if column == "server_prefix_cache_hit_ratio":
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def slo_summary(results: Sequence[SloResult]) -> str:
    """One cell for SLO results: ``ttft_p95_ms<=2000:pass(412.3); …``."""
    parts = []
    for r in results:
        verdict = {True: "pass", False: "FAIL", None: "unchecked"}[r.passed]
        measured = "-" if r.measured is None else f"{r.measured:.6g}"
        parts.append(f"{r.key}{r.op}{r.threshold:g}:{verdict}({measured})")
    return "; ".join(parts)


def _csv_cell(column: str, value: Any) -> Any:
    if column == "slo_results":
        return slo_summary(value or ())
    if column == "load_generators_ended":
        return "; ".join(f"{i['worker']} {i['status']} at {i['t_s']:+.1f} s" for i in value or ())
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return repr(round(value, 6))
    return value


def _overall(results: Sequence[SloResult]) -> bool | None:
    checked = [r.passed for r in results if r.passed is not None]
    if not checked:
        return None
    return all(checked)


def _percentile_cells(metric: str, values: np.ndarray, *, mean: bool = False,
                      overwrite_input: bool = False) -> dict[str, float]:
    pct = metrics.percentiles(values, qs=PERCENTILES, overwrite_input=overwrite_input)
    cells = {f"{metric}_p{q}_ms": float(pct[f"p{q}"]) for q in PERCENTILES}
    if mean:
        cells[f"{metric}_mean_ms"] = float(pct["mean"])
    return cells


def _median(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(np.median(values)) if values.size else float("nan")


def _num(frame: pd.DataFrame, column: str) -> np.ndarray:
    """The column as float64 (NaN where missing or not a number); read-only, and for a float64
    column a view of the frame's own array (a million rows: 8 MB not copied, per column)."""
    if column not in frame.columns or not len(frame):
        return np.full(len(frame), np.nan)
    series = frame[column]
    if series.dtype == np.float64:
        values = series.to_numpy()
    else:
        values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    values = values.view()
    values.flags.writeable = False
    return values


def _in_window(frame: pd.DataFrame | None, ws: float, we: float) -> pd.DataFrame | None:
    if frame is None or frame.empty or "t_unix_s" not in frame.columns:
        return None
    w = frame[(frame["t_unix_s"] >= ws) & (frame["t_unix_s"] < we)]
    return w if len(w) else None


def _server_telemetry(telemetry: Mapping[str, pd.DataFrame], ws: float, we: float) -> ServerTelemetry:
    cells: dict[str, Any] = {}
    # counter deltas between the last samples at or before the window's edges (as the latency histograms)
    prefix = prefix_cache_window(*prefix_cache_counters(telemetry.get("metrics")), ws, we)
    if prefix is not None:
        cells.update(server_prefix_cache_queried_tokens=prefix.queried_tokens,
                     server_prefix_cache_hit_ratio=prefix.hit_ratio)
    w = _in_window(telemetry.get("metrics"), ws, we)
    if w is None:
        return ServerTelemetry(**cells)
    cells |= {
        "server_requests_running_mean": _col_stat(w, "requests_running", "mean"),
        "server_requests_waiting_max": _col_stat(w, "requests_waiting", "max"),
        "server_kv_cache_usage_max_ratio": _col_stat(w, "kv_cache_usage_ratio", "max"),
    }
    if "preemptions_total" in w.columns and w["preemptions_total"].notna().any():
        p = w["preemptions_total"].dropna()
        cells["server_preemptions"] = float(p.iloc[-1] - p.iloc[0])
    if "generation_tokens_total" in w.columns:
        g = w[["t_unix_s", "generation_tokens_total"]].dropna()
        if len(g) >= 2 and g["t_unix_s"].iloc[-1] > g["t_unix_s"].iloc[0]:
            cells["server_output_tokens_per_s"] = float(
                (g["generation_tokens_total"].iloc[-1] - g["generation_tokens_total"].iloc[0])
                / (g["t_unix_s"].iloc[-1] - g["t_unix_s"].iloc[0])
            )
    return ServerTelemetry(**cells)


def _server_latency(telemetry: Mapping[str, pd.DataFrame], ws: float, we: float,
                    client_ttft_mean_ms: float) -> ServerLatency:
    """The server's latency histograms between the last samples at or before ``ws`` and ``we``."""
    m = telemetry.get("metrics")
    if m is None or m.empty or "histograms" not in m.columns or "t_unix_s" not in m.columns:
        return ServerLatency()
    m = m[["t_unix_s", "histograms"]].dropna(subset=["t_unix_s"]).sort_values("t_unix_s", kind="stable")
    deltas = window_deltas(m["t_unix_s"].tolist(), m["histograms"].tolist(), ws, we)
    return server_latency(deltas, client_ttft_mean_ms=None if math.isnan(client_ttft_mean_ms) else client_ttft_mean_ms)


def _host_cells(telemetry: Mapping[str, pd.DataFrame], ws: float, we: float) -> tuple[float | None, bool | None]:
    """The busiest host CPU ratio, and whether one load-generator process saturated its core."""
    w = _in_window(telemetry.get("host"), ws, we)
    if w is None:
        return None, None
    busiest = busiest_process_core_ratio(w)
    busiest = busiest[~np.isnan(busiest)]
    # one gevent process saturates at one core: the window's numbers measure the client
    saturated = bool(busiest.max() > CLIENT_SATURATED_CORE_RATIO) if busiest.size else None
    return _col_stat(w, "cpu_core_ratio", "max"), saturated


def _col_stat(frame: pd.DataFrame, column: str, how: str) -> float | None:
    if column not in frame.columns:
        return None
    values = pd.to_numeric(frame[column], errors="coerce").dropna()
    if values.empty:
        return None
    return float(values.mean() if how == "mean" else values.max())
