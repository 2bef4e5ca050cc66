import dataclasses
import math
import subprocess
import sys

import pytest

import analysis.cost
from analysis.cost import (
    HOURS_PER_MONTH,
    CapacityPlan,
    Price,
    StageCost,
    capacity_plan,
    format_usd,
    plan_sentence,
    stage_cost,
)

NAN = float("nan")


def price(usd_per_hour: float, source: str = "--usd-per-hour") -> Price:
    return Price(usd_per_hour=usd_per_hour, source=source)


# --- stage cost: hand-computed tables ----------------------------------------------------------

@pytest.mark.parametrize(
    ("usd_per_hour", "tok_per_s", "req_per_s", "power_w", "per_million", "per_request", "joules"),
    [
        # $3.60/h = $0.001/s; / 1000 tok/s = $1e-6 per token -> $1.00 per 1M; / 2 req/s -> $0.0005; 350 W / 1000 -> 0.35 J
        (3.60, 1000.0, 2.0, 350.0, 1.00, 0.0005, 0.35),
        # $2.50/h = $0.000694.../s; / 1234 tok/s x 1e6 = 0.56277...; / 4 req/s = 0.000173611...; no power
        (2.50, 1234.0, 4.0, None, 2.5 / 3600 / 1234 * 1e6, 2.5 / 3600 / 4, None),
        # $7.20/h = $0.002/s; / 500 tok/s x 1e6 = $4.00 per 1M; / 0.5 req/s = $0.004; 700 W / 500 tok/s = 1.4 J
        (7.20, 500.0, 0.5, 700.0, 4.00, 0.004, 1.4),
        # $36/h = $0.01/s; / 10 tok/s x 1e6 = $1,000 per 1M; / 0.01 req/s = $1.00 per request; 100 W / 10 = 10 J
        (36.0, 10.0, 0.01, 100.0, 1000.0, 1.00, 10.0),
    ],
)
def test_stage_cost_hand_computed(usd_per_hour, tok_per_s, req_per_s, power_w, per_million, per_request, joules):
    cost = stage_cost(price(usd_per_hour), output_tokens_per_s=tok_per_s, requests_per_s=req_per_s, power_w=power_w)

    assert cost is not None
    assert cost.output_tokens_per_s == tok_per_s
    assert cost.requests_per_s == req_per_s
    assert cost.usd_per_million_output_tokens == pytest.approx(per_million)
    assert cost.usd_per_request == pytest.approx(per_request)
    if joules is None:
        assert cost.joules_per_output_token is None
    else:
        assert cost.joules_per_output_token == pytest.approx(joules)


def test_stage_cost_formula_has_the_inputs_filled_in():
    cost = stage_cost(price(3.60), output_tokens_per_s=1000.0, requests_per_s=2.0, power_w=350.0)

    assert cost.formula == (
        "$3.60/h / 3600 s/h / 1,000 tok/s x 1e6 = $1.00 per 1M output tokens; "
        "$3.60/h / 3600 s/h / 2 req/s = $0.0005 per request; "
        "350 W / 1,000 tok/s = 0.35 J per output token"
    )
    assert "\n" not in cost.formula


def test_stage_cost_formula_without_power_has_no_energy_part():
    # $2.50/h / 3600 / 1234 x 1e6 = 0.5628 -> $0.56; / 4 req/s = 0.0001736 -> $0.00017
    cost = stage_cost(price(2.50), output_tokens_per_s=1234.0, requests_per_s=4.0)

    assert cost.formula == (
        "$2.50/h / 3600 s/h / 1,234 tok/s x 1e6 = $0.56 per 1M output tokens; "
        "$2.50/h / 3600 s/h / 4 req/s = $0.00017 per request"
    )


@pytest.mark.parametrize("tok_per_s", [0.0, None, NAN, -5.0, math.inf])
def test_stage_cost_is_none_without_a_measured_throughput(tok_per_s):
    assert stage_cost(price(3.60), output_tokens_per_s=tok_per_s, requests_per_s=2.0, power_w=350.0) is None


@pytest.mark.parametrize("req_per_s", [0.0, None, NAN])
def test_stage_cost_is_none_without_a_measured_request_rate(req_per_s):
    assert stage_cost(price(3.60), output_tokens_per_s=1000.0, requests_per_s=req_per_s) is None


@pytest.mark.parametrize("power_w", [None, NAN, 0.0, -1.0])
def test_no_joules_without_a_measured_power(power_w):
    cost = stage_cost(price(3.60), output_tokens_per_s=1000.0, requests_per_s=2.0, power_w=power_w)

    assert cost.joules_per_output_token is None
    assert " W " not in cost.formula


