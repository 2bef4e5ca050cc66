"""``report/envelope.json``: the run's result for programs, as one typed, versioned document.

The same figures as envelope.md, none recomputed: the table's rows
(:class:`analysis.rows.TableRow`), each pass's boundary
(:class:`analysis.boundary.PassBoundary`) and the costs
(:class:`analysis.costing.RunCosts`), copied into frozen dataclasses whose field
names carry their units. :func:`to_json` turns the document into plain JSON
values (NaN and infinity become null); :func:`write_envelope_json` writes it to
a sink. The schema is documented in docs/run-directory.md ("report/envelope.json");
:data:`SCHEMA_VERSION` changes when a field is renamed, removed or changes meaning
(adding a field does not change it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

from analysis.boundary import PassBoundary, row_level
from analysis.common import finite
from analysis.cost import HOURS_PER_MONTH, CapacityPlan, Price, plan_sentence
from analysis.costing import PassCost, RunCosts, StageCostLine
from analysis.load import Completeness, completeness as run_completeness
from analysis.rows import TableRow
from analysis.table import trust_reasons

__all__ = [
    "SCHEMA_VERSION",
    "ATTAINMENT_CONFIDENCE",
    "RunIdentity",
    "PriceDoc",
    "AttainmentDoc",
    "SloDoc",
    "TrustDoc",
    "StageCostDoc",
    "EnergyDoc",
    "StageDoc",
    "BoundaryStageDoc",
    "PlanDoc",
    "PassDoc",
    "EnvelopeDocument",
    "envelope_document",
    "to_json",
    "write_envelope_json",
]

SCHEMA_VERSION = 1
ATTAINMENT_CONFIDENCE = 0.95  # the Wilson intervals of the table (analysis.table, envelope.attainment)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunIdentity:
    """Which run this is, what it ran and against what (from run.json and server.json)."""

    run_id: str
    status: str | None
    complete: bool  # False for a partial or failed run (see ``partial_reasons``)
    partial_reasons: tuple[str, ...]
    scenario_name: str | None
    scenario_path: str | None
    scenario_sha256: str | None
    started_unix_s: float | None
    ended_unix_s: float | None
    quick: bool | None
    duration_scale: float | None
    profile: str | None
    model: str | None
    served_model_name: str | None
    engine_version: str | None  # server.json's vllm_version
    server_launched: bool | None
    missing: tuple[str, ...]  # parts of the run directory that were absent or unreadable


@dataclass(frozen=True, slots=True, kw_only=True)
class PriceDoc:
    """The price of one box and, when stated, its power draw, each with where it came from."""

    usd_per_hour: float
    source: str
    stated_power_w: float | None
    stated_power_source: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class AttainmentDoc:
    """Good requests / judged requests, with its Wilson interval and the stage's target."""

    ratio: float | None
    low_ratio: float | None
    high_ratio: float | None
    confidence_ratio: float
    target_ratio: float | None
    good_requests: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class SloDoc:
    """One SLO checked: ``measured op threshold`` (the key names the unit, e.g. ``ttft_p95_ms``)."""

    key: str
    op: str
    threshold: float
    measured: float | None
    passed: bool | None  # None: a key this version does not know
    note: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustDoc:
    """Whether the stage's numbers describe the server (not the load generator), and why not."""

    trustworthy: bool
    reasons: tuple[str, ...]
    server_stopped: bool
    over_capacity: bool | None


@dataclass(frozen=True, slots=True, kw_only=True)
class StageCostDoc:
    """A stage priced (see analysis.cost.stage_cost); ``formula`` has the inputs filled in."""

    output_tokens_per_s: float
    requests_per_s: float
    usd_per_million_output_tokens: float
    usd_per_request: float
    formula: str


