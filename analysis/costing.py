"""A run's costs: where its price comes from, each stage priced, and a capacity plan per pass.

:mod:`analysis.cost` holds the formulas; this module feeds them what a run
measured. The price of a box is taken, in this order, from what the caller
gives (``envelope report --usd-per-hour``), from ``run.json``'s options
(``envelope run --usd-per-hour``) or from ``server.json`` (the server
profile's ``usd_per_hour``); a stated power draw (``power_w``) the same way.
Targets for the plan (``target_users``, ``target_rate_per_s``) come from the
caller or ``run.json``; without one the plan is for 10x the tested boundary.

Per stage: output tokens/s is the table's aggregate throughput, requests/s is
the window's successful requests over its length, and power is the mean over
the window of the GPUs' NVML power summed at each sample. Without NVML
samples, a stated power gives joules per token labelled "stated, not
measured". Without a price there are no dollar figures at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from analysis import cost
from analysis.boundary import PassBoundary
from analysis.common import finite
from analysis.cost import CapacityPlan, Price, StageCost, format_amount
from analysis.load import run_start_unix_s
from analysis.rows import TableRow

__all__ = [
    "NO_PRICE_LINE",
    "STATED_POWER_NOTE",
    "StatedPower",
    "Targets",
    "StageCostLine",
    "PassCost",
    "RunCosts",
    "run_price",
    "run_stated_power",
    "run_targets",
    "window_power_w",
    "ok_requests_per_s",
    "run_costs",
]

NO_PRICE_LINE = (
    "No price for the box, so no costs: give --usd-per-hour to 'envelope run' or 'envelope report', "
    "or set usd_per_hour in the server profile."
)
STATED_POWER_NOTE = "stated, not measured"


@dataclass(frozen=True, slots=True, kw_only=True)
class StatedPower:
    """The box's power draw as someone stated it (not measured), and where that figure came from."""

    power_w: float
    source: str  # "--power-w", "--power-w (run.json)" or "profile cpu-tiny"


@dataclass(frozen=True, slots=True, kw_only=True)
class Targets:
    """The load a capacity plan is for, per unit; None: the default (10x the tested boundary)."""

    users: float | None = None
    users_source: str | None = None
    rate_per_s: float | None = None
    rate_source: str | None = None

    def for_unit(self, unit: str) -> tuple[float | None, str | None]:
        """(target, its source) for a pass measured in ``unit`` ("users" or "requests/s")."""
        if unit == "users":
            return self.users, self.users_source
        return self.rate_per_s, self.rate_source


@dataclass(frozen=True, slots=True, kw_only=True)
class StageCostLine:
    """One table row priced: its cost (None without a price or a measured rate) and its energy per token.

    ``power_w``: the GPUs' mean NVML power over the window (``power_measured`` True), else the stated
    power (False), else None. ``gpu_samples``: NVML sample times in the window with every GPU's power.
    ``joules_per_output_token`` = power_w / output_tokens_per_s, with or without a price (None without
    power or throughput); ``energy_formula`` shows that sum.
    """

    pass_name: str
    stage_name: str
    stage_index: int
    output_tokens_per_s: float | None
    requests_per_s: float | None
    power_w: float | None
    power_measured: bool
    gpu_samples: int
    joules_per_output_token: float | None
    energy_formula: str | None
    cost: StageCost | None
    reason: str | None  # why there is no cost, when there is none


@dataclass(frozen=True, slots=True, kw_only=True)
class PassCost:
    """One pass: the cost at its boundary and the capacity plan, or why there is none."""

    pass_name: str
    unit: str  # "users" | "requests/s"
    per_box: float | None  # the pass's boundary: the highest level that met the SLOs
    at_boundary: StageCostLine | None  # the stage at the boundary, priced
    plan: CapacityPlan | None
    sentence: str | None  # cost.plan_sentence, with cautions appended
    reason: str | None  # why there is no plan


@dataclass(frozen=True, slots=True, kw_only=True)
class RunCosts:
    """Everything the report and envelope.json say about cost: the price, each stage, each pass."""

    price: Price | None
    stated_power: StatedPower | None
    stages: tuple[StageCostLine, ...]
    passes: tuple[PassCost, ...]
    notes: tuple[str, ...] = ()  # inputs that were ignored (a price of 0 in run.json ...)

    @property
    def has_energy(self) -> bool:
        return any(s.joules_per_output_token is not None for s in self.stages)


def _positive(v: Any) -> bool:
    return finite(v) and v > 0