# --- price validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("usd_per_hour", [0.0, -2.5, NAN, math.inf])
def test_price_must_be_positive(usd_per_hour):
    with pytest.raises(ValueError, match="usd_per_hour"):
        Price(usd_per_hour=usd_per_hour, source="--usd-per-hour")


def test_records_are_frozen_and_keyword_only():
    p = price(2.5, "profile qwen3-8b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.usd_per_hour = 1.0
    with pytest.raises(TypeError):
        Price(2.5, "x")
    assert repr(p) == "Price(usd_per_hour=2.5, source='profile qwen3-8b')"
    for cls in (StageCost, CapacityPlan):
        assert cls.__dataclass_params__.frozen


# --- capacity plan -----------------------------------------------------------------------------

def test_plan_exact_multiple_has_no_headroom():
    # ceil(400 / 40) = 10 boxes; (10 x 40 - 400) / 400 = 0; 10 x $2.50 x 730 h = $18,250
    plan = capacity_plan(price(2.50), per_box=40.0, per_box_high=48.0, unit="users", target=400.0,
                         target_source="--target-users 400")

    assert plan == CapacityPlan(
        unit="users", per_box=40.0, per_box_high=48.0, target=400.0, target_source="--target-users 400",
        boxes=10, headroom_ratio=0.0, usd_per_month=18_250.0, formula=plan.formula,
    )


def test_plan_one_over_a_multiple_needs_another_box():
    # ceil(401 / 40) = ceil(10.025) = 11 boxes; headroom (11 x 40 - 401) / 401 = 39 / 401 = 0.09726
    # 11 x $2.50 x 730 h = $20,075
    plan = capacity_plan(price(2.50), per_box=40.0, per_box_high=None, unit="users", target=401.0)

    assert plan.boxes == 11
    assert plan.headroom_ratio == pytest.approx((440 - 401) / 401)
    assert plan.usd_per_month == pytest.approx(20_075.0)
    assert plan.target_source == "given: 401 users"


def test_plan_default_target_is_ten_times_the_boundary():
    # 10 x 40 = 400 users -> 10 boxes, no headroom; 10 x $1.00 x 730 = $7,300
    plan = capacity_plan(price(1.00), per_box=40.0, per_box_high=None, unit="users")

    assert plan.target == 400.0
    assert plan.target_source == "default: 10x the tested boundary"
    assert plan.boxes == 10
    assert plan.headroom_ratio == 0.0
    assert plan.usd_per_month == pytest.approx(7_300.0)


def test_plan_in_requests_per_second():
    # ceil(50 / 20) = 3 boxes; headroom (60 - 50) / 50 = 0.2; 3 x $4.00 x 730 = $8,760
    plan = capacity_plan(price(4.00), per_box=20.0, per_box_high=25.0, unit="requests/s", target=50.0)

    assert plan.unit == "requests/s"
    assert plan.boxes == 3
    assert plan.headroom_ratio == pytest.approx(0.2)
    assert plan.usd_per_month == pytest.approx(8_760.0)


def test_plan_fractional_boundary_is_not_rounded_up_by_float_dust():
    # 2.1 / 0.3 is 7.000000000000001 in floating point, and (0.49 x 10) / 0.49 is 10.000000000000002:
    # still 7 and 10 boxes, 0 headroom
    assert 2.1 / 0.3 > 7 and 0.49 * 10 / 0.49 > 10
    plan = capacity_plan(price(1.00), per_box=0.3, per_box_high=None, unit="requests/s", target=2.1)
    default = capacity_plan(price(1.00), per_box=0.49, per_box_high=None, unit="requests/s")

    assert (plan.boxes, plan.headroom_ratio) == (7, 0.0)
    assert (default.boxes, default.headroom_ratio) == (10, 0.0)


def test_plan_target_below_the_boundary_is_one_box():
    # ceil(10 / 40) = 1 box; headroom (40 - 10) / 10 = 3.0; 1 x $2.50 x 730 = $1,825
    plan = capacity_plan(price(2.50), per_box=40.0, per_box_high=None, unit="users", target=10.0)

    assert plan.boxes == 1
    assert plan.headroom_ratio == pytest.approx(3.0)
    assert plan.usd_per_month == pytest.approx(1_825.0)


def test_plan_formula_has_the_inputs_filled_in():
    plan = capacity_plan(price(2.50, "profile qwen3-8b"), per_box=40.0, per_box_high=48.0, unit="users",
                         target=401.0, target_source="--target-users 401")

    assert plan.formula == (
        "boxes = ceil(401 users / 40 users per box) = 11; headroom = (11 x 40 - 401) / 401 = 9.7%"
        " (target --target-users 401; boundary 40 users per box, first failure at 48 users)\n"
        "11 boxes x $2.50/h x 730 h/month = $20,075 a month (price: profile qwen3-8b)"
    )


@pytest.mark.parametrize("per_box", [None, 0.0, -3.0, NAN])
def test_plan_is_none_without_a_boundary(per_box):
    assert capacity_plan(price(2.50), per_box=per_box, per_box_high=None, unit="users", target=400.0) is None


@pytest.mark.parametrize("target", [0.0, -10.0, NAN])
def test_plan_target_must_be_positive(target):
    with pytest.raises(ValueError, match="target"):
        capacity_plan(price(2.50), per_box=40.0, per_box_high=None, unit="users", target=target)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"unit": "rps"}, "unit"),
        ({"target_source": "--target-users 9"}, "target_source"),
        ({"per_box_high": 40.0}, "per_box_high"),
        ({"per_box_high": 30.0}, "per_box_high"),
    ],
)
def test_plan_rejects_inconsistent_arguments(kwargs, match):
    args = {"per_box": 40.0, "per_box_high": None, "unit": "users"} | kwargs
    with pytest.raises(ValueError, match=match):
        capacity_plan(price(2.50), **args)


