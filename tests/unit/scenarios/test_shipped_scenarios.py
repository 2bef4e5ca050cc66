"""Every scenario shipped in scenarios/ loads, resolves and fits its intended server."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from envelope.scenario import check_against_server, load_scenario
from envelope.shape import total_duration_s

SCENARIOS = Path(__file__).resolve().parents[3] / "scenarios"
FILES = sorted(SCENARIOS.glob("*.yaml"))

# The cpu-tiny server profile the capstone is written for.
CPU_TINY_MAX_MODEL_LEN = 4096
CPU_TINY_KV_CACHE_TOKENS = 16384


def test_the_expected_scenarios_are_shipped():
    assert {"capstone.yaml", "smoke.yaml", "chat-mixed.yaml"} <= {p.name for p in FILES}


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_scenario_loads_and_resolves(path):
    scenario = load_scenario(path)
    assert scenario.name == path.stem
    for quick in (False, True):
        stages = scenario.resolve(quick=quick)
        assert stages
        for stage in stages:
            record = stage.record()
            assert record.stage_name == stage.name
            assert record.slos, f"{stage.name} has no SLOs"


def test_capstone_passes_and_sizes():
    scenario = load_scenario(SCENARIOS / "capstone.yaml")
    assert scenario.model is None
    stages = scenario.resolve()
    assert [(s.pass_name, s.users) for s in stages] == [
        ("alive", 1),
        ("batching", 5),
        ("queueing", 20),
        ("long-context", 6),
        ("chat-search", 4),  # the first probes of the two searches
        ("long-context-search", 4),
    ]
    fixed, searches = stages[:4], stages[4:]
    assert all(60 <= s.duration_s <= 120 for s in fixed)
    assert all(s.search is not None for s in searches)
    # quick mode: at most ~3 minutes of fixed load, then the searches' budgets (a probe held for more requests
    # may overrun by its extra time): make demo stays well under 15 minutes on 2 cores
    quick = scenario.resolve(quick=True)
    assert total_duration_s(quick[:4]) <= 180
    assert sum(s.search.budget_s + s.search.probe_cap_s - s.search.probe_s for s in quick[4:]) <= 9 * 60
    # the searches judge every request against explicit thresholds
    assert searches[0].slos["ttft_ms"] == 500 and searches[0].slos["tpot_ms"] == 20

    alive = stages[0].clients[0].workload
    assert (alive.prompt_tokens, alive.output_tokens, alive.long_context) == (300, 128, False)

    # long context: 6 users whose requests together exceed the KV cache
    long = stages[3].clients[0].workload
    assert long.long_context and long.output_tokens == 256
    per_request_tokens = math.floor(long.context_fill_ratio * CPU_TINY_MAX_MODEL_LEN)
    assert 6 * per_request_tokens > CPU_TINY_KV_CACHE_TOKENS
    assert check_against_server(scenario, max_model_len=CPU_TINY_MAX_MODEL_LEN) == []

    # the queueing pass is judged by the same TTFT target as the alive pass
    assert stages[2].slos["ttft_p95_ms"] == stages[0].slos["ttft_p95_ms"] == 1000


def test_smoke_is_short():
    stages = load_scenario(SCENARIOS / "smoke.yaml").resolve()
    assert [(s.users, s.duration_s) for s in stages] == [(1, 10.0), (2, 10.0)]
    assert all(s.clients[0].workload.output_tokens == 32 for s in stages)


def test_chat_mixed_clients():
    scenario = load_scenario(SCENARIOS / "chat-mixed.yaml")
    stage = scenario.resolve()[0]
    by_name = {c.name: c for c in stage.clients}
    assert set(by_name) == {"chat-app", "eval-runner", "admin-console"}
    assert by_name["eval-runner"].endpoint == "completions"
    assert by_name["chat-app"].workload.system_prefix_tokens > 0
    assert check_against_server(scenario, max_model_len=8192) == []