def _from_files(run: Any, key: str, notes: list[str]) -> tuple[float, str] | None:
    """``key`` from run.json's options (a flag of envelope run), else server.json (the profile)."""
    options: Mapping[str, Any] = getattr(getattr(run, "info", None), "options", None) or {}
    server: Mapping[str, Any] = getattr(run, "server", None) or {}
    flag = "--" + key.replace("_", "-")
    for where, source, mapping in (("run.json options", f"{flag} (run.json)", options),
                                   ("server.json", None, server)):
        v = mapping.get(key)
        if v is None:
            continue
        if not _positive(v):
            notes.append(f"{where}: {key} = {v!r} is not a positive number: ignored.")
            continue
        if source is None:
            profile = server.get("profile")
            source = f"profile {profile}" if isinstance(profile, str) and profile else "server.json"
        return float(v), source
    return None


def run_price(run: Any, *, usd_per_hour: float | None = None, notes: list[str] | None = None) -> Price | None:
    """The price of one box: ``usd_per_hour`` given here, else run.json's options, else server.json's profile.

    None when none of them gives one. A non-positive value given here raises ValueError; one read from a
    file is ignored (and said in ``notes``).
    """
    if usd_per_hour is not None:
        return Price(usd_per_hour=float(usd_per_hour), source="--usd-per-hour")
    found = _from_files(run, "usd_per_hour", notes if notes is not None else [])
    return None if found is None else Price(usd_per_hour=found[0], source=found[1])


def run_stated_power(run: Any, *, power_w: float | None = None,
                     notes: list[str] | None = None) -> StatedPower | None:
    """The box's stated power draw, with the same precedence as :func:`run_price`; None when not stated."""
    if power_w is not None:
        if not _positive(power_w):
            raise ValueError(f"power_w must be a positive number, got {power_w!r}")
        return StatedPower(power_w=float(power_w), source="--power-w")
    found = _from_files(run, "power_w", notes if notes is not None else [])
    return None if found is None else StatedPower(power_w=found[0], source=found[1])


def run_targets(run: Any, *, target_users: float | None = None, target_rate_per_s: float | None = None,
                notes: list[str] | None = None) -> Targets:
    """The plan's targets: given here, else run.json's options; a non-positive one given here raises ValueError."""
    options: Mapping[str, Any] = getattr(getattr(run, "info", None), "options", None) or {}
    notes = notes if notes is not None else []
    out: dict[str, Any] = {}
    for key, given, flag, field in (("target_users", target_users, "--target-users", "users"),
                                    ("target_rate_per_s", target_rate_per_s, "--target-rate", "rate_per_s")):
        source_field = "users_source" if field == "users" else "rate_source"
        if given is not None:
            if not _positive(given):
                raise ValueError(f"{key} must be a positive number, got {given!r}")
            out[field], out[source_field] = float(given), f"{flag} {format_amount(given)}"
            continue
        v = options.get(key)
        if v is None:
            continue
        if not _positive(v):
            notes.append(f"run.json options: {key} = {v!r} is not a positive number: ignored.")
            continue
        out[field], out[source_field] = float(v), f"{flag} {format_amount(v)} (run.json)"
    return Targets(**out)


def window_power_w(gpu: Any, start_unix_s: float, end_unix_s: float) -> tuple[float | None, int]:
    """Mean GPU power (W) over ``[start_unix_s, end_unix_s]`` and the number of samples it rests on.

    ``gpu``: NVML samples, one row per GPU per sample (columns ``t_unix_s`` and ``power_w``). At each
    sample time the GPUs' power is summed; a time at which any GPU gave no power is left out (a sum
    over part of the box would understate it). (None, 0) without a usable sample in the window.
    """
    if gpu is None or getattr(gpu, "empty", True) or not {"t_unix_s", "power_w"} <= set(gpu.columns):
        return None, 0
    if not (finite(start_unix_s) and finite(end_unix_s)) or end_unix_s < start_unix_s:
        return None, 0
    t = gpu["t_unix_s"].astype(float)
    inside = gpu[(t >= start_unix_s) & (t <= end_unix_s)]
    totals = []
    for _, group in inside.groupby("t_unix_s", sort=True):
        watts = [float(v) if finite(v) else math.nan for v in group["power_w"].tolist()]
        if watts and all(math.isfinite(w) and w >= 0 for w in watts):
            totals.append(sum(watts))
    if not totals:
        return None, 0
    return sum(totals) / len(totals), len(totals)


def ok_requests_per_s(row: TableRow) -> float | None:
    """Successful requests per second over the row's window: ``ok_requests / window_s`` (None without a window)."""
    window_s = row.window.window_s
    if not _positive(window_s):
        return None
    return row.counts.ok_requests / float(window_s)