@dataclass(frozen=True, slots=True, kw_only=True)
class EnergyDoc:
    """Energy per output token: power over the window / output tokens/s."""

    power_w: float
    power_measured: bool  # True: mean NVML GPU power over the window; False: stated, not measured
    power_source: str
    gpu_samples: int
    joules_per_output_token: float
    formula: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StageDoc:
    """One row of the table: which stage, its window, counts, rates, latency, attainment, SLOs, trust, cost."""

    pass_name: str
    stage_name: str
    stage_index: int
    kind: str  # "users" (closed loop) or "rate" (open loop)
    level: float | None
    unit: str  # "users" | "requests/s"
    mean_in_flight: float | None
    window_start_s: float | None  # seconds from the run's start
    window_end_s: float | None
    window_s: float | None
    requests: int
    ok_requests: int
    errors: int
    error_rate: float | None
    cancelled: int
    output_tokens_per_s: float | None
    ok_requests_per_s: float | None
    per_user_output_tokens_per_s: float | None
    achieved_rate_per_s: float | None  # open loop only
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    ttft_p99_ms: float | None
    tpot_p50_ms: float | None
    tpot_p95_ms: float | None
    tpot_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p95_ms: float | None
    itl_p99_ms: float | None
    e2e_p50_ms: float | None
    e2e_p95_ms: float | None
    e2e_p99_ms: float | None
    attainment: AttainmentDoc | None
    goodput_output_tokens_per_s: float | None
    goodput_requests_per_s: float | None
    slo_pass: bool | None
    slos: tuple[SloDoc, ...]
    trust: TrustDoc
    cost: StageCostDoc | None
    energy: EnergyDoc | None


@dataclass(frozen=True, slots=True, kw_only=True)
class BoundaryStageDoc:
    """The stage at one end of a pass's boundary."""

    stage_index: int
    stage_name: str
    level: float | None
    attainment: AttainmentDoc | None
    slo_pass: bool | None
    trustworthy: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanDoc:
    """How many boxes serve ``target`` at the boundary, and what they cost a month (see analysis.cost)."""

    unit: str
    target: float
    target_source: str
    per_box: float
    per_box_high: float | None
    boxes: int
    headroom_ratio: float
    usd_per_hour: float
    hours_per_month: float
    usd_per_month: float
    formula: str
    sentence: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PassDoc:
    """One pass: its boundary, the stages at its two ends, the cost there and the capacity plan."""

    pass_name: str
    kind: str  # "search" | "stages"
    unit: str
    status: str
    confident: bool
    passed_level: float | None
    failed_level: float | None
    broke_first: str | None
    cause: str | None
    sentence: str
    safe_stage: BoundaryStageDoc | None
    fail_stage: BoundaryStageDoc | None
    cost_at_boundary: StageCostDoc | None
    plan: PlanDoc | None
    plan_reason: str | None  # why there is no plan ("no price", "no boundary: ...")


@dataclass(frozen=True, slots=True, kw_only=True)
class EnvelopeDocument:
    """The whole of report/envelope.json."""

    schema_version: int
    run: RunIdentity
    price: PriceDoc | None
    stages: tuple[StageDoc, ...]
    passes: tuple[PassDoc, ...]
    notes: tuple[str, ...]  # cost inputs that were ignored, and why


def _num(v: Any) -> float | None:
    return float(v) if finite(v) else None


