"""What broke first: server and client events in time order, and a client/server token cross-check.

Pure functions over a loaded run's pieces (stages, table rows, the records
frame, telemetry frames). Events are placed in time relative to the start of
the load (the first stage's start: the zero of the report's timeline graph,
so a launched server's start-up time is not counted) and in the stage they
fell in:

* ``queueing``: the first server sample with ``requests_waiting > 0``;
* ``kv_cache``: the first with ``kv_cache_usage_ratio >= 0.9``;
* ``preemption``: the first increase of ``preemptions_total`` between samples;
* ``errors``: the first failed request (its failure time; ``cancelled`` does not count);
* ``client_saturated``: the first load-generator sample inside a stage's steady-state
  window where one process used more than 0.9 of a core (that stage's numbers
  are then not trustworthy);
* ``slo``: the first stage whose SLOs failed, at that stage's start (a stage
  the server had stopped answering in is not judged, see :mod:`analysis.failures`);
* ``server_stopped``: the server stopped answering for good (failures that are
  part of that outage are not an ``errors`` event).

Ordering: by stage, then by time inside the stage; an SLO failure is a verdict
over the stage's window, so it sorts after the timed events of its own stage
(a queue that formed during the stage comes before the verdict that the stage
was too slow).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from analysis.common import KV_PRESSURE_RATIO, METRIC_NAMES, finite, grouped_number, percent, split_key
from analysis.load import run_start_unix_s
from analysis.envelope import flagged_caveat, last_safe_before, server_evidence, worst_failed_slo
from analysis.failures import ServerStop, run_server_stop
from envelope.capabilities import read_capabilities
from analysis.rows import SloResult, TableRow
from envelope.stages import StageRecord

__all__ = [
    "KV_PRESSURE_RATIO",
    "CLIENT_SATURATED_CORE_RATIO",
    "BreakEvent",
    "BrokeFirst",
    "TokenCrossCheck",
    "counter_increase",
    "token_cross_check",
    "run_probe_output_tokens",
    "saturated_stage_indices",
    "busiest_process_core_ratio",
    "break_events",
    "what_broke_first",
    "broke_sentence",
    "cross_check_text",
]

CLIENT_SATURATED_CORE_RATIO = 0.9

_BROKE_LABEL = {
    "queueing": "queueing",
    "kv_cache": "the KV cache",
    "preemption": "the KV cache (preemption)",
    "errors": "errors",
    "client_saturated": "the load generator",
    "server_stopped": "the server (it stopped answering)",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakEvent:
    """One thing that went wrong, when (``t_s`` after the run started) and in which stage."""

    kind: str  # queueing | kv_cache | preemption | errors | client_saturated | slo | server_stopped
    t_unix_s: float
    t_s: float
    stage_index: int | None
    stage_name: str | None
    detail: str  # one phrase, e.g. "p95 TTFT was 1,412 ms, over its 1,000 ms SLO"
    label: str  # what broke, for "...: <label> broke first"
    key: str | None = None  # the SLO key, for kind == "slo"
    value: float | None = None  # measured value (SLO, KV ratio, core ratio, waiting count, preemptions)
    limit: float | None = None  # the SLO threshold or the pressure threshold


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokeFirst:
    """Every event in order, the first one, and the plain sentence that says it."""

    events: tuple[BreakEvent, ...]
    first: BreakEvent | None
    server_metrics: bool
    saturated_stages: tuple[int, ...]
    sentence: str
    # what the server's latency histograms say at the first stage that failed its SLOs
    # (against the last safe stage below it; see analysis.envelope.server_evidence)
    server_evidence: tuple[str, ...] = ()
    # False: the server has no /metrics at all (probed: capabilities.json); None: not probed
    server_has_metrics: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenCrossCheck:
    """Client output tokens (all records) vs the server's ``generation_tokens_total`` increase.

    ``difference_tokens`` = client - (server - probe); ``difference_ratio`` = |difference| / server.
    Server fields are None when fewer than two metrics samples carry the counter.
    ``probe_output_tokens``: what the capability probe made the server generate before the load
    (``capabilities.json``): inside the counter's increase, in no record.
    """

    client_output_tokens: int
    server_generation_tokens: float | None
    difference_tokens: float | None
    difference_ratio: float | None
    counter_resets: int = 0
    samples: int = 0
    probe_output_tokens: int = 0


# --------------------------------------------------------------------------- cross-check


def counter_increase(values: Sequence[float]) -> tuple[float, int]:
    """Increase of a cumulative counter over ``values`` (in time order), and how many resets it saw.

    As Prometheus' ``increase``: a drop means the counter restarted from 0, so
    the value after the drop counts in full.
    """
    total = 0.0
    resets = 0
    prev: float | None = None
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        v = float(v)
        if prev is not None:
            if v >= prev:
                total += v - prev
            else:
                resets += 1
                total += v
        prev = v
    return total, resets


def token_cross_check(frame: pd.DataFrame, metrics: pd.DataFrame | None, *,
                      probe_output_tokens: int = 0) -> TokenCrossCheck:
    """Compare the records' output tokens with the server counter between the first and last OK sample,
    less the ``probe_output_tokens`` the capability probe generated before the load.

    Failed records count too: a request that streamed tokens before failing
    made the server generate them.
    """
    if len(frame) and "output_tokens" in frame.columns:
        client = int(np.nansum(pd.to_numeric(frame["output_tokens"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)))
    else:
        client = 0
    values = _ok_series(metrics, "generation_tokens_total")
    if len(values) < 2:
        return TokenCrossCheck(client_output_tokens=client, server_generation_tokens=None,
                               difference_tokens=None, difference_ratio=None, samples=len(values))
    server, resets = counter_increase(values.tolist())
    diff = client - (server - probe_output_tokens)
    ratio = abs(diff) / server if server > 0 else (0.0 if diff == 0 else math.inf)
    return TokenCrossCheck(client_output_tokens=client, server_generation_tokens=server, difference_tokens=diff,
                           difference_ratio=ratio, counter_resets=resets, samples=len(values),
                           probe_output_tokens=probe_output_tokens)


def run_probe_output_tokens(run: Any) -> int:
    """The capability probe's generated tokens for a loaded run (0 for a run without ``capabilities.json``)."""
    caps = read_capabilities(run.run_dir) if getattr(run, "run_dir", None) is not None else None
    return caps.probe_output_tokens if caps is not None else 0


