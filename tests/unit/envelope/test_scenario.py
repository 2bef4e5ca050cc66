"""envelope.scenario: validation with exact line numbers, merging, quick scaling, distributions."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from envelope.scenario import (
    ConfigError,
    Distribution,
    ResolvedStage,
    Scenario,
    Slos,
    Timeouts,
    Workload,
    check_against_server,
    load_scenario,
    token_lower,
    token_summary,
    token_upper,
)

# Line numbers below refer to this text; keep it stable.
BASE = """\
name: t
seed: 7
defaults:
  workload:
    prompt_tokens: 300
    output_tokens: 128
  slos:
    ttft_p95_ms: 1000
    e2e_p95_ms: 15000
passes:
  - name: p1
    stages:
      - name: s1
        users: 1
        duration_s: 60
      - users: 4
        duration_s: 30
  - name: p2
    stages:
      - {users: 2, duration_s: 10}
"""


def _write(tmp_path, text: str):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return path


def _error(tmp_path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:")
    return message[len(str(path)) :]  # ":<line>: <path>: <message>"


def _replace(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


# --- loading -------------------------------------------------------------


def test_base_loads_with_defaults(tmp_path):
    scenario = load_scenario(_write(tmp_path, BASE))
    assert scenario.name == "t"
    assert scenario.seed == 7
    assert scenario.model is None
    assert scenario.record_text is False
    assert [c.name for c in scenario.clients] == ["default"]
    assert scenario.defaults.client == "fasthttp"
    assert scenario.defaults.endpoint == "chat"
    assert scenario.quick.duration_scale == 0.25
    assert scenario.quick.min_stage_s == 10


def test_load_scenario_accepts_text():
    scenario = load_scenario("inline.yaml", text=BASE)
    assert [p.name for p in scenario.passes] == ["p1", "p2"]


# --- validation errors with exact lines -----------------------------------


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        # users <= 0, nested in a block-style stage
        ("        users: 1\n", "        users: 0\n", ":14: passes[0].stages[0].users: Input should be greater than 0 (got 0)"),
        # duration <= 0
        ("        duration_s: 60\n", "        duration_s: -5\n",
         ":15: passes[0].stages[0].duration_s: Input should be greater than 0 (got -5)"),
        # spawn_rate <= 0, a key added after line 16
        ("      - users: 4\n", "      - users: 4\n        spawn_rate: 0\n",
         ":17: passes[0].stages[1].spawn_rate: Input should be greater than 0 (got 0)"),
        # an unknown key inside a stage
        ("        duration_s: 30\n", "        duration_s: 30\n        colour: red\n",
         ":18: passes[0].stages[1].colour: unknown key 'colour'"),
        # a flow-style stage
        ("{users: 2, duration_s: 10}", "{users: 2, duration_s: 0}",
         ":20: passes[1].stages[0].duration_s: Input should be greater than 0 (got 0)"),
        # missing users: blame the stage mapping
        ("{users: 2, duration_s: 10}", "{duration_s: 10}", ":20: passes[1].stages[0]: a stage needs 'users' (closed loop), 'rate_per_s' (open loop) or 'trace'"),
        # open loop: both users and a rate, a zero rate, an unknown arrival, misplaced options
        ("{users: 2, duration_s: 10}", "{users: 2, rate_per_s: 3, duration_s: 10}",
         ":20: passes[1].stages[0].rate_per_s: a stage takes 'users' (closed loop) or 'rate_per_s' (open loop), not both"),
        ("{users: 2, duration_s: 10}", "{rate_per_s: 0, duration_s: 10}",
         ":20: passes[1].stages[0].rate_per_s: Input should be greater than 0 (got 0)"),
        ("{users: 2, duration_s: 10}", "{rate_per_s: 2, arrival: bursty, duration_s: 10}",
         ":20: passes[1].stages[0].arrival: Input should be 'constant', 'poisson' or 'gamma' (got 'bursty')"),
        ("{users: 2, duration_s: 10}", "{rate_per_s: 2, arrival: poisson, burstiness: 0.5, duration_s: 10}",
         ":20: passes[1].stages[0].burstiness: 'burstiness' applies only to 'arrival: gamma'"),
        ("{users: 2, duration_s: 10}", "{users: 2, max_concurrency: 4, duration_s: 10}",
         ":20: passes[1].stages[0].max_concurrency: 'max_concurrency' applies to open-loop stages (with 'rate_per_s'), not to 'users'"),
        ("{users: 2, duration_s: 10}", "{rate_per_s: 2, spawn_rate: 1, duration_s: 10}",
         ":20: passes[1].stages[0].spawn_rate: 'spawn_rate' applies to 'users' stages, not to 'rate_per_s'"),
        # a pass with no stages
        ("    stages:\n      - {users: 2, duration_s: 10}\n", "    stages: []\n",
         ":19: passes[1].stages: a pass needs at least one stage"),
        # duplicate pass names
        ("  - name: p2\n", "  - name: p1\n", ":18: passes[1].name: duplicate pass name 'p1'"),
        # duplicate explicit stage names across passes
        ("{users: 2, duration_s: 10}", "{name: s1, users: 2, duration_s: 10}",
         ":20: passes[1].stages[0].name: duplicate stage name 's1'"),
        # duplicate default stage names (p1-4u twice): blame the second stage
        ("        duration_s: 30\n", "        duration_s: 30\n      - {users: 4, duration_s: 5}\n",
         ":18: passes[0].stages[2]: duplicate stage name 'p1-4u'"),
        # unknown transport
        ("defaults:\n", "defaults:\n  client: grpc\n",
         ":4: defaults.client: Input should be 'fasthttp' or 'openai' (got 'grpc')"),
        # unknown endpoint
        ("defaults:\n", "defaults:\n  endpoint: embeddings\n",
         ":4: defaults.endpoint: Input should be 'chat' or 'completions' (got 'embeddings')"),
        # prompt_tokens <= 0
        ("    prompt_tokens: 300\n", "    prompt_tokens: 0\n",
         ":5: defaults.workload.prompt_tokens: Input should be greater than 0 (got 0)"),
        # prompt_tokens of the wrong type
        ("    prompt_tokens: 300\n", "    prompt_tokens: lots\n",
         ":5: defaults.workload.prompt_tokens: Input should be a valid integer (got 'lots')"),
        # context_fill_ratio outside (0, 1]
        ("    output_tokens: 128\n", "    output_tokens: 128\n    context_fill_ratio: 1.5\n",
         ":7: defaults.workload.context_fill_ratio: Input should be less than or equal to 1 (got 1.5)"),
        ("    output_tokens: 128\n", "    output_tokens: 128\n    context_fill_ratio: 0\n",
         ":7: defaults.workload.context_fill_ratio: Input should be greater than 0 (got 0)"),
        # an unknown SLO key
        ("    ttft_p95_ms: 1000\n", "    ttft_p97_ms: 1000\n", ":8: defaults.slos.ttft_p97_ms: unknown key 'ttft_p97_ms'"),
        # an SLO out of range
        ("    e2e_p95_ms: 15000\n", "    e2e_p95_ms: 15000\n    error_rate_max: 2\n",
         ":10: defaults.slos.error_rate_max: Input should be less than or equal to 1 (got 2)"),
        ("    ttft_p95_ms: 1000\n", "    ttft_p95_ms: -1\n",
         ":8: defaults.slos.ttft_p95_ms: Input should be greater than 0 (got -1)"),
        # a stage-level slos override with an unknown key
        ("        duration_s: 60\n", "        duration_s: 60\n        slos: {tfft_p95_ms: 5}\n",
         ":16: passes[0].stages[0].slos.tfft_p95_ms: unknown key 'tfft_p95_ms'"),
        # an unknown top-level key
        ("seed: 7\n", "seed: 7\nthreads: 3\n", ":3: threads: unknown key 'threads'"),
    ],
)
def test_validation_errors_name_file_line_and_path(tmp_path, old, new, expected):
    assert _error(tmp_path, _replace(old, new)) == expected


DIST_LINE = "    prompt_tokens: 300\n"


@pytest.mark.parametrize(
    ("new", "expected"),
    [
        # min > max, block style: blame the min line
        ("    prompt_tokens:\n      distribution: uniform\n      min: 500\n      max: 100\n",
         ":7: defaults.workload.prompt_tokens.min: min (500) is greater than max (100)"),
        # min > max, flow style
        ("    prompt_tokens: {distribution: normal, mean: 300, stddev: 5, min: 400, max: 300}\n",
         ":5: defaults.workload.prompt_tokens.min: min (400) is greater than max (300)"),
        ("    prompt_tokens: {distribution: normal, mean: 300, stddev: 5}\n",
         ":5: defaults.workload.prompt_tokens: a normal distribution needs 'max'"),
        ("    prompt_tokens: {distribution: uniform, min: 1, max: 5, stddev: 3}\n",
         ":5: defaults.workload.prompt_tokens.stddev: 'stddev' does not apply to a uniform distribution"),
        ("    prompt_tokens: {distribution: zipf, min: 1, max: 5}\n",
         ":5: defaults.workload.prompt_tokens.distribution: "
         "Input should be 'uniform', 'normal', 'lognormal' or 'choice' (got 'zipf')"),
        # weights <= 0
        ("    prompt_tokens:\n      distribution: choice\n      values: [128, 256]\n      weights: [3, 0]\n",
         ":8: defaults.workload.prompt_tokens.weights[1]: Input should be greater than 0 (got 0)"),
        ("    prompt_tokens: {distribution: choice, values: [128, 256], weights: [1]}\n",
         ":5: defaults.workload.prompt_tokens.weights: 'weights' has 1 entries but 'values' has 2"),
        ("    prompt_tokens: {distribution: uniform, min: 0, max: 5}\n",
         ":5: defaults.workload.prompt_tokens.min: Input should be greater than 0 (got 0)"),
    ],
)
def test_distribution_errors(tmp_path, new, expected):
    assert _error(tmp_path, _replace(DIST_LINE, new)) == expected


def test_client_errors(tmp_path):
    clients = "clients:\n  - {name: a, weight: 0}\n"
    assert _error(tmp_path, _replace("passes:\n", clients + "passes:\n")) == (
        ":11: clients[0].weight: Input should be greater than 0 (got 0)"
    )
    clients = "clients:\n  - {name: a}\n  - name: b\n    endpoint: embeddings\n"
    assert _error(tmp_path, _replace("passes:\n", clients + "passes:\n")) == (
        ":13: clients[1].endpoint: Input should be 'chat' or 'completions' (got 'embeddings')"
    )
    clients = "clients:\n  - {name: a}\n  - {name: a}\n"
    assert _error(tmp_path, _replace("passes:\n", clients + "passes:\n")) == (
        ":12: clients[1].name: duplicate client name 'a'"
    )


def test_system_prefix_must_be_shorter_than_the_prompt(tmp_path):
    text = _replace("    output_tokens: 128\n", "    output_tokens: 128\n    system_prefix_tokens: 300\n")
    assert _error(tmp_path, text) == (
        ":14: passes[0].stages[0]: stage 's1', client 'default': system_prefix_tokens (300) must be less "
        "than the shortest prompt (300); prompt_tokens includes the prefix"
    )


def test_no_passes(tmp_path):
    text = "name: t\npasses: []\n"
    assert _error(tmp_path, text) == ":2: passes: 'passes' must not be empty"


def test_yaml_syntax_error(tmp_path):
    assert _error(tmp_path, "name: t\npasses: [\n").startswith(":3: YAML syntax error")


# --- merging ---------------------------------------------------------------

MERGE = """\
name: m
defaults:
  client: openai
  timeouts: {connect_s: 1, first_token_s: 2, total_s: 3}
  workload: {prompt_tokens: 100, output_tokens: 10, temperature: 0.5, system_prefix_tokens: 5}
  slos: {ttft_p95_ms: 1000, e2e_p95_ms: 9000, error_rate_max: 0.01}