def _text(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def _scenario_name(run: Any) -> str | None:
    """The scenario's ``name:`` from the run's copy of it (scenario.yaml), else its file name without ``.yaml``."""
    run_dir = getattr(run, "run_dir", None)
    copy = Path(run_dir) / "scenario.yaml" if run_dir is not None else None
    if copy is not None and copy.is_file():
        import yaml

        try:
            data = yaml.safe_load(copy.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            data = None
        if isinstance(data, dict) and isinstance(data.get("name"), str) and data["name"]:
            return data["name"]
    scenario = run.info.scenario_path
    return Path(scenario).stem if scenario else None


def _identity(run: Any, done: Completeness) -> RunIdentity:
    info = run.info
    server: Mapping[str, Any] = run.server or {}
    options: Mapping[str, Any] = info.options or {}
    profile = _text(server.get("profile")) or _text(options.get("profile"))
    return RunIdentity(
        run_id=info.run_id or run.name, status=None if info.status is None else str(info.status),
        complete=not done.partial and done.status is not None, partial_reasons=tuple(done.reasons),
        scenario_name=_scenario_name(run), scenario_path=info.scenario_path, scenario_sha256=info.scenario_sha256,
        started_unix_s=info.started_unix_s, ended_unix_s=info.ended_unix_s, quick=info.quick,
        duration_scale=_num(options.get("duration_scale")), profile=profile,
        model=_text(server.get("model")), served_model_name=_text(server.get("served_model_name")),
        engine_version=_text(server.get("vllm_version")),
        server_launched=server.get("launched") if isinstance(server.get("launched"), bool) else None,
        missing=tuple(run.missing),
    )


def _attainment(row: TableRow) -> AttainmentDoc | None:
    g = row.goodput
    if g.attainment is None and g.good_requests is None:
        return None
    return AttainmentDoc(ratio=_num(g.attainment), low_ratio=_num(g.attainment_low),
                         high_ratio=_num(g.attainment_high), confidence_ratio=ATTAINMENT_CONFIDENCE,
                         target_ratio=_num(g.attainment_target), good_requests=g.good_requests)


def _cost(line: StageCostLine | None) -> StageCostDoc | None:
    c = line.cost if line is not None else None
    if c is None:
        return None
    return StageCostDoc(output_tokens_per_s=c.output_tokens_per_s, requests_per_s=c.requests_per_s,
                        usd_per_million_output_tokens=c.usd_per_million_output_tokens,
                        usd_per_request=c.usd_per_request, formula=c.formula)


def _energy(line: StageCostLine | None, costs: RunCosts) -> EnergyDoc | None:
    if line is None or line.joules_per_output_token is None or line.power_w is None:
        return None
    source = ("NVML" if line.power_measured
              else costs.stated_power.source if costs.stated_power is not None else "stated")
    return EnergyDoc(power_w=line.power_w, power_measured=line.power_measured, power_source=source,
                     gpu_samples=line.gpu_samples, joules_per_output_token=line.joules_per_output_token,
                     formula=line.energy_formula or "")


def _stage(row: TableRow, line: StageCostLine | None, costs: RunCosts) -> StageDoc:
    w, c, lat = row.window, row.counts, row.latency
    level, unit = row_level(row)
    window_s = w.window_s
    return StageDoc(
        pass_name=w.pass_name, stage_name=w.stage_name, stage_index=int(w.stage_index), kind=w.kind,
        level=level, unit=unit, mean_in_flight=_num(w.mean_in_flight),
        window_start_s=_num(w.window_start_s), window_end_s=_num(w.window_end_s), window_s=_num(window_s),
        requests=int(c.requests), ok_requests=int(c.ok_requests), errors=int(c.errors),
        error_rate=_num(c.error_rate), cancelled=int(c.cancelled),
        output_tokens_per_s=_num(row.throughput.aggregate_output_tokens_per_s),
        ok_requests_per_s=line.requests_per_s if line is not None else (
            c.ok_requests / window_s if finite(window_s) and window_s > 0 else None),
        per_user_output_tokens_per_s=_num(row.throughput.per_user_output_tokens_per_s),
        achieved_rate_per_s=_num(row.open_loop.achieved_rate_per_s),
        **{f"{m}_p{q}_ms": _num(getattr(lat, f"{m}_p{q}_ms")) for m in ("ttft", "tpot", "itl", "e2e")
           for q in (50, 95, 99)},
        attainment=_attainment(row),
        goodput_output_tokens_per_s=_num(row.goodput.goodput_output_tokens_per_s),
        goodput_requests_per_s=_num(row.goodput.goodput_requests_per_s),
        slo_pass=row.slo.slo_pass,
        slos=tuple(SloDoc(key=s.key, op=s.op, threshold=s.threshold, measured=_num(s.measured), passed=s.passed,
                          note=s.note) for s in row.slo.slo_results),
        trust=TrustDoc(trustworthy=bool(row.trust.trustworthy), reasons=tuple(trust_reasons(row)),
                       server_stopped=bool(row.trust.server_stopped), over_capacity=row.goodput.over_capacity),
        cost=_cost(line), energy=_energy(line, costs),
    )


def _end(row: TableRow | None) -> BoundaryStageDoc | None:
    if row is None:
        return None
    return BoundaryStageDoc(stage_index=int(row.stage_index), stage_name=row.stage_name, level=row_level(row)[0],
                            attainment=_attainment(row), slo_pass=row.slo.slo_pass,
                            trustworthy=bool(row.trust.trustworthy))


def _plan(plan: CapacityPlan | None, price: Price | None, sentence: str | None) -> PlanDoc | None:
    if plan is None or price is None:
        return None
    return PlanDoc(unit=plan.unit, target=plan.target, target_source=plan.target_source, per_box=plan.per_box,
                   per_box_high=plan.per_box_high, boxes=plan.boxes, headroom_ratio=plan.headroom_ratio,
                   usd_per_hour=price.usd_per_hour, hours_per_month=HOURS_PER_MONTH,
                   usd_per_month=plan.usd_per_month, formula=plan.formula,
                   sentence=sentence or plan_sentence(plan, price))


def _pass(b: PassBoundary, p: PassCost | None, costs: RunCosts) -> PassDoc:
    return PassDoc(
        pass_name=b.pass_name, kind=b.kind, unit=b.unit, status=b.status, confident=b.confident,
        passed_level=_num(b.passed_level), failed_level=_num(b.failed_level), broke_first=b.broke_first,
        cause=b.cause, sentence=b.sentence, safe_stage=_end(b.safe_row), fail_stage=_end(b.fail_row),
        cost_at_boundary=_cost(p.at_boundary) if p is not None else None,
        plan=_plan(p.plan, costs.price, p.sentence) if p is not None else None,
        plan_reason=(p.reason if p is not None else "no cost computed"),
    )


def envelope_document(run: Any, rows: Sequence[TableRow], boundaries: Sequence[PassBoundary], costs: RunCosts,
                      *, completeness: Completeness | None = None) -> EnvelopeDocument:
    """The document for ``run`` (an :class:`analysis.load.Run`) from its table, boundaries and costs.

    ``costs.stages`` are matched to ``rows`` by pass and stage index; ``costs.passes`` to ``boundaries``
    by pass name.
    """
    done = completeness if completeness is not None else run_completeness(run)
    lines = {(s.pass_name, s.stage_index): s for s in costs.stages}
    by_pass = {p.pass_name: p for p in costs.passes}
    price = costs.price
    sp = costs.stated_power
    return EnvelopeDocument(
        schema_version=SCHEMA_VERSION,
        run=_identity(run, done),
        price=None if price is None else PriceDoc(
            usd_per_hour=price.usd_per_hour, source=price.source,
            stated_power_w=sp.power_w if sp is not None else None,
            stated_power_source=sp.source if sp is not None else None),
        stages=tuple(_stage(r, lines.get((r.pass_name, r.stage_index)), costs) for r in rows),
        passes=tuple(_pass(b, by_pass.get(b.pass_name), costs) for b in boundaries),
        notes=tuple(costs.notes),
    )


def _plain(v: Any) -> Any:
    """JSON values only: dataclasses and mappings to objects, sequences to arrays, NaN/inf to null."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, bool) or getattr(getattr(v, "dtype", None), "kind", None) == "b":  # numpy's bool too
        return bool(v)
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        f = float(v)
        return f if math.isfinite(f) else None
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return str(v)


def to_json(doc: EnvelopeDocument) -> dict[str, Any]:
    """The document as plain JSON values, in field order (no NaN or infinity: those are null)."""
    return _plain(doc)


def write_envelope_json(doc: EnvelopeDocument, sink: TextIO) -> None:
    """Write ``doc`` to ``sink`` as indented JSON (strict: ``allow_nan=False``), one trailing newline."""
    sink.write(json.dumps(to_json(doc), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