def cross_check_text(check: TokenCrossCheck) -> str:
    """The cross-check in one sentence."""
    if check.server_generation_tokens is None:
        return (f"The records carry {check.client_output_tokens:,} output tokens; no server counter "
                "(vllm:generation_tokens_total) was recorded to compare them with.")
    text = (
        f"The records carry {check.client_output_tokens:,} output tokens; the server's "
        f"vllm:generation_tokens_total rose by {check.server_generation_tokens:,.0f} between the first and last "
        f"metrics samples"
        + (f", {check.probe_output_tokens:,} of them the capability probe's before the load"
           if check.probe_output_tokens else "")
        + f": a difference of {check.difference_tokens:+,.0f} tokens "
        f"({percent(check.difference_ratio, digits=2)})."
    )
    if check.counter_resets:
        text += f" The counter reset {check.counter_resets} time(s) (server restart?); counted as Prometheus' increase()."
    return text


# --------------------------------------------------------------------------- events


def saturated_stage_indices(rows: Sequence[TableRow], host: pd.DataFrame | None,
                            *, run_start_unix_s: float) -> dict[int, tuple[float, float]]:
    """Stages whose steady-state window saw a load-generator process above 0.9 of a core.

    ``run_start_unix_s`` is the zero of the rows' ``window_start_s``/``window_end_s``.
    Returns ``{stage_index: (t_unix_s of the first such sample, its core ratio)}``.
    """
    out: dict[int, tuple[float, float]] = {}
    if host is None or host.empty or "t_unix_s" not in host.columns:
        return out
    t = host["t_unix_s"].to_numpy(dtype=float)
    ratio = busiest_process_core_ratio(host)
    for r in rows:
        ws, we = r.window.window_start_s, r.window.window_end_s
        if not (finite(ws) and finite(we)):
            continue
        lo, hi = run_start_unix_s + ws, run_start_unix_s + we
        hit = np.flatnonzero((t >= lo) & (t < hi) & (ratio > CLIENT_SATURATED_CORE_RATIO))
        if hit.size:
            out[r.stage_index] = (float(t[hit[0]]), float(ratio[hit[0]]))
    return out


