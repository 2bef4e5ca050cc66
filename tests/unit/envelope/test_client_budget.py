"""The per-process budget and the ``--processes auto`` rule (envelope/client_budget.py)."""

from __future__ import annotations

import json

import pytest

from envelope.client_budget import (
    BUDGET_FILE,
    ClientBudget,
    choose_processes,
    load_budget,
    load_generator_cores,
    over_budget_reason,
    scenario_peak,
)
from envelope.scenario import load_scenario

BUDGET = ClientBudget(streams_per_process=150, rate_per_s_per_process=400.0)


@pytest.mark.parametrize(("streams", "rate", "cores", "processes", "needed"), [
    (1, None, 8, 1, 1),  # well within one process: no workers
    (150, None, 8, 1, 1),  # exactly the budget still fits one
    (151, None, 8, 2, 2),
    (1000, None, 8, 7, 7),  # ceil(1000 / 150)
    (1000, None, 4, 4, 7),  # capped by the cores: short of 3
    (1000, None, 1, 1, 7),
    (None, 400.0, 8, 1, 1),
    (None, 1000.0, 8, 3, 3),  # ceil(1000 / 400)
    (100, 1000.0, 8, 3, 3),  # the larger of the two needs
    (1000, 100.0, 2, 2, 7),
    (None, None, 8, 1, 1),  # nothing known: one process
])
def test_auto_chooses_the_documented_number_of_processes(streams, rate, cores, processes, needed):
    choice = choose_processes(peak_streams=streams, peak_rate_per_s=rate, cores=cores, budget=BUDGET)
    assert (choice.processes, choice.needed) == (processes, needed)
    assert choice.locust_processes == (None if processes == 1 else processes)
    assert choice.short_of_cores == (needed > processes)


def test_too_few_cores_gives_one_warning_line_naming_the_load_and_the_budget():
    short = choose_processes(peak_streams=1000, cores=2, budget=BUDGET)
    line = short.warning()
    assert line is not None and "\n" not in line
    assert line == ("this machine has 2 cores for the load generator but the scenario's peak (peak 1000 streams) "
                    "needs 7 processes (one process times 150 streams or paces 400 requests/s accurately); stages "
                    "above the budget will be flagged in the report")
    assert choose_processes(peak_streams=1000, cores=8, budget=BUDGET).warning() is None
    assert choose_processes(peak_streams=1000, cores=8, budget=BUDGET).describe() == (
        "7 load-generator processes (peak 1000 streams; one process times 150 streams or paces 400 requests/s "
        "accurately; 8 cores)")


def test_cores_leave_two_for_a_server_launched_here():
    assert load_generator_cores(server_here=False, available=16) == 16
    assert load_generator_cores(server_here=True, available=16) == 14
    assert load_generator_cores(server_here=True, available=2) == 1  # never below one


SCENARIO = """
name: peaks
clients:
  - {name: chat, weight: 1}
  - {name: batch, rate_per_s: 5}
passes:
  - name: closed
    stages:
      - {users: 40, duration_s: 10}
      - {users: 300, duration_s: 10}
  - name: open
    stages:
      - {rate_per_s: 250, duration_s: 10, max_concurrency: 500}
  - name: search
    slos: {ttft_p95_ms: 500}
    search: {over: users, start: 4, max: 700}
"""


def test_the_peak_covers_closed_and_open_stages_searches_and_quotas():
    stages = load_scenario("peaks.yaml", text=SCENARIO).resolve()
    peak = scenario_peak(stages)
    # the search may climb to its max; the open stage's cap is streams; quotas add to every rate
    assert peak.streams == 700
    assert peak.rate_per_s == 255.0
    only_closed = scenario_peak([s for s in stages if s.pass_name == "closed"])
    assert (only_closed.streams, only_closed.rate_per_s) == (300, 5.0)


def test_the_stored_budget_reads_and_says_how_it_was_measured():
    budget = load_budget()
    assert budget.streams_per_process >= 1 and budget.rate_per_s_per_process > 0
    assert budget.method and budget.measured_on  # the project stores its reasoning with the numbers
    data = json.loads(BUDGET_FILE.read_text(encoding="utf-8"))
    assert data["streams_per_process"] == budget.streams_per_process


def test_a_budget_named_by_the_environment_wins_and_a_bad_one_is_one_line(tmp_path, monkeypatch):
    mine = tmp_path / "budget.json"
    mine.write_text(json.dumps({"streams_per_process": 42, "rate_per_s_per_process": 7}))
    monkeypatch.setenv("ENVELOPE_CLIENT_BUDGET", str(mine))
    assert load_budget().streams_per_process == 42
    mine.write_text(json.dumps({"streams_per_process": 0, "rate_per_s_per_process": 7}))
    with pytest.raises(ValueError, match=r"budget.json: streams_per_process must be a positive integer \(got 0\)"):
        load_budget()
    monkeypatch.setenv("ENVELOPE_CLIENT_BUDGET", str(tmp_path / "absent.json"))
    with pytest.raises(ValueError, match=r"absent.json: cannot read the load-generator budget"):
        load_budget()


def test_a_stage_over_its_budget_per_process_says_why():
    kw = dict(streams_budget=150, rate_budget_per_s=400.0)
    assert over_budget_reason(kind="users", target_users=300, target_rate_per_s=None, processes=2, **kw) is None
    assert over_budget_reason(kind="users", target_users=301, target_rate_per_s=None, processes=2, **kw) == (
        "load generator over its budget: 151 streams per process (2 processes), where one times 150 accurately "
        "(envelope/client_budget.json); TTFT and ITL include its own delays")
    assert over_budget_reason(kind="rate", target_users=None, target_rate_per_s=1000.0, processes=2, **kw) == (
        "load generator over its budget: 500 requests/s per process (2 processes), where one paces 400/s "
        "accurately (envelope/client_budget.json); send lag and TTFT include its own delays")
    assert over_budget_reason(kind="rate", target_users=None, target_rate_per_s=800.0, processes=2, **kw) is None
    # stages from before the budget was recorded are not judged
    assert over_budget_reason(kind="users", target_users=10_000, target_rate_per_s=None, processes=None, **kw) is None
