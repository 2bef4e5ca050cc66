"""The write-up logic: from the envelope table, state what is safe and what broke first.

Pure functions over table rows (see :mod:`analysis.table`). Within a pass,
stages are ordered by concurrency (target users, else target rate, else mean
in flight). "Safe up to N" means every stage at or below N met every SLO. The
first stage above that is where the envelope broke; the SLO that broke is the
one furthest over its threshold there (errors first, whatever the ratio).

Why it broke, in this order:
    * errors: the error-rate SLO failed;
    * KV cache: server telemetry shows KV-cache use >= 0.9 or preemptions;
    * queueing: TTFT p50 grew at least twice as fast as TPOT p50 since the last
      safe stage (and at least 1.5x), or the server reported waiting requests;
    * decode slowdown: TPOT p50 grew at least 1.5x (every token got slower);
    * otherwise, from the server's own latency histograms (:mod:`analysis.server_latency`), when
      the rules above found nothing: more than half of the client's mean TTFT (and over 50 ms)
      spent outside the engine is the measurement setup (front end, network, load generator);
      else the server phase whose mean grew most since the last safe stage (at least 1.5x and
      10 ms): queue time is queueing, prefill is long prompts, decode is the batch size
      (decode slowdown);
    * otherwise unknown.

Those server-side findings are added to the evidence whatever the cause (not for errors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from analysis.common import KV_PRESSURE_RATIO, METRIC_NAMES, adaptive_percent, finite, plain_number, split_key
from analysis.rows import SloResult, TableRow

__all__ = [
    "EnvelopeFinding",
    "find_envelope",
    "find_envelopes",
    "envelope_sentence",
    "broke_text",
    "level_text",
    "flagged_caveat",
    "server_evidence",
    "cause_of",
    "worst_failed_slo",
    "last_safe_before",
    "KV_PRESSURE_RATIO",
    "CAUSE_PHRASES",
]

QUEUE_GROWTH_FACTOR = 2.0  # TTFT growth / TPOT growth that reads as queueing
MIN_GROWTH = 1.5
MIN_SERVER_GROWTH_MS = 10.0  # a server phase's mean must also grow by this much to count
OUTSIDE_ENGINE_SHARE = 0.5  # more than this share of the client's mean TTFT outside the engine ...
OUTSIDE_ENGINE_MIN_MS = 50.0  # ... and more than this: the measurement setup is the limit

# cause -> how a sentence says it (", because ..."; empty where the SLO's own words say it)
CAUSE_PHRASES: dict[str, str] = {
    "queueing": ", because requests queued in the server",
    "kv_cache": ", because the server's KV cache ran full",
    "decode_slowdown": ", because every output token got slower as the batch grew",
    "long_prompts": ", because the server took longer to process the prompts (prefill)",
    "measurement": (", because most of the time to first token was spent outside the engine: "
                    "the measurement setup (front end, network, load generator), not the server, is the limit"),
    "errors": "",
    "throughput": "",
}

# server phase -> the cause its growth points to
_SERVER_PHASES = (("queue", "queueing", "server queue time"), ("prefill", "long_prompts", "server prefill time"),
                  ("decode", "decode_slowdown", "server decode time"))


@dataclass(frozen=True, slots=True, kw_only=True)
class EnvelopeFinding:
    """What one pass says about the envelope.

    ``status`` is ``all_pass``, ``broke``, ``none_pass``, ``no_slos``, ``no_data``
    or ``server_stopped`` (the server stopped answering before any stage of the
    pass finished). ``cause`` is ``errors``, ``kv_cache``, ``queueing``,
    ``decode_slowdown``, ``throughput`` or ``unknown`` (None unless something broke).
    Rows marked ``server_stopped`` are left out of the verdict;
    ``server_stopped_row`` is the first of them (the stage the server stopped in).
    """

    pass_name: str
    status: str
    safe_row: TableRow | None = None
    broke_row: TableRow | None = None
    broke_slo: SloResult | None = None
    failed_slos: tuple[SloResult, ...] = ()
    cause: str | None = None
    evidence: tuple[str, ...] = ()
    first_pressure: str | None = None  # e.g. "requests waited in the server from 10 users"
    output_tokens: float | None = None
    prompt_tokens: float | None = None
    limits: tuple[str, ...] = field(default_factory=tuple)
    server_stopped_row: TableRow | None = None


def level_text(row: TableRow) -> str:
    """The load of a stage in words: ``5 users``, ``2 requests/s`` or ``~3.1 in flight``."""
    w = row.window
    if w.target_users is not None and w.kind == "users":
        return f"{plain_number(w.target_users)} user" + ("" if w.target_users == 1 else "s")
    if w.target_rate_per_s is not None:
        return f"{plain_number(w.target_rate_per_s)} requests/s"
    return f"~{plain_number(w.mean_in_flight or 0.0)} in flight"


def find_envelopes(rows: Sequence[TableRow]) -> list[EnvelopeFinding]:
    """One finding per pass, in the order passes first appear in ``rows``."""
    names: list[str] = []
    for r in rows:
        if r.pass_name not in names:
            names.append(r.pass_name)
    return [find_envelope(rows, pass_name=n) for n in names]


def find_envelope(rows: Sequence[TableRow], *, pass_name: str | None = None) -> EnvelopeFinding:
    """The finding for one pass (default: the pass with the most stages, first on ties)."""
    if pass_name is None:
        counts: dict[str, int] = {}
        for r in rows:
            counts[r.pass_name] = counts.get(r.pass_name, 0) + 1
        pass_name = max(counts, key=counts.get) if counts else ""
    everything = sorted((r for r in rows if r.pass_name == pass_name), key=_level)
    limits = _limits(everything)
    stopped = [r for r in everything if r.trust.server_stopped]
    mine = [r for r in everything if not r.trust.server_stopped]
    with_data = [r for r in mine if r.counts.ok_requests > 0]
    common: dict[str, Any] = dict(pass_name=pass_name, limits=tuple(limits))
    if stopped:
        common["server_stopped_row"] = min(stopped, key=lambda r: (_f(r.window.window_start_s), r.stage_index))
        if not mine:
            return EnvelopeFinding(status="server_stopped", **common)
    if not with_data:
        return EnvelopeFinding(status="no_data", **common)
    out_tokens, prompt_tokens = _workload(with_data)
    common.update(output_tokens=out_tokens, prompt_tokens=prompt_tokens)
    if all(r.slo.slo_pass is None for r in mine):
        best = max(with_data, key=lambda r: _f(r.throughput.aggregate_output_tokens_per_s))
        return EnvelopeFinding(status="no_slos", safe_row=best, **common)

    safe = None
    broke = None
    for r in mine:
        if r.slo.slo_pass is False:
            broke = r
            break
        if r.slo.slo_pass is True:
            safe = r
    pressure = _first_pressure(mine)
    if broke is None:
        return EnvelopeFinding(status="all_pass", safe_row=safe, first_pressure=pressure, **common)
    failed = tuple(s for s in broke.slo.slo_results if s.passed is False)
    first = worst_failed_slo(failed)
    baseline = safe if safe is not None else None
    cause, evidence = cause_of(first, broke, baseline)
    return EnvelopeFinding(
        status="broke" if safe is not None else "none_pass",
        safe_row=safe,
        broke_row=broke,
        broke_slo=first,
        failed_slos=failed,
        cause=cause,
        evidence=tuple(evidence),
        first_pressure=pressure,
        **common,
    )


def envelope_sentence(finding: EnvelopeFinding) -> str:
    """The envelope in one or two plain sentences, and a warning when it rests on a flagged stage."""
    return _sentence(finding) + flagged_caveat([r for r in (finding.safe_row, finding.broke_row) if r is not None])


def flagged_caveat(rows: Sequence[TableRow]) -> str:
    """`` Caution: …`` naming the rows among ``rows`` flagged NOT TRUSTWORTHY and why ("" when none is)."""
    flagged = [r for r in rows if r.trust.trustworthy is False]
    if not flagged:
        return ""
    which = "; ".join(f"{level_text(r)} ({r.stage_name}): {r.trust.untrustworthy_reasons}" for r in flagged)
    return f" Caution: this rests on numbers flagged NOT TRUSTWORTHY at {which}."


def _sentence(finding: EnvelopeFinding) -> str:
    f = finding
    stop = f.server_stopped_row
    stop_at = f"during {stop.stage_name} ({level_text(stop)})" if stop else ""
    if f.status == "server_stopped":
        return (f"The server stopped answering {stop_at}, before any stage of this pass finished, "
                "so its envelope is unknown.")
    if f.status == "no_data":
        text = "No successful requests fell inside any steady-state window, so no envelope can be stated."
        return text + (f" The server stopped answering {stop_at}." if stop else "")
    workload = _workload_text(f)
    if f.status == "no_slos":
        r = f.safe_row
        assert r is not None  # no_slos names the best row
        text = (
            f"No SLOs were set, so no envelope is stated; the highest throughput was "
            f"{_tps(r.throughput.aggregate_output_tokens_per_s)} output tokens/s at {level_text(r)}"
            f"{workload} ({_key_numbers(r)})."
        )
        return text + (f" The server stopped answering {stop_at}; later stages are not counted." if stop else "")
    if f.status == "all_pass":
        r = f.safe_row
        assert r is not None  # all_pass: some stage passed
        if stop:
            text = (
                f"Met every SLO up to {level_text(r)}{workload} ({_key_numbers(r)}); then the server stopped "
                f"answering {stop_at}, so the envelope above {level_text(r)} is unknown."
            )
        else:
            text = (
                f"Met every SLO up to the highest tested concurrency, {level_text(r)}{workload} "
                f"({_key_numbers(r)}); the limit is above {level_text(r)}."
            )
        if f.first_pressure:
            text += f" Note: {f.first_pressure}."
        return text
    broke = f.broke_row
    assert broke is not None  # broke / none_pass
    what = broke_text(f)
    if f.status == "none_pass":
        text = f"No tested concurrency met every SLO{workload}: at the lowest, {level_text(broke)}, {what}"
    else:
        safe = f.safe_row
        assert safe is not None  # broke: the last stage that passed
        text = (
            f"Safe up to {_concurrent(safe)}{workload} ({_key_numbers(safe)}). "
            f"At {level_text(broke)} {what}"
        )
    if f.first_pressure:
        text += f" Server pressure: {f.first_pressure}."
    if stop:
        text += f" The server later stopped answering {stop_at}."
    return text


# --- pieces -----------------------------------------------------------------


def broke_text(f: EnvelopeFinding) -> str:
    """What broke at ``f``'s broke row, why, and the evidence, ending ``...: TTFT broke first.``"""
    slo = f.broke_slo
    key = slo.key if slo is not None else ""
    measured = slo.measured if slo is not None else None
    threshold = slo.threshold if slo is not None else None
    if key == "error_rate_max":
        cats = f.broke_row.counts.errors_by_category if f.broke_row is not None else ""
        detail = f" ({cats})" if cats else ""
        head = (
            f"the error rate rose to {adaptive_percent(measured)}{detail}, over the "
            f"{adaptive_percent(threshold)} SLO"
        )
        name = "errors"
    elif key == "attainment_min":
        head = (f"only {adaptive_percent(measured)} of requests met every latency threshold"
                f"{' (' + slo.note + ')' if slo is not None and slo.note else ''}, under the "
                f"{adaptive_percent(threshold)} target" if measured is not None else
                "no request could be judged against the latency thresholds, so the attainment SLO failed")
        name = "SLO attainment"
    elif key == "min_output_tokens_per_s":
        head = (
            f"aggregate output was {_tps(measured)} tokens/s, under the "
            f"{_tps(threshold)} tokens/s SLO"
        )
        name = "throughput"
    else:
        metric, pct = split_key(key)
        label = f"{pct} {METRIC_NAMES.get(metric, metric.upper())}"
        if measured is None:
            head = f"{label} could not be measured (no successful requests), so its SLO failed"
        else:
            head = (
                f"{label} rose to {_seconds(measured)} s, over the "
                f"{_seconds(threshold)} s SLO"
            )
        name = METRIC_NAMES.get(metric, metric.upper())
    because = CAUSE_PHRASES.get(f.cause or "", "")
    evidence = f" ({'; '.join(f.evidence)})" if f.evidence else ""
    return f"{head}{because}{evidence}: {name} broke first."