def break_events(
    *,
    stages: Sequence[StageRecord],
    rows: Sequence[TableRow],
    frame: pd.DataFrame | None,
    metrics: pd.DataFrame | None,
    host: pd.DataFrame | None,
    run_start_unix_s: float,
    server_stop: ServerStop | None = None,
) -> list[BreakEvent]:
    """The first event of each kind, in order (see the module docstring).

    ``run_start_unix_s`` is the one zero: of each event's ``t_s`` and of the rows'
    window columns (:func:`analysis.load.run_start_unix_s`).
    """
    stages = sorted(stages, key=lambda s: float(s.start_unix_s))

    def event(kind: str, t: float, detail: str, label: str, **kw: Any) -> BreakEvent:
        stage = _stage_at(stages, t)
        return BreakEvent(kind=kind, t_unix_s=t, t_s=t - run_start_unix_s,
                          stage_index=None if stage is None else stage.stage_index,
                          stage_name=None if stage is None else stage.stage_name,
                          detail=detail, label=label, **kw)

    events: list[BreakEvent] = []
    m = _ok_metrics(metrics)
    if m is not None:
        t = m["t_unix_s"].to_numpy(dtype=float)
        waiting = _col(m, "requests_waiting")
        hit = np.flatnonzero(waiting > 0)
        if hit.size:
            i = hit[0]
            events.append(event("queueing", t[i], "requests began waiting in the server queue",
                                _BROKE_LABEL["queueing"], value=float(waiting[i]), limit=0.0))
        kv = _col(m, "kv_cache_usage_ratio")
        hit = np.flatnonzero(kv >= KV_PRESSURE_RATIO)
        if hit.size:
            i = hit[0]
            events.append(event("kv_cache", t[i], f"the KV cache reached {percent(kv[i])} use",
                                _BROKE_LABEL["kv_cache"], value=float(kv[i]), limit=KV_PRESSURE_RATIO))
        pre = _col(m, "preemptions_total")
        known = np.flatnonzero(~np.isnan(pre))
        for a, b in zip(known[:-1], known[1:]):
            step = pre[b] - pre[a] if pre[b] >= pre[a] else pre[b]  # a drop is a restart from 0
            if step > 0:
                events.append(event("preemption", t[b], "the server began preempting requests",
                                    _BROKE_LABEL["preemption"], value=float(step), limit=0.0))
                break

    if frame is not None and len(frame) and "ok" in frame.columns:
        ok = frame["ok"].to_numpy(dtype=bool)
        cats = frame["error_category"].astype(object).to_numpy() if "error_category" in frame.columns else None
        failed = ~ok
        if cats is not None:
            failed &= np.array([c != "cancelled" for c in cats], dtype=bool)
        when = _failure_times(frame)
        if server_stop is not None:
            failed &= ~(when >= server_stop.t_unix_s)  # those are the outage, reported on their own
        if failed.any():
            i = int(np.flatnonzero(failed)[np.argmin(when[failed])])
            cat = str(cats[i]) if cats is not None else "error"
            events.append(event("errors", float(when[i]), f"requests began failing ({cat})",
                                _BROKE_LABEL["errors"], key=cat))

    saturated = saturated_stage_indices(rows, host, run_start_unix_s=run_start_unix_s)
    if saturated:
        idx, (t_sat, ratio) = min(saturated.items(), key=lambda kv: kv[1][0])
        events.append(event("client_saturated", t_sat,
                            f"a load-generator process used {percent(ratio)} of a CPU core (numbers not trustworthy)",
                            _BROKE_LABEL["client_saturated"], value=ratio, limit=CLIENT_SATURATED_CORE_RATIO))

    if server_stop is not None:
        events.append(event("server_stopped", server_stop.t_unix_s,
                            "the server stopped answering (every later request got no answer)",
                            _BROKE_LABEL["server_stopped"], value=float(server_stop.requests)))

    by_index = {s.stage_index: s for s in stages}
    failing = [r for r in rows if r.slo.slo_pass is False and not r.trust.server_stopped
               and r.stage_index in by_index]
    if failing:
        r = min(failing, key=lambda r: float(by_index[r.stage_index].start_unix_s))
        stage = by_index[r.stage_index]
        slo = worst_failed_slo([s for s in r.slo.slo_results if s.passed is False])
        if slo is not None:
            t0 = float(stage.start_unix_s)
            events.append(BreakEvent(
                kind="slo", t_unix_s=t0, t_s=t0 - run_start_unix_s, stage_index=stage.stage_index,
                stage_name=stage.stage_name, detail=_slo_text(slo), label=_slo_label(slo),
                key=slo.key, value=slo.measured, limit=slo.threshold,
            ))

    position = {s.stage_index: i for i, s in enumerate(stages)}

    def order(e: BreakEvent) -> tuple[float, int, float]:
        if e.stage_index is None:  # outside every stage: before the first or after the last
            before = not stages or e.t_unix_s < float(stages[0].start_unix_s)
            return (-1.0 if before else float(len(stages)), 0, e.t_unix_s)
        return (float(position[e.stage_index]), 1 if e.kind == "slo" else 0, e.t_unix_s)

    return sorted(events, key=order)