clients:
  - {name: chat, weight: 3, workload: {prompt_tokens: 200, output_tokens: 20}}
  - {name: eval, weight: 1, client: fasthttp, endpoint: completions, workload: {temperature: 1.0}}
passes:
  - name: p
    workload: {output_tokens: 30}
    slos: {ttft_p95_ms: 2000, e2e_p95_ms: null}
    timeouts: {total_s: 30}
    stages:
      - users: 2
        workload: {prompt_tokens: 400, output_tokens: null}
        slos: {ttft_p95_ms: 3000, itl_p99_ms: 50}
        timeouts: {connect_s: 7}
        duration_s: 10
      - {users: 3, spawn_rate: 0.5, duration_s: 20}
"""


def test_merge_order_defaults_client_pass_stage():
    stages = load_scenario("m.yaml", text=MERGE).resolve()
    first, second = stages

    # stage overrides pass overrides client overrides defaults, key by key
    chat, eval_ = first.clients
    assert chat.workload == Workload(
        prompt_tokens=400, output_tokens=None, temperature=0.5, system_prefix_tokens=5
    )  # prompt and output from the stage (null = free length), temperature and prefix from defaults
    assert eval_.workload == Workload(prompt_tokens=400, output_tokens=None, temperature=1.0, system_prefix_tokens=5)
    chat2, eval2 = second.clients
    assert chat2.workload == Workload(prompt_tokens=200, output_tokens=30, temperature=0.5, system_prefix_tokens=5)
    assert eval2.workload == Workload(prompt_tokens=100, output_tokens=30, temperature=1.0, system_prefix_tokens=5)

    # SLOs: null removes a target, keys never set stay absent
    assert first.slos == {"ttft_p95_ms": 3000, "error_rate_max": 0.01, "itl_p99_ms": 50}
    assert second.slos == {"ttft_p95_ms": 2000, "error_rate_max": 0.01}

    assert first.timeouts == Timeouts(connect_s=7, first_token_s=2, total_s=30)
    assert second.timeouts == Timeouts(connect_s=1, first_token_s=2, total_s=30)

    # transport and endpoint: client over defaults
    assert (chat.name, chat.weight, chat.transport, chat.endpoint) == ("chat", 3, "openai", "chat")
    assert (eval_.name, eval_.weight, eval_.transport, eval_.endpoint) == ("eval", 1, "fasthttp", "completions")


def test_resolve_indexes_names_and_spawn_rate():
    stages = load_scenario("b.yaml", text=BASE).resolve()
    assert [(s.index, s.pass_index, s.pass_name, s.name) for s in stages] == [
        (0, 0, "p1", "s1"),
        (1, 0, "p1", "p1-4u"),
        (2, 1, "p2", "p2-2u"),
    ]
    assert [(s.users, s.spawn_rate, s.duration_s) for s in stages] == [(1, 1.0, 60.0), (4, 4.0, 30.0), (2, 2.0, 10.0)]
    merged = load_scenario("m.yaml", text=MERGE).resolve()
    assert merged[1].spawn_rate == 0.5


# --- quick scaling -------------------------------------------------------------


def test_quick_scales_with_a_floor_but_never_lengthens():
    text = BASE + "quick: {duration_scale: 0.25, min_stage_s: 12}\n"
    scenario = load_scenario("q.yaml", text=text)
    # 60 * 0.25 = 15; 30 * 0.25 = 7.5 -> floor 12; 10 s is shorter than the floor -> stays 10
    assert [s.duration_s for s in scenario.resolve(quick=True)] == [15.0, 12.0, 10.0]
    assert [s.duration_s for s in scenario.resolve()] == [60.0, 30.0, 10.0]
    # an explicit scale wins over quick.duration_scale, with or without quick
    assert [s.duration_s for s in scenario.resolve(duration_scale=0.5)] == [30.0, 15.0, 10.0]
    assert [s.duration_s for s in scenario.resolve(quick=True, duration_scale=0.1)] == [12.0, 12.0, 10.0]
    with pytest.raises(ValueError):
        scenario.resolve(duration_scale=0)


def test_quick_block_is_validated(tmp_path):
    assert _error(tmp_path, BASE + "quick:\n  duration_scale: 0\n") == (
        ":22: quick.duration_scale: Input should be greater than 0 (got 0)"
    )


# --- record -------------------------------------------------------------------


def _planned(stage, **kw):
    """The stages.json entry of a stage that has not started: its record less the run-time fields."""
    entry = stage.record(**kw).to_json()
    runtime = {"start_unix_s", "end_unix_s", "client_loop_lag_max_ms", "client_cpu_max_percent"}
    assert all(entry[k] is None for k in runtime)
    return {k: v for k, v in entry.items() if k not in runtime}


def test_record_is_the_stages_json_entry():
    stage = load_scenario("b.yaml", text=BASE).resolve()[1]
    assert stage.record().stage_index == 1 and not stage.record().open_loop
    assert _planned(stage) == {
        "pass_index": 0,
        "pass_name": "p1",
        "stage_index": 1,
        "stage_name": "p1-4u",
        "kind": "users",
        "target_users": 4,
        "spawn_rate": 4.0,
        "target_rate_per_s": None,
        "duration_s": 30.0,
        "slos": {"ttft_p95_ms": 1000, "e2e_p95_ms": 15000},
        "workload": {"prompt_tokens": 300, "output_tokens": 128, "long_context": False},
    }


def test_record_lists_clients_when_they_differ_and_resolves_long_context():
    text = _replace(
        "passes:\n",
        "clients:\n"
        "  - {name: a, workload: {prompt_tokens: {distribution: uniform, min: 100, max: 500}}}\n"
        "  - {name: b, workload: {context_fill_ratio: 0.5}}\n"
        "passes:\n",
    )
    stage = load_scenario("c.yaml", text=text).resolve()[0]
    described = _planned(stage)
    assert described["workload"] == {"prompt_tokens": "uniform(100..500)", "output_tokens": 128, "long_context": False}
    assert described["clients"] == {
        "a": {"prompt_tokens": "uniform(100..500)", "output_tokens": 128, "long_context": False},
        "b": {"prompt_tokens": "fill 0.5 of max_model_len", "output_tokens": 128, "long_context": True},
    }
    # floor(0.5 * 4096) - 128 = 1920
    assert _planned(stage, max_model_len=4096)["clients"]["b"]["prompt_tokens"] == 1920
    assert "clients" not in _planned(load_scenario("b.yaml", text=BASE).resolve()[0])


def test_resolved_stage_is_frozen():
    stage = load_scenario("b.yaml", text=BASE).resolve()[0]
    assert isinstance(stage, ResolvedStage)
    with pytest.raises(AttributeError):
        stage.users = 3  # type: ignore[misc]


# --- distributions -------------------------------------------------------------


def _dist(**kw) -> Distribution:
    return Distribution(**kw)


@pytest.mark.parametrize(
    ("dist", "low", "high"),
    [
        (_dist(distribution="uniform", min=100, max=500), 100, 500),
        (_dist(distribution="normal", mean=300, stddev=400, min=50, max=400), 50, 400),
        (_dist(distribution="lognormal", mean=300, sigma=1.5, min=20, max=900), 20, 900),
        (_dist(distribution="choice", values=[128, 256, 64]), 64, 256),
    ],
)
def test_samples_stay_within_bounds_and_reach_them(dist, low, high):
    rng = random.Random(1)
    values = [dist.sample(rng) for _ in range(5000)]
    assert all(isinstance(v, int) for v in values)
    assert min(values) == low and max(values) == high  # wide spreads hit the clip bounds
    assert (dist.lower, dist.upper) == (low, high)


@pytest.mark.parametrize(
    "dist",
    [
        _dist(distribution="uniform", min=100, max=500),
        _dist(distribution="normal", mean=300, stddev=50, min=1, max=2000),
        _dist(distribution="lognormal", mean=300, sigma=0.5, max=5000),
        _dist(distribution="choice", values=[128, 256], weights=[3, 1]),
    ],
)
def test_sampling_is_deterministic_per_seed(dist):
    def draw(seed: int) -> list[int]:
        rng = random.Random(seed)
        return [dist.sample(rng) for _ in range(50)]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_uniform_draws_what_randint_draws():
    dist = _dist(distribution="uniform", min=100, max=500)
    expected_rng = random.Random(0)
    rng = random.Random(0)
    assert [dist.sample(rng) for _ in range(10)] == [expected_rng.randint(100, 500) for _ in range(10)]


def test_choice_follows_weights():
    dist = _dist(distribution="choice", values=[128, 256], weights=[3, 1])
    rng = random.Random(0)
    counts = Counter(dist.sample(rng) for _ in range(20000))
    assert set(counts) == {128, 256}
    assert abs(counts[128] / 20000 - 0.75) < 0.02


def test_lognormal_mean_is_the_distribution_mean():
    dist = _dist(distribution="lognormal", mean=300, sigma=0.5, max=100000)
    rng = random.Random(0)
    values = [dist.sample(rng) for _ in range(20000)]
    # the sd is 300 * sqrt(exp(0.25) - 1) ~= 160, so the standard error is ~1.1
    assert abs(sum(values) / len(values) - 300) < 6


def test_normal_centres_on_mean():
    dist = _dist(distribution="normal", mean=300, stddev=50, min=1, max=2000)
    rng = random.Random(0)
    values = [dist.sample(rng) for _ in range(20000)]
    assert abs(sum(values) / len(values) - 300) < 2


def test_summaries():
    assert _dist(distribution="uniform", min=100, max=500).summary() == "uniform(100..500)"
    assert _dist(distribution="normal", mean=300, stddev=50, max=900).summary() == "normal(300±50, 1..900)"
    assert (
        _dist(distribution="lognormal", mean=300, sigma=0.5, min=2, max=900).summary()
        == "lognormal(mean 300, sigma 0.5, 2..900)"
    )
    assert _dist(distribution="choice", values=[128, 256]).summary() == "choice(128, 256)"
    assert token_summary(7) == 7 and token_summary(None) is None
    assert token_upper(_dist(distribution="choice", values=[5, 9])) == 9
    assert token_lower(_dist(distribution="choice", values=[5, 9])) == 5


def test_workload_sampling_with_seed_and_long_context():
    workload = Workload(
        prompt_tokens=_dist(distribution="uniform", min=10, max=20), output_tokens=None, context_fill_ratio=None
    )
    rng = random.Random(5)
    assert 10 <= workload.sample_prompt_tokens(rng) <= 20
    assert workload.sample_output_tokens(rng) is None
    long = Workload(context_fill_ratio=0.85, output_tokens=256)
    # floor(0.85 * 4096) = 3481; 3481 - 256 = 3225
    assert long.sample_prompt_tokens(rng, max_model_len=4096) == 3225
    assert long.max_prompt_tokens() is None
    assert long.max_prompt_tokens(max_model_len=4096) == 3225
    with pytest.raises(ValueError):
        long.sample_prompt_tokens(rng)


def test_slos_as_dict_keeps_set_keys_only():
    assert Slos(ttft_p95_ms=1000, error_rate_max=0).as_dict() == {"ttft_p95_ms": 1000, "error_rate_max": 0}


# --- check_against_server ------------------------------------------------------


def test_check_against_server_fits():
    assert check_against_server(load_scenario("b.yaml", text=BASE), max_model_len=428) == []


def test_check_against_server_reports_each_stage_with_numbers():
    scenario = load_scenario("b.yaml", text=BASE)
    # 300 + 128 = 428
    assert check_against_server(scenario, max_model_len=427) == [
        f"pass '{pass_name}', stage '{stage_name}': prompt_tokens up to 300 + output_tokens up to 128 = 428 "
        "exceeds the server's max_model_len 427"
        for pass_name, stage_name in [("p1", "s1"), ("p1", "p1-4u"), ("p2", "p2-2u")]
    ]


def test_check_against_server_uses_distribution_maxima_and_names_clients():
    text = _replace(
        "passes:\n",
        "clients:\n"
        "  - {name: small}\n"
        "  - name: big\n"
        "    workload:\n"
        "      prompt_tokens: {distribution: uniform, min: 100, max: 4000}\n"
        "      output_tokens: {distribution: choice, values: [16, 128]}\n"
        "passes:\n",
    )
    problems = check_against_server(load_scenario("c.yaml", text=text), max_model_len=4096)
    assert problems[0] == (
        "pass 'p1', stage 's1', client 'big': prompt_tokens up to 4000 + output_tokens up to 128 = 4128 "
        "exceeds the server's max_model_len 4096"
    )
    assert len(problems) == 3


def test_check_against_server_long_context():
    text = _replace("    output_tokens: 128\n", "    output_tokens: 256\n    context_fill_ratio: 0.05\n")
    problems = check_against_server(load_scenario("l.yaml", text=text), max_model_len=4096)
    # floor(0.05 * 4096) = 204; 204 - 256 = -52
    assert problems[0] == (
        "pass 'p1', stage 's1': context_fill_ratio 0.05 of max_model_len 4096 leaves a -52-token prompt "
        "after 256 output tokens (system prefix 0)"
    )
    assert check_against_server(load_scenario("l.yaml", text=text), max_model_len=40960) == []


def test_scenario_model_is_frozen_and_strict():
    scenario = load_scenario("b.yaml", text=BASE)
    assert isinstance(scenario, Scenario)
    with pytest.raises(Exception):
        scenario.seed = 1  # type: ignore[misc]


def test_open_loop_stages_resolve_and_describe(tmp_path):
    text = _replace("{users: 2, duration_s: 10}",
                    "{rate_per_s: 2.5, arrival: gamma, burstiness: 0.5, max_concurrency: 8, duration_s: 10}")
    path = tmp_path / "s.yaml"
    path.write_text(text)
    stage = load_scenario(path).resolve()[-1]
    assert stage.open_loop and stage.users == 0
    assert (stage.name, stage.rate_per_s, stage.arrival, stage.burstiness, stage.max_concurrency) == (
        "p2-2.5rps", 2.5, "gamma", 0.5, 8)
    desc = _planned(stage)
    assert desc["kind"] == "rate" and desc["target_rate_per_s"] == 2.5 and desc["target_users"] is None
    assert (desc["arrival"], desc["burstiness"], desc["max_concurrency"]) == ("gamma", 0.5, 8)
    # the defaults: Poisson, uncapped
    path.write_text(_replace("{users: 2, duration_s: 10}", "{rate_per_s: 4, duration_s: 10}"))
    plain = load_scenario(path).resolve()[-1]
    assert (plain.arrival, plain.burstiness, plain.max_concurrency) == ("poisson", None, None)
    assert not load_scenario(path).resolve()[0].open_loop


# --- search passes ----------------------------------------------------------

SEARCH = "  - name: p2\n    stages:\n      - {users: 2, duration_s: 10}\n"


@pytest.mark.parametrize(
    ("new", "expected"),
    [
        ("  - name: p2\n    search: {start: 3.5}\n", ":19: passes[1].search.start: 'start' counts users: a whole number"),
        ("  - name: p2\n    search: {start: 50, max: 32}\n",
         ":19: passes[1].search.start: 'start' must lie between 'min' and 'max'"),
        ("  - name: p2\n    search: {probe_s: 10, settle_s: 10}\n",
         ":19: passes[1].search.settle_s: 'settle_s' must be shorter than 'probe_s'"),
        ("  - name: p2\n    search: {arrival: constant}\n",
         ":19: passes[1].search.arrival: 'arrival' applies to 'over: rate' searches"),
        ("  - name: p2\n    search: {start: 4}\n    stages: [{users: 2, duration_s: 10}]\n",
         ":19: passes[1].search: a pass takes 'stages' or 'search', not both"),
        ("  - name: p2\n    description: nothing\n",
         ":18: passes[1]: a pass needs 'stages' (fixed levels) or 'search' (find the highest level that meets the "
         "SLOs)"),
        ("  - name: p2\n    slos: {ttft_p95_ms: null, e2e_p95_ms: null}\n    search: {start: 4}\n",
         ":20: passes[1].search: pass 'p2': a search judges each request, so it needs a latency SLO "
         "(ttft_ms, tpot_ms, e2e_ms, or a percentile such as ttft_p95_ms)"),
    ],
)
def test_search_pass_errors(tmp_path, new, expected):
    assert _error(tmp_path, _replace(SEARCH, new)) == expected


def test_a_search_pass_resolves_to_its_first_probe_held_at_most_max_probe_s():
    text = _replace(SEARCH, "  - name: p2\n    slos: {tpot_ms: 20}\n    search: {start: 4, probe_s: 20, budget_s: 200}\n"
                            "  - name: p3\n    search: {over: rate, start: 2.5, max: 40, arrival: constant}\n")
    scenario = load_scenario("t.yaml", text=text)
    stages = scenario.resolve()
    first, rate = stages[2], stages[3]
    assert (first.name, first.users, first.duration_s, first.search.probe_s) == ("p2-4u", 4, 60.0, 20.0)
    assert first.slos["tpot_ms"] == 20 and first.slos["ttft_p95_ms"] == 1000  # inherited SLOs stay
    assert (rate.name, rate.rate_per_s, rate.arrival, rate.users) == ("p3-2.5rps", 2.5, "constant", 0)
    probe = first.probe(12, index=3, name="p2-12u")
    assert (probe.users, probe.spawn_rate, probe.index, probe.search) == (12, 100.0, 3, first.search)
    assert rate.probe(5.0, index=4, name="x").rate_per_s == 5.0
    with pytest.raises(ValueError):
        stages[0].probe(2, index=0, name="x")  # a fixed stage is not a probe
    # --quick: shorter probes (never under min_stage_s) and budget, same rules
    quick = scenario.resolve(quick=True)[2].search
    assert (quick.probe_s, quick.budget_s) == (10.0, 50.0)