def worst_failed_slo(failed: Sequence[SloResult]) -> SloResult | None:
    """The failed SLO to name: the error rate if it failed, else the one furthest past its limit."""
    if not failed:
        return None
    for s in failed:
        if s.key == "error_rate_max":
            return s

    def over(s: SloResult) -> float:
        m, t = s.measured, s.threshold or 0.0
        if m is None:
            return math.inf
        if s.op == ">=":  # a floor (tokens/s, attainment): how far under it
            return t / m if m > 0 else math.inf
        return m / t if t > 0 else math.inf

    # a failed percentile names the metric that broke; attainment (all thresholds at once) only when none did
    named = [s for s in failed if s.key != "attainment_min"] or list(failed)
    return max(named, key=over)


def cause_of(slo: SloResult | None, broke: TableRow, base: TableRow | None) -> tuple[str, list[str]]:
    """Why ``broke`` failed ``slo`` where ``base`` (the last stage that met its SLOs) did not: the cause
    (see the module docstring) and its evidence phrases."""
    cause, evidence = _client_cause(slo, broke, base)
    if cause == "errors":
        return cause, evidence
    server_cause, from_server = server_evidence(broke, base)
    evidence += from_server
    if cause == "unknown" and server_cause is not None:
        cause = server_cause
    return cause, evidence