# --- the sentence ------------------------------------------------------------------------------

def test_sentence_plural():
    p = price(2.50)
    plan = capacity_plan(p, per_box=40.0, per_box_high=None, unit="users", target=400.0)

    assert plan_sentence(plan, p) == (
        "To serve 400 concurrent users at these SLOs you need 10 boxes "
        "(40 users each at the tested boundary, 0% headroom): $18,250 a month at $2.50/h (730 h)."
    )


def test_sentence_singular_box():
    # 1 x $1.25 x 730 = $912.50; headroom (40 - 30) / 30 = 33%
    p = price(1.25)
    plan = capacity_plan(p, per_box=40.0, per_box_high=None, unit="users", target=30.0)

    assert plan_sentence(plan, p) == (
        "To serve 30 concurrent users at these SLOs you need 1 box "
        "(40 users at the tested boundary, 33% headroom): $912.50 a month at $1.25/h (730 h)."
    )


def test_sentence_requests_per_second():
    p = price(4.00)
    plan = capacity_plan(p, per_box=12.5, per_box_high=None, unit="requests/s", target=50.0)

    # ceil(50 / 12.5) = 4 boxes, no headroom; 4 x $4.00 x 730 = $11,680
    assert plan_sentence(plan, p) == (
        "To serve 50 requests/s at these SLOs you need 4 boxes "
        "(12.5 requests/s each at the tested boundary, 0% headroom): $11,680 a month at $4.00/h (730 h)."
    )


def test_sentence_one_user_and_one_request_per_second():
    p = price(1.00)
    users = capacity_plan(p, per_box=1.0, per_box_high=None, unit="users", target=1.0)
    rate = capacity_plan(p, per_box=1.0, per_box_high=None, unit="requests/s", target=1.0)

    assert plan_sentence(users, p).startswith("To serve 1 concurrent user at these SLOs you need 1 box (1 user at")
    assert plan_sentence(rate, p).startswith("To serve 1 request/s at these SLOs you need 1 box (1 request/s at")


# --- dollars -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("usd", "text"),
    [
        (0.0042, "$0.0042"),
        (0.0005, "$0.0005"),
        (0.000173611, "$0.00017"),
        (0.0123, "$0.012"),
        (0.0999, "$0.10"),
        (0.5, "$0.50"),
        (0.5628, "$0.56"),
        (0.9999, "$1.00"),
        (1.0, "$1.00"),
        (1.234, "$1.23"),
        (2.5, "$2.50"),
        (912.5, "$912.50"),
        (999.999, "$1,000"),
        (12_345.0, "$12,345"),
        (18_250.0, "$18,250"),
        (0.0, "$0.00"),
        (-1.5, "-$1.50"),
        (NAN, "?"),
        (None, "?"),
    ],
)
def test_format_usd(usd, text):
    assert format_usd(usd) == text


def test_hours_per_month():
    assert HOURS_PER_MONTH == 730.0  # 365 x 24 / 12


def test_public_api():
    assert set(analysis.cost.__all__) == {
        "HOURS_PER_MONTH", "DEFAULT_TARGET_MULTIPLE", "UNITS", "Price", "StageCost", "stage_cost",
        "CapacityPlan", "capacity_plan", "format_usd", "format_amount", "plan_sentence",
    }
    for name in analysis.cost.__all__:
        assert hasattr(analysis.cost, name)


def test_pure_no_heavy_imports():
    # cost formulas must not pull in pandas, numpy or matplotlib
    code = ("import sys, analysis.cost; "
            "print(sorted(m for m in ('pandas', 'numpy', 'matplotlib', 'locust') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