def _stage_line(row: TableRow, price: Price | None, stated: StatedPower | None, gpu: Any,
                zero_unix_s: float) -> StageCostLine:
    w = row.window
    tok = row.throughput.aggregate_output_tokens_per_s
    tok = float(tok) if finite(tok) else None
    req = ok_requests_per_s(row)
    measured, samples = window_power_w(gpu, zero_unix_s + w.window_start_s, zero_unix_s + w.window_end_s)
    power = measured if measured is not None else (stated.power_w if stated is not None else None)
    if measured is not None:
        note = f"mean NVML power of the GPUs over the window, {samples} sample(s)"
    elif stated is not None:
        note = f"{STATED_POWER_NOTE}: {stated.source}"
    else:
        note = ""
    joules = energy = None
    if power is not None and _positive(tok):
        joules = power / tok
        energy = (f"{format_amount(power)} W ({note}) / {format_amount(tok)} tok/s"
                  f" = {format_amount(joules)} J per output token")
    line = dict(pass_name=w.pass_name, stage_name=w.stage_name, stage_index=w.stage_index,
                output_tokens_per_s=tok, requests_per_s=req, power_w=power,
                power_measured=measured is not None, gpu_samples=samples,
                joules_per_output_token=joules, energy_formula=energy)
    if price is None:
        return StageCostLine(**line, cost=None, reason="no price")
    c = cost.stage_cost(price, output_tokens_per_s=tok, requests_per_s=req, power_w=power, power_note=note)
    reason = None if c is not None else "no measured throughput or successful requests in the window"
    return StageCostLine(**line, cost=c, reason=reason)


_NO_BOUNDARY = {
    "no_slos": "the pass has no SLOs to meet",
    "no_data": "the pass has no measured stage",
    "empty": "the search ran no probe",
    "server_stopped": "the server stopped answering before any stage passed",
}


def _pass_cost(b: PassBoundary, lines: Mapping[tuple[str, int], StageCostLine], price: Price | None,
               targets: Targets) -> PassCost:
    at = lines.get((b.pass_name, b.safe_row.stage_index)) if b.safe_row is not None else None
    base = dict(pass_name=b.pass_name, unit=b.unit, per_box=b.passed_level, at_boundary=at)
    if b.passed_level is None or not _positive(b.passed_level):
        why = _NO_BOUNDARY.get(b.status, "no level met the SLOs" + (" with confidence" if b.confident else ""))
        return PassCost(**base, plan=None, sentence=None, reason=f"no boundary: {why}")
    if price is None:
        return PassCost(**base, plan=None, sentence=None, reason="no price")
    target, source = targets.for_unit(b.unit)
    high = b.failed_level if b.failed_level is not None and b.failed_level > b.passed_level else None
    plan = cost.capacity_plan(price, per_box=b.passed_level, per_box_high=high, unit=b.unit,
                              target=target, target_source=source)
    if plan is None:  # defensive: passed_level was checked above
        return PassCost(**base, plan=None, sentence=None, reason="no boundary")
    sentence = cost.plan_sentence(plan, price)
    if b.failed_level is None:
        sentence += " No level tested failed, so a box may serve more: this is an upper bound on boxes."
    if not b.confident:
        sentence += " The boundary is a stage's own verdict, without an attainment interval."
    if b.safe_row is not None and b.safe_row.trust.trustworthy is False:
        sentence += " The stage at the boundary is flagged NOT TRUSTWORTHY."
    return PassCost(**base, plan=plan, sentence=sentence, reason=None)


def run_costs(run: Any, rows: Sequence[TableRow], boundaries: Sequence[PassBoundary], *,
              price: Price | None = None, power_w: float | None = None, target_users: float | None = None,
              target_rate_per_s: float | None = None, zero_unix_s: float | None = None) -> RunCosts:
    """Price every row and plan every pass with a boundary.

    ``price``, ``power_w``, ``target_users``, ``target_rate_per_s`` override run.json and server.json
    (see :func:`run_price`). ``zero_unix_s``: the time the rows' windows count from (default
    :func:`analysis.load.run_start_unix_s`).
    """
    notes: list[str] = []
    price = price if price is not None else run_price(run, notes=notes)
    stated = run_stated_power(run, power_w=power_w, notes=notes)
    targets = run_targets(run, target_users=target_users, target_rate_per_s=target_rate_per_s, notes=notes)
    zero = run_start_unix_s(run) if zero_unix_s is None else zero_unix_s
    gpu = (getattr(run, "telemetry", None) or {}).get("gpu")
    lines = tuple(_stage_line(r, price, stated, gpu, zero) for r in rows)
    by_key = {(s.pass_name, s.stage_index): s for s in lines}
    passes = tuple(_pass_cost(b, by_key, price, targets) for b in boundaries)
    return RunCosts(price=price, stated_power=stated, stages=lines, passes=passes, notes=tuple(notes))