def what_broke_first(run: Any, rows: Sequence[TableRow]) -> BrokeFirst:
    """Events and sentence for a loaded :class:`analysis.load.Run` and its envelope table ``rows``."""
    telemetry = getattr(run, "telemetry", {}) or {}
    zero = run_start_unix_s(run)  # one zero for every "at N s" of the report, the table's windows too
    metrics = telemetry.get("metrics")
    events = break_events(stages=run.stages, rows=rows, frame=run.frame, metrics=metrics,
                          host=telemetry.get("host"), run_start_unix_s=zero, server_stop=run_server_stop(run))
    saturated = saturated_stage_indices(rows, telemetry.get("host"), run_start_unix_s=zero)
    caps = read_capabilities(run.run_dir) if getattr(run, "run_dir", None) is not None else None
    fields = dict(events=tuple(events), first=events[0] if events else None,
                  server_metrics=_ok_metrics(metrics) is not None, saturated_stages=tuple(sorted(saturated)),
                  server_evidence=tuple(_slo_stage_server_evidence(events, rows)),
                  server_has_metrics=None if caps is None else caps.metrics)
    sentence = broke_sentence(BrokeFirst(**fields, sentence=""))
    # the stages the sentence names: the first event's, and the first SLO failure's
    named = {e.stage_index for e in events[:1] + [e for e in events if e.kind == "slo"][:1]}
    return BrokeFirst(**fields, sentence=sentence + flagged_caveat([r for r in rows if r.stage_index in named]))


def _slo_stage_server_evidence(events: Sequence[BreakEvent], rows: Sequence[TableRow]) -> list[str]:
    slo = next((e for e in events if e.kind == "slo"), None)
    row = next((r for r in rows if slo is not None and r.stage_index == slo.stage_index), None)
    if row is None:
        return []
    return server_evidence(row, last_safe_before(rows, row))[1]


def broke_sentence(result: BrokeFirst) -> str:
    """Say plainly what broke first, and when the first SLO failure came relative to it.

    When the server's latency histograms explain the first SLO failure, a last sentence says how.
    """
    text = _broke_sentence(result)
    if result.server_evidence:
        slo = next((e for e in result.events if e.kind == "slo"), None)
        where = f" in {slo.stage_name}" if slo is not None and slo.stage_name else ""
        text += f" Server side{where}: {'; '.join(result.server_evidence)}."
    return text


def _broke_sentence(result: BrokeFirst) -> str:
    no_server = "no server metrics were recorded, so only client-side SLOs can be ordered"
    if result.server_has_metrics is False:
        no_server = ("the server has no /metrics, so its queue, batch slots and KV cache could not be seen: "
                     "only client-side SLOs and failed requests can be ordered")
    first = result.first
    if first is None:
        if result.server_metrics:
            return ("Nothing broke: no SLO failed, no request failed, and the server never queued requests, "
                    f"ran its KV cache at {percent(KV_PRESSURE_RATIO)} or more, or preempted.")
        return f"Nothing broke on the client side (no SLO failed, no request failed); {no_server}."
    slo = next((e for e in result.events if e.kind == "slo"), None)
    stop = next((e for e in result.events if e.kind == "server_stopped"), None)
    head = f"{_capital(first.detail)} {_when(first)}"
    if first.kind == "server_stopped":
        text = (f"{head}, before any SLO failed or server pressure was seen: "
                "the envelope above that point is unknown.")
        return text if result.server_metrics else f"{text} ({_capital(no_server)}.)"
    if stop is not None:
        return _without_stop(result, first, slo, head, no_server) + (
            f" Later the server stopped answering {_when(stop)}: the envelope above that point is unknown.")
    return _without_stop(result, first, slo, head, no_server)


