"""What a token costs at the measured load, and how many boxes a larger load needs.

Pure formulas over figures measured elsewhere: a box's price per hour, a
stage's output tokens/s and successful requests/s (and mean GPU power when it
was sampled), and the tested boundary (the highest level that met the SLOs
with confidence). Nothing here reads files or prints.

* Per stage: ``usd_per_hour / 3600 / output_tokens_per_s x 1e6`` dollars per
  million output tokens, ``usd_per_hour / 3600 / requests_per_s`` dollars per
  request, ``power_w / output_tokens_per_s`` joules per output token.
* Capacity: ``boxes = ceil(target / per_box)``, headroom
  ``(boxes x per_box - target) / target``, and
  ``boxes x usd_per_hour x HOURS_PER_MONTH`` dollars a month.

No figure is made up: without a measured throughput there is no stage cost,
and without a boundary there is no plan (both return None). Every result
carries its formula with the inputs filled in, so a reader can redo the sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from analysis.common import adaptive_percent, finite

__all__ = [
    "HOURS_PER_MONTH",
    "DEFAULT_TARGET_MULTIPLE",
    "UNITS",
    "Price",
    "StageCost",
    "stage_cost",
    "CapacityPlan",
    "capacity_plan",
    "format_usd",
    "format_amount",
    "plan_sentence",
]

HOURS_PER_MONTH = 730.0  # 365 x 24 / 12, the usual cloud-billing month
DEFAULT_TARGET_MULTIPLE = 10.0  # with no target given, plan for this many times the tested boundary
UNITS = ("users", "requests/s")

# ceil(2.1 / 0.3) is 8 in floating point; a ratio this close to a whole number is that number
_WHOLE_TOLERANCE = 1e-9


@dataclass(frozen=True, slots=True, kw_only=True)
class Price:
    """What one box (one server as tested) costs, and where that figure came from."""

    usd_per_hour: float
    source: str  # e.g. "profile qwen3-8b" or "--usd-per-hour"

    def __post_init__(self) -> None:
        if not finite(self.usd_per_hour) or self.usd_per_hour <= 0:
            raise ValueError(f"usd_per_hour must be a positive number, got {self.usd_per_hour!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class StageCost:
    """One stage (or the boundary) priced from its measured throughput."""

    output_tokens_per_s: float  # measured (throughput over the stage's window)
    requests_per_s: float  # measured successful requests per second
    usd_per_million_output_tokens: float
    usd_per_request: float
    joules_per_output_token: float | None  # None when GPU power was not measured
    formula: str  # the formulas with this stage's inputs filled in, one line


def _measured(v: float | None) -> bool:
    return finite(v) and v > 0


def stage_cost(price: Price, *, output_tokens_per_s: float | None, requests_per_s: float | None,
               power_w: float | None = None, power_note: str = "") -> StageCost | None:
    """The cost per million output tokens and per request at one stage's measured rates.

    None when either rate is missing, zero, negative or not finite: there is
    nothing measured to divide by. ``power_w`` (mean GPU power over the same
    window) gives joules per output token; without it (or non-positive) that is None.
    ``power_note`` says where that power came from, in the formula (``stated, not measured``).
    """
    if not _measured(output_tokens_per_s) or not _measured(requests_per_s):
        return None
    usd_per_s = price.usd_per_hour / 3600.0
    per_million = usd_per_s / output_tokens_per_s * 1e6
    per_request = usd_per_s / requests_per_s
    hourly = f"{format_usd(price.usd_per_hour)}/h / 3600 s/h"
    parts = [
        f"{hourly} / {_amount(output_tokens_per_s)} tok/s x 1e6 = {format_usd(per_million)} per 1M output tokens",
        f"{hourly} / {_amount(requests_per_s)} req/s = {format_usd(per_request)} per request",
    ]
    joules = None
    if _measured(power_w):
        joules = power_w / output_tokens_per_s
        where = f" ({power_note})" if power_note else ""
        parts.append(f"{_amount(power_w)} W{where} / {_amount(output_tokens_per_s)} tok/s"
                     f" = {_amount(joules)} J per output token")
    return StageCost(
        output_tokens_per_s=float(output_tokens_per_s),
        requests_per_s=float(requests_per_s),
        usd_per_million_output_tokens=per_million,
        usd_per_request=per_request,
        joules_per_output_token=joules,
        formula="; ".join(parts),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class CapacityPlan:
    """How many boxes a target load needs at the tested boundary, and what they cost a month."""

    unit: str  # "users" or "requests/s"
    per_box: float  # the highest level that met the SLOs with confidence (the bracket's lower end)
    per_box_high: float | None  # the lowest level that failed (the bracket's upper end), when known
    target: float
    target_source: str  # "default: 10x the tested boundary" or "--target-users 500" ...
    boxes: int  # ceil(target / per_box)
    headroom_ratio: float  # (boxes x per_box - target) / target: spare capacity at the boundary
    usd_per_month: float  # boxes x usd_per_hour x HOURS_PER_MONTH
    formula: str  # inputs and formulas, two lines


def format_amount(v: float) -> str:
    """A level or rate: whole numbers grouped (``1,200``), others to three significant digits (``12.5``, ``0.35``)."""
    v = float(v)
    return f"{v:,.0f}" if v == int(v) or abs(v) >= 100 else f"{v:.3g}"


_amount = format_amount


def _boxes(target: float, per_box: float) -> int:
    ratio = target / per_box
    nearest = round(ratio)
    if abs(ratio - nearest) <= _WHOLE_TOLERANCE * max(1.0, ratio):
        return max(1, nearest)
    return max(1, math.ceil(ratio))


def capacity_plan(price: Price, *, per_box: float | None, per_box_high: float | None, unit: str,
                  target: float | None = None, target_source: str | None = None) -> CapacityPlan | None:
    """The boxes needed to serve ``target`` at the tested boundary ``per_box``, and their monthly cost.

    None when ``per_box`` is missing, not finite or not positive: no boundary
    was found, and none is invented. Without ``target`` the plan is for
    10x the boundary. Raises ValueError for an unknown ``unit``, a ``target``
    that is not a positive number, a ``target_source`` without a ``target``,
    or a ``per_box_high`` that is not above ``per_box``.
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    if target is None and target_source is not None:
        raise ValueError("target_source given without a target")
    if target is not None and (not finite(target) or target <= 0):
        raise ValueError(f"target must be a positive number, got {target!r}")
    if not _measured(per_box):
        return None
    if per_box_high is not None and (not finite(per_box_high) or per_box_high <= per_box):
        raise ValueError(f"per_box_high must be above per_box ({per_box!r}), got {per_box_high!r}")
    if target is None:
        target = per_box * DEFAULT_TARGET_MULTIPLE
        target_source = f"default: {DEFAULT_TARGET_MULTIPLE:g}x the tested boundary"
    elif target_source is None:
        target_source = f"given: {_amount(target)} {unit}"
    boxes = _boxes(target, per_box)
    headroom = (boxes * per_box - target) / target
    headroom = 0.0 if headroom < _WHOLE_TOLERANCE else headroom  # float dust from a whole ratio
    usd_per_month = boxes * price.usd_per_hour * HOURS_PER_MONTH
    bracket = ("" if per_box_high is None
               else f", first failure at {_amount(per_box_high)} {unit}")
    formula = (
        f"boxes = ceil({_amount(target)} {unit} / {_amount(per_box)} {unit} per box) = {boxes}; "
        f"headroom = ({boxes} x {_amount(per_box)} - {_amount(target)}) / {_amount(target)} = {adaptive_percent(headroom)}"
        f" (target {target_source}; boundary {_amount(per_box)} {unit} per box{bracket})\n"
        f"{boxes} {_box_word(boxes)} x {format_usd(price.usd_per_hour)}/h x {HOURS_PER_MONTH:g} h/month"
        f" = {format_usd(usd_per_month)} a month (price: {price.source})"
    )
    return CapacityPlan(
        unit=unit, per_box=float(per_box), per_box_high=None if per_box_high is None else float(per_box_high),
        target=float(target), target_source=target_source, boxes=boxes, headroom_ratio=headroom,
        usd_per_month=usd_per_month, formula=formula,
    )