def last_safe_before(rows: Sequence[TableRow], row: TableRow) -> TableRow | None:
    """The highest-load stage of ``row``'s pass below ``row``'s load that met its SLOs (None: none)."""
    level = _level(row)
    safe = [r for r in rows if r.pass_name == row.pass_name and r.slo.slo_pass is True
            and not r.trust.server_stopped and _level(r) < level]
    return max(safe, key=_level) if safe else None


def server_evidence(broke: TableRow, base: TableRow | None) -> tuple[str | None, list[str]]:
    """What the server's latency histograms say about ``broke`` against the last safe stage ``base``.

    Returns the cause they point to (``measurement``, ``queueing``, ``long_prompts``,
    ``decode_slowdown``, or None) and the evidence phrases; both empty without histograms.
    """
    evidence: list[str] = []
    causes: list[str] = []
    outside, client = broke.server_latency.outside_engine_ttft_mean_ms, broke.latency.ttft_mean_ms
    if finite(outside) and finite(client) and client > 0 and outside > OUTSIDE_ENGINE_MIN_MS \
            and outside / client > OUTSIDE_ENGINE_SHARE:
        evidence.append(f"{adaptive_percent(outside / client)} of the client's mean TTFT "
                        f"({_ms(client)} ms) was spent outside the engine")
        causes.append("measurement")
    grown: list[tuple[float, str]] = []
    if base is not None:
        for phase, cause, label in _SERVER_PHASES:
            column = f"server_{phase}_mean_ms"
            after, before = broke.value(column), base.value(column)
            if not (finite(after) and finite(before)) or after - before < MIN_SERVER_GROWTH_MS:
                continue
            if before > 0 and after / before < MIN_GROWTH:
                continue
            evidence.append(f"{label} mean {_ms(before)} -> {_ms(after)} ms from {level_text(base)}")
            grown.append((after - before, cause))
    if grown:
        causes.append(max(grown)[1])
    return (causes[0] if causes else None), evidence


