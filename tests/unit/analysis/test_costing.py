"""A run's costs: the price's source, each stage priced from hand-computed tables, GPU power, the plan."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pandas as pd
import pytest

from analysis.boundary import PassBoundary
from analysis.cost import Price
from analysis.costing import (
    STATED_POWER_NOTE,
    Targets,
    ok_requests_per_s,
    run_costs,
    run_price,
    run_stated_power,
    run_targets,
    window_power_w,
)
from analysis.rows import TableRow

ZERO = 1000.0  # the run's start: windows count seconds from here
NAN = float("nan")


def fake_run(*, options=None, server=None, gpu=None):
    info = SimpleNamespace(options=options or {}, started_unix_s=ZERO)
    return SimpleNamespace(info=info, server=server or {}, telemetry={"gpu": gpu} if gpu is not None else {},
                           stages=[], frame=[])


def row(users: int, index: int, *, tok_per_s: float, ok: int, window: tuple[float, float], pass_name="sweep",
        kind="users", rate=None) -> TableRow:
    start, end = window
    return TableRow.from_cells(
        pass_name=pass_name, stage_name=f"{pass_name}-{users}", stage_index=index, kind=kind,
        target_users=users if kind == "users" else None, target_rate_per_s=rate,
        window_start_s=start, window_end_s=end, window_s=end - start,
        requests=ok, ok_requests=ok, aggregate_output_tokens_per_s=tok_per_s,
    )


def boundary(safe: TableRow | None, fail: TableRow | None, *, passed, failed, unit="users", kind="search",
             status="bracketed", confident=True) -> PassBoundary:
    return PassBoundary(pass_name=(safe or fail).pass_name, kind=kind, unit=unit, passed_level=passed,
                        failed_level=failed, status=status, confident=confident, safe_row=safe, fail_row=fail,
                        broke_first="p95 TTFT" if fail is not None else None,
                        cause="queueing" if fail is not None else None, sentence="...")


# Two stages, hand-computed at $3.60/h = $0.001 per second:
#   4 users: 1,000 tok/s, 100 ok requests in a 50 s window = 2 req/s
#            -> $0.001 / 1000 x 1e6 = $1.00 per 1M output tokens; $0.001 / 2 = $0.0005 per request
#   8 users: 2,400 tok/s, 150 ok requests in 50 s = 3 req/s
#            -> $0.001 / 2400 x 1e6 = $0.41667 per 1M; $0.001 / 3 = $0.00033333 per request
TWO_STAGES = [
    row(4, 0, tok_per_s=1000.0, ok=100, window=(10.0, 60.0)),
    row(8, 1, tok_per_s=2400.0, ok=150, window=(70.0, 120.0)),
]


def test_two_stage_table_priced_exactly():
    costs = run_costs(fake_run(), TWO_STAGES, [], price=Price(usd_per_hour=3.60, source="--usd-per-hour"))

    first, second = costs.stages
    assert first.requests_per_s == 2.0 and second.requests_per_s == 3.0
    assert first.cost.usd_per_million_output_tokens == pytest.approx(1.00)
    assert first.cost.usd_per_request == pytest.approx(0.0005)
    assert second.cost.usd_per_million_output_tokens == pytest.approx(1e6 / 3600 * 3.6 / 2400)  # 0.41667
    assert second.cost.usd_per_million_output_tokens == pytest.approx(0.416667, rel=1e-5)
    assert second.cost.usd_per_request == pytest.approx(0.000333333, rel=1e-5)
    assert first.cost.joules_per_output_token is None and first.joules_per_output_token is None
    assert first.cost.formula == (
        "$3.60/h / 3600 s/h / 1,000 tok/s x 1e6 = $1.00 per 1M output tokens; "
        "$3.60/h / 3600 s/h / 2 req/s = $0.0005 per request"
    )


def test_ok_requests_per_s_is_successes_over_the_window():
    assert ok_requests_per_s(TWO_STAGES[0]) == 2.0
    assert ok_requests_per_s(TableRow.from_cells(ok_requests=10, window_s=NAN)) is None
    assert ok_requests_per_s(TableRow.from_cells(ok_requests=10, window_s=0.0)) is None


def test_boundary_of_8_users_at_2_usd_target_100_needs_13_boxes():
    # ceil(100 / 8) = ceil(12.5) = 13 boxes; headroom (13 x 8 - 100) / 100 = 4%; 13 x $2 x 730 h = $18,980
    safe, fail = TWO_STAGES[1], row(12, 2, tok_per_s=2500.0, ok=120, window=(130.0, 180.0))
    b = boundary(safe, fail, passed=8.0, failed=12.0)
    costs = run_costs(fake_run(), [*TWO_STAGES, fail], [b], price=Price(usd_per_hour=2.0, source="--usd-per-hour"),
                      target_users=100)

    (p,) = costs.passes
    assert p.per_box == 8.0 and p.unit == "users"
    assert p.plan.boxes == 13
    assert p.plan.headroom_ratio == pytest.approx(0.04)
    assert p.plan.usd_per_month == pytest.approx(18_980.0)
    assert p.plan.per_box_high == 12.0
    assert p.plan.target_source == "--target-users 100"
    assert p.sentence.startswith("To serve 100 concurrent users at these SLOs you need 13 boxes (8 users each")
    assert "$18,980 a month at $2.00/h" in p.sentence
    # the cost at the boundary is the safe stage's: $2/h / 3600 / 2400 tok/s x 1e6 = $0.23148; / 3 req/s = $0.00018519
    assert p.at_boundary.stage_index == 1
    assert p.at_boundary.cost.usd_per_million_output_tokens == pytest.approx(2 / 3600 / 2400 * 1e6)
    assert p.at_boundary.cost.usd_per_request == pytest.approx(2 / 3600 / 3)


def test_default_target_is_ten_times_the_boundary():
    b = boundary(TWO_STAGES[1], None, passed=8.0, failed=None, kind="stages", status="all_pass", confident=False)
    costs = run_costs(fake_run(), TWO_STAGES, [b], price=Price(usd_per_hour=2.0, source="x"))

    plan = costs.passes[0].plan
    assert plan.target == 80.0 and plan.boxes == 10 and plan.headroom_ratio == 0.0
    assert plan.target_source == "default: 10x the tested boundary"
    assert plan.per_box_high is None
    # cautions: nothing failed (a lower bound on a box), and point verdicts
    assert "No level tested failed" in costs.passes[0].sentence
    assert "without an attainment interval" in costs.passes[0].sentence


def test_targets_apply_by_unit():
    users = boundary(TWO_STAGES[1], None, passed=8.0, failed=None)
    rate_row = row(0, 5, tok_per_s=500.0, ok=100, window=(200.0, 250.0), pass_name="open", kind="rate", rate=2.0)
    rate = boundary(rate_row, None, passed=2.0, failed=None, unit="requests/s")
    costs = run_costs(fake_run(), [*TWO_STAGES, rate_row], [users, rate],
                      price=Price(usd_per_hour=1.0, source="x"), target_rate_per_s=5.0)

    by = {p.pass_name: p for p in costs.passes}
    assert by["sweep"].plan.target == 80.0  # no user target given: the default
    assert by["open"].plan.target == 5.0 and by["open"].plan.boxes == 3  # ceil(5 / 2)
    assert by["open"].plan.target_source == "--target-rate 5"


def test_no_boundary_no_plan():
    fail = TWO_STAGES[0]
    b = boundary(None, fail, passed=None, failed=4.0, status="no_pass")
    costs = run_costs(fake_run(), TWO_STAGES, [b], price=Price(usd_per_hour=2.0, source="x"))

    (p,) = costs.passes
    assert p.plan is None and p.sentence is None and p.at_boundary is None
    assert p.reason == "no boundary: no level met the SLOs with confidence"


def test_no_price_no_figures():
    b = boundary(TWO_STAGES[1], None, passed=8.0, failed=None)
    costs = run_costs(fake_run(), TWO_STAGES, [b])

    assert costs.price is None
    assert all(s.cost is None and s.reason == "no price" for s in costs.stages)
    assert all(s.joules_per_output_token is None for s in costs.stages)  # no power either
    (p,) = costs.passes
    assert p.plan is None and p.sentence is None and p.reason == "no price"
    # the measured rates are still there: they are not cost figures
    assert costs.stages[0].output_tokens_per_s == 1000.0 and costs.stages[0].requests_per_s == 2.0


def test_stage_without_throughput_has_no_cost():
    empty = row(16, 3, tok_per_s=NAN, ok=0, window=(130.0, 180.0))
    costs = run_costs(fake_run(), [empty], [], price=Price(usd_per_hour=2.0, source="x"))
    assert costs.stages[0].cost is None
    assert costs.stages[0].output_tokens_per_s is None
    assert "no measured throughput" in costs.stages[0].reason


# --- GPU power -----------------------------------------------------------------------------------

def gpu_samples(rows: list[tuple[float, int, float | None]]) -> pd.DataFrame:
    return pd.DataFrame([{"t_unix_s": t, "index": i, "name": "H200", "power_w": p} for t, i, p in rows])


def test_window_power_sums_gpus_then_averages_over_the_window():
    gpu = gpu_samples([
        (1009.0, 0, 900.0), (1009.0, 1, 900.0),  # before the window [1010, 1060]: left out
        (1010.0, 0, 100.0), (1010.0, 1, 150.0),  # 250 W
        (1020.0, 0, 120.0), (1020.0, 1, 180.0),  # 300 W
        (1030.0, 0, 110.0), (1030.0, 1, None),  # one GPU gave no power: the time is left out
        (1060.0, 0, 130.0), (1060.0, 1, 145.0),  # 275 W (the window's end is inside)
        (1061.0, 0, 900.0), (1061.0, 1, 900.0),  # after: left out
    ])
    mean, n = window_power_w(gpu, 1010.0, 1060.0)
    assert n == 3
    assert mean == pytest.approx((250.0 + 300.0 + 275.0) / 3)  # 275 W


def test_window_power_without_samples():
    assert window_power_w(None, 0.0, 10.0) == (None, 0)
    assert window_power_w(pd.DataFrame(), 0.0, 10.0) == (None, 0)
    assert window_power_w(gpu_samples([(5.0, 0, 100.0)]), 6.0, 10.0) == (None, 0)
    assert window_power_w(gpu_samples([(5.0, 0, None)]), 0.0, 10.0) == (None, 0)


def test_measured_power_gives_joules_per_token():
    # stage 0's window is [1010, 1060] in wall time: 2 GPUs at 250 and 300 W -> mean 275 W;
    # 275 W / 1000 tok/s = 0.275 J per output token. Stage 1 has no sample: no energy.
    gpu = gpu_samples([(1010.0, 0, 100.0), (1010.0, 1, 150.0), (1020.0, 0, 120.0), (1020.0, 1, 180.0)])
    costs = run_costs(fake_run(gpu=gpu), TWO_STAGES, [], price=Price(usd_per_hour=3.6, source="x"))

    first, second = costs.stages
    assert first.power_measured and first.power_w == pytest.approx(275.0) and first.gpu_samples == 2
    assert first.joules_per_output_token == pytest.approx(0.275)
    assert first.cost.joules_per_output_token == pytest.approx(0.275)
    assert "275 W (mean NVML power of the GPUs over the window, 2 sample(s)) / 1,000 tok/s = 0.275 J" \
        in first.cost.formula
    assert second.joules_per_output_token is None and not second.power_measured
    assert costs.has_energy


def test_energy_is_measured_even_without_a_price():
    gpu = gpu_samples([(1010.0, 0, 500.0)])
    costs = run_costs(fake_run(gpu=gpu), TWO_STAGES, [])
    assert costs.stages[0].cost is None
    assert costs.stages[0].joules_per_output_token == pytest.approx(0.5)  # 500 W / 1000 tok/s


def test_stated_power_is_labelled_and_measured_power_wins():
    gpu = gpu_samples([(1010.0, 0, 500.0)])  # only stage 0 has NVML samples
    costs = run_costs(fake_run(gpu=gpu, server={"profile": "h200", "power_w": 700.0}), TWO_STAGES, [],
                      price=Price(usd_per_hour=3.6, source="x"))

    first, second = costs.stages
    assert first.power_measured and first.joules_per_output_token == pytest.approx(0.5)
    assert not second.power_measured and second.power_w == 700.0
    assert second.joules_per_output_token == pytest.approx(700.0 / 2400.0)
    assert f"700 W ({STATED_POWER_NOTE}: profile h200) / 2,400 tok/s" in second.cost.formula
    assert costs.stated_power.source == "profile h200"


# --- where the price comes from -------------------------------------------------------------------

def test_price_precedence_argument_then_run_json_then_profile():
    run = fake_run(options={"usd_per_hour": 3.0}, server={"profile": "cpu-tiny", "usd_per_hour": 1.5})
    assert run_price(run, usd_per_hour=2.5) == Price(usd_per_hour=2.5, source="--usd-per-hour")
    assert run_price(run) == Price(usd_per_hour=3.0, source="--usd-per-hour (run.json)")
    run = fake_run(options={"usd_per_hour": None}, server={"profile": "cpu-tiny", "usd_per_hour": 1.5})
    assert run_price(run) == Price(usd_per_hour=1.5, source="profile cpu-tiny")
    assert run_price(fake_run(server={"profile": "cpu-tiny", "usd_per_hour": None})) is None
    assert run_price(fake_run()) is None


def test_run_costs_takes_the_given_price_over_the_files():
    run = fake_run(options={"usd_per_hour": 3.0}, server={"usd_per_hour": 1.5, "profile": "p"})
    assert run_costs(run, TWO_STAGES, []).price.source == "--usd-per-hour (run.json)"
    assert run_costs(run, TWO_STAGES, [], price=Price(usd_per_hour=9.0, source="--usd-per-hour")).price.usd_per_hour \
        == 9.0


def test_bad_prices_in_files_are_ignored_and_said():
    notes: list[str] = []
    run = fake_run(options={"usd_per_hour": 0}, server={"usd_per_hour": "cheap", "profile": "p"})
    assert run_price(run, notes=notes) is None
    assert notes == ["run.json options: usd_per_hour = 0 is not a positive number: ignored.",
                     "server.json: usd_per_hour = 'cheap' is not a positive number: ignored."]


def test_bad_price_given_raises():
    with pytest.raises(ValueError, match="usd_per_hour"):
        run_price(fake_run(), usd_per_hour=0.0)
    with pytest.raises(ValueError, match="power_w"):
        run_stated_power(fake_run(), power_w=-1.0)
    with pytest.raises(ValueError, match="target_users"):
        run_targets(fake_run(), target_users=0.0)


def test_stated_power_and_targets_precedence():
    run = fake_run(options={"power_w": 400.0, "target_users": 200, "target_rate_per_s": None},
                   server={"power_w": 700.0, "profile": "h200"})
    assert run_stated_power(run).power_w == 400.0 and run_stated_power(run).source == "--power-w (run.json)"
    assert run_stated_power(run, power_w=350.0).source == "--power-w"
    assert run_stated_power(fake_run(server={"power_w": 700.0, "profile": "h200"})).source == "profile h200"
    assert run_targets(run) == Targets(users=200.0, users_source="--target-users 200 (run.json)")
    assert run_targets(run, target_users=50, target_rate_per_s=2.5) == Targets(
        users=50.0, users_source="--target-users 50", rate_per_s=2.5, rate_source="--target-rate 2.5")
    assert run_targets(fake_run()).for_unit("users") == (None, None)


def test_records_are_frozen():
    costs = run_costs(fake_run(), TWO_STAGES, [])
    with pytest.raises(dataclasses.FrozenInstanceError):
        costs.price = None  # type: ignore[misc]
    assert not math.isnan(costs.stages[0].output_tokens_per_s)


def test_bad_target_in_run_json_is_ignored_and_said():
    notes: list[str] = []
    assert run_targets(fake_run(options={"target_rate_per_s": -2}), notes=notes) == Targets()
    assert notes == ["run.json options: target_rate_per_s = -2 is not a positive number: ignored."]


def test_no_locust_or_gevent():
    import subprocess
    import sys

    code = ("import sys, analysis.costing, analysis.envelope_json; "
            "print(sorted(m for m in ('locust', 'gevent') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