def _box_word(n: int) -> str:
    return "box" if n == 1 else "boxes"


def _load(v: float, unit: str, *, concurrent: bool) -> str:
    """``400 concurrent users``, ``1 concurrent user``, ``2.5 requests/s``, ``1 request/s``."""
    one = float(v) == 1
    if unit == "users":
        return f"{_amount(v)} {'concurrent ' if concurrent else ''}{'user' if one else 'users'}"
    return f"{_amount(v)} {'request/s' if one else 'requests/s'}"


def plan_sentence(plan: CapacityPlan, price: Price) -> str:
    """The plan in one plain sentence: target, boxes, load per box, headroom and monthly cost."""
    each = "" if plan.boxes == 1 else " each"
    return (
        f"To serve {_load(plan.target, plan.unit, concurrent=True)} at these SLOs you need "
        f"{plan.boxes} {_box_word(plan.boxes)} ({_load(plan.per_box, plan.unit, concurrent=False)}{each} "
        f"at the tested boundary, {adaptive_percent(plan.headroom_ratio)} headroom): "
        f"{format_usd(plan.usd_per_month)} a month at {format_usd(price.usd_per_hour)}/h "
        f"({HOURS_PER_MONTH:g} h)."
    )


def format_usd(x: float) -> str:
    """Dollars for a sentence: ``$12,345`` from $1,000 up, ``$1.23`` from $1, else two significant digits.

    Under a dollar: at least two decimals, trailing zeros past them dropped
    (``$0.50``, ``$0.56``, ``$0.012``, ``$0.0042``, ``$0.0005``). ``?`` if not a finite number.
    """
    if not finite(x):
        return "?"
    x = float(x)
    if x < 0:
        return "-" + format_usd(-x)
    if round(x, 2) >= 1000:
        return f"${x:,.0f}"
    if round(x, 2) >= 1 or x == 0:
        return f"${x:,.2f}"
    decimals = max(2, 1 - math.floor(math.log10(x)))
    text = f"{x:.{decimals}f}"
    whole, _, frac = text.partition(".")
    frac = frac.rstrip("0").ljust(2, "0")
    return f"${whole}.{frac}"