def _requests(n: float) -> str:
    return "request" if n == 1 else "requests"


def _ms(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 10 else f"{value:.2g}"


def _client_cause(slo: SloResult | None, broke: TableRow, base: TableRow | None) -> tuple[str, list[str]]:
    key = slo.key if slo is not None else ""
    evidence: list[str] = []
    if key == "error_rate_max":
        return "errors", evidence
    kv = broke.server.server_kv_cache_usage_max_ratio
    pre = broke.server.server_preemptions
    waiting = broke.server.server_requests_waiting_max
    if (kv is not None and kv >= KV_PRESSURE_RATIO) or (pre is not None and pre > 0):
        if kv is not None:
            evidence.append(f"KV cache up to {adaptive_percent(kv)}")
        if pre:
            evidence.append(f"{plain_number(pre)} preemptions")
        return "kv_cache", evidence
    ttft_g = _growth(broke, base, "ttft_p50_ms")
    tpot_g = _growth(broke, base, "tpot_p50_ms")
    if ttft_g is not None and tpot_g is not None and base is not None:
        evidence.append(
            f"from {level_text(base)}, TTFT p50 x{ttft_g:.1f} while TPOT p50 x{tpot_g:.1f}"
        )
    if waiting is not None and waiting > 0:
        evidence.append(f"up to {plain_number(waiting)} {_requests(waiting)} waiting in the server")
        return "queueing", evidence
    if ttft_g is not None and tpot_g is not None:
        if ttft_g >= MIN_GROWTH and ttft_g >= QUEUE_GROWTH_FACTOR * tpot_g:
            return "queueing", evidence
        if tpot_g >= MIN_GROWTH:
            return "decode_slowdown", evidence
    if key == "min_output_tokens_per_s":
        return "throughput", evidence
    return "unknown", evidence


def _first_pressure(rows: Sequence[TableRow]) -> str | None:
    for r in rows:
        kv = r.server.server_kv_cache_usage_max_ratio
        pre = r.server.server_preemptions
        waiting = r.server.server_requests_waiting_max
        parts = []
        if kv is not None and kv >= KV_PRESSURE_RATIO:
            parts.append(f"KV cache reached {adaptive_percent(kv)}")
        if pre:
            parts.append(f"{plain_number(pre)} preemptions")
        if waiting:
            parts.append(f"up to {plain_number(waiting)} {_requests(waiting)} waiting")
        if parts:
            return f"{', '.join(parts)} from {level_text(r)} on"
    return None


def _limits(rows: Sequence[TableRow]) -> list[str]:
    if not rows:
        return []
    limits = [
        "Samples per stage (successful requests started in the steady-state window): "
        + ", ".join(f"{level_text(r)}: {r.counts.ok_requests}" for r in rows)
        + "."
    ]
    flagged: dict[str, list[str]] = {}
    for r in rows:
        for p in r.counts.few_samples.split(","):
            if p:
                flagged.setdefault(p, []).append(level_text(r))
    for p, levels in sorted(flagged.items(), key=lambda kv: int(kv[0][1:])):
        need = math.ceil(100 / (100 - int(p[1:])))
        limits.append(f"{p} rests on fewer than {need} samples at {', '.join(levels)}: treat it as rough.")
    seen_fail = None
    for r in rows:
        if r.trust.server_stopped:
            continue
        if r.slo.slo_pass is False and seen_fail is None:
            seen_fail = r
        elif r.slo.slo_pass is True and seen_fail is not None:
            limits.append(
                f"{level_text(r)} met every SLO again after {level_text(seen_fail)} failed: "
                "results near the limit are noisy; repeat the run or lengthen the stages."
            )
            break
    for r in rows:
        if r.trust.server_stopped:
            limits.append(f"At {level_text(r)} ({r.stage_name}) the server had stopped answering: "
                          "the stage is not judged.")
        if r.window.window_note:
            limits.append(f"{level_text(r)}: {r.window.window_note}.")
        share = r.integrity.coalesced_chunk_share
        if share is not None and share > 0.2:
            limits.append(f"At {level_text(r)} {adaptive_percent(share)} of chunk gaps were 0 (chunks timestamped by one "
                          "socket read): its ITL percentiles, marked read-batched, measure reads, not the server.")
        cpu = r.trust.host_cpu_max_core_ratio
        if r.trust.trustworthy is False:
            limits.append(
                f"At {level_text(r)} ({r.stage_name}) the numbers are not trustworthy: "
                f"{r.trust.untrustworthy_reasons}; the load generator, not the server, may have set them."
            )
        elif r.trust.client_saturated:
            limits.append(
                f"At {level_text(r)} a load-generator process saturated a CPU core: not trustworthy, "
                "the client may have limited the load."
            )
        elif r.trust.client_saturated is None and cpu is not None and cpu >= 0.9:
            limits.append(
                f"At {level_text(r)} a load-generator process used {adaptive_percent(cpu)} of a core: "
                "the client may have limited the load."
            )
    return limits


def _workload(rows: Sequence[TableRow]) -> tuple[float | None, float | None]:
    outs = [r.counts.output_tokens_p50 for r in rows if finite(r.counts.output_tokens_p50)]
    prompts = [r.counts.prompt_tokens_p50 for r in rows if finite(r.counts.prompt_tokens_p50)]
    out = sorted(outs)[len(outs) // 2] if outs else None
    prompt = sorted(prompts)[len(prompts) // 2] if prompts else None
    return out, prompt


def _workload_text(f: EnvelopeFinding) -> str:
    parts = []
    if f.output_tokens is not None:
        parts.append(f"{plain_number(f.output_tokens)} output tokens")
    if f.prompt_tokens is not None:
        parts.append(f"~{_round_prompt(f.prompt_tokens)}-token prompts")
    return (" at " + " and ".join(parts)) if parts else ""


def _key_numbers(r: TableRow) -> str:
    pct = "p95"
    for s in r.slo.slo_results:
        if s.key.startswith("ttft_"):
            pct = split_key(s.key)[1]
    parts = []
    for metric in ("ttft", "e2e"):
        column = f"{metric}_{pct}_ms"
        v = r.value(column) if r.has(column) else None
        if finite(v):
            parts.append(f"{pct} {METRIC_NAMES[metric]} {_seconds(v)} s")
    parts.append(f"{_tps(r.throughput.aggregate_output_tokens_per_s)} output tokens/s")
    return ", ".join(parts)


def _concurrent(r: TableRow) -> str:
    text = level_text(r)
    if text.endswith(("user", "users")):
        count, word = text.split(" ", 1)
        return f"{count} concurrent {word}"
    return text


def _growth(a: TableRow, b: TableRow | None, column: str) -> float | None:
    if b is None:
        return None
    x, y = a.value(column), b.value(column)
    if not finite(x) or not finite(y) or y <= 0:
        return None
    return x / y


def _level(r: TableRow) -> tuple[float, int]:
    for v in (r.window.target_users, r.window.target_rate_per_s, r.window.mean_in_flight):
        if finite(v):
            return float(v), r.stage_index
    return 0.0, r.stage_index


def _f(v: Any) -> float:
    return float(v) if finite(v) else -math.inf


def _seconds(ms: float | None) -> str:
    if ms is None:
        return "?"
    s = ms / 1000.0
    return f"{s:.0f}" if s >= 10 else f"{s:.2g}"


def _tps(v: Any) -> str:
    return f"{v:.0f}" if finite(v) else "?"


def _round_prompt(tokens: float) -> str:
    if tokens >= 100:
        return str(int(round(tokens, -1)))
    return str(int(round(tokens)))