def _without_stop(result: BrokeFirst, first: BreakEvent, slo: BreakEvent | None, head: str, no_server: str) -> str:
    if first.kind == "slo":
        if result.server_metrics:
            text = f"{head}, before any server pressure or error was seen: {first.label} broke first."
        else:
            text = f"{head}: {first.label} broke first ({no_server})."
        return text
    if slo is None:
        text = f"{head}; no SLO failed: {first.label} was the first limit reached."
    elif slo.stage_index == first.stage_index:
        text = f"{head}, then {slo.detail} in the same stage: {first.label} broke first."
    else:
        text = f"{head}, then {slo.detail} {_when(slo)}: {first.label} broke first."
    if not result.server_metrics:
        text += f" ({_capital(no_server)}.)"
    return text


# --------------------------------------------------------------------------- helpers


def _when(e: BreakEvent) -> str:
    where = f" ({e.stage_name})" if e.stage_name else ""
    if e.kind == "slo":
        return f"in {e.stage_name or 'a stage'} (from {e.t_s:,.0f} s)"
    return f"at {e.t_s:,.0f} s{where}"


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _slo_text(slo: SloResult) -> str:
    key = slo.key
    measured, limit = slo.measured, slo.threshold
    if key == "error_rate_max":
        return f"the error rate was {percent(measured)}, over its {percent(limit)} SLO"
    if key == "min_output_tokens_per_s":
        return (f"aggregate output was {grouped_number(measured)} tokens/s, "
                f"under its {grouped_number(limit)} tokens/s SLO")
    if key == "attainment_min":
        if measured is None:
            return f"no request could be judged, failing its {percent(limit)} attainment SLO"
        return (f"only {percent(measured)} of requests met every latency threshold, under its "
                f"{percent(limit)} attainment SLO")
    metric, pct = split_key(key)
    name = f"{pct} {METRIC_NAMES.get(metric, metric.upper())}"
    if measured is None:
        return f"{name} could not be measured (no successful requests), failing its {grouped_number(limit)} ms SLO"
    return f"{name} exceeded its {grouped_number(limit)} ms SLO ({grouped_number(measured)} ms)"


def _slo_label(slo: SloResult) -> str:
    key = slo.key
    if key == "error_rate_max":
        return "errors"
    if key == "min_output_tokens_per_s":
        return "throughput"
    if key == "attainment_min":
        return "SLO attainment"
    metric, _ = split_key(key)
    return METRIC_NAMES.get(metric, metric.upper())


def _stage_at(stages: Sequence[StageRecord], t: float) -> StageRecord | None:
    for s in stages:
        end = s.end_unix_s
        if float(s.start_unix_s) <= t and (end is None or t < float(end)):
            return s
    return None


def _failure_times(frame: pd.DataFrame) -> np.ndarray:
    if "in_flight_end_unix_s" in frame.columns:
        return frame["in_flight_end_unix_s"].to_numpy(dtype=float, na_value=np.nan)
    return frame["wall_start_unix_s"].to_numpy(dtype=float, na_value=np.nan)


def busiest_process_core_ratio(host: pd.DataFrame) -> np.ndarray:
    """Per sample, the largest core ratio of one load-generator process (a gevent process saturates at 1.0)."""
    total = _col(host, "cpu_core_ratio")
    if "processes" not in host.columns:
        return total
    out = np.full(len(host), np.nan)
    for i, procs in enumerate(host["processes"].tolist()):
        ratios = [p.get("cpu_core_ratio") for p in procs or () if isinstance(p, dict)]
        ratios = [float(r) for r in ratios if finite(r)]
        out[i] = max(ratios) if ratios else total[i]
    return out


def _ok_metrics(metrics: pd.DataFrame | None) -> pd.DataFrame | None:
    if metrics is None or metrics.empty or "t_unix_s" not in metrics.columns:
        return None
    m = metrics
    if "ok" in m.columns:
        m = m[m["ok"].fillna(False).astype(bool)]
    if m.empty:
        return None
    return m.sort_values("t_unix_s", kind="stable")


def _ok_series(metrics: pd.DataFrame | None, column: str) -> pd.Series:
    m = _ok_metrics(metrics)
    if m is None or column not in m.columns:
        return pd.Series(dtype=float)
    return pd.to_numeric(m[column], errors="coerce").dropna()


def _col(frame: pd.DataFrame, column: str) -> np.ndarray:
    if column not in frame.columns:
        return np.full(len(frame), np.nan)
    return pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
