"""envelope.scenario and envelope.sources: datasets, traces, conversations and client quotas in a scenario.

Data files are found next to the scenario and read while it loads, so a bad one
fails there: with the data file's own ``file:line``, or the scenario's line for
a file that is not there.
"""

from __future__ import annotations

import json

import pytest

from envelope.scenario import ConfigError, load_scenario
from envelope.sources import TRACE_TAIL_S


def _write(tmp_path, text: str, name: str = "s.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(path) -> str:
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    message = str(info.value)
    assert "\n" not in message
    return message


TRACE = "".join(json.dumps(r) + "\n" for r in [
    {"t_s": 0.0, "prompt_tokens": 100, "output_tokens": 10},
    {"t_s": 2.0, "prompt_tokens": 200, "output_tokens": 20, "session_id": "a"},
    {"t_s": 4.0, "prompt_tokens": 300, "output_tokens": 30},
])


def _trace_scenario(stage: str) -> str:
    return ("name: t\n"
            "passes:\n"
            "  - name: p\n"
            "    stages:\n"
            f"      - {stage}\n")


def test_a_trace_stage_lasts_its_replay_and_its_rate_is_the_trace_mean(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.jsonl").write_text(TRACE)
    path = _write(tmp_path, _trace_scenario("{name: r, trace: {path: data/t.jsonl, speedup: 2}}"))
    (stage,) = load_scenario(path).resolve(quick=True)  # never shortened: the replay is the trace
    assert stage.trace is not None and stage.trace.path == str((tmp_path / "data" / "t.jsonl").resolve())
    assert stage.duration_s == pytest.approx(2.0 + TRACE_TAIL_S)  # gaps of 2 s at speedup 2: last send at 2 s
    assert stage.rate_per_s == pytest.approx(3 / (2.0 + TRACE_TAIL_S))
    assert stage.open_loop and stage.arrival == "trace" and stage.users == 0
    record = stage.record()
    assert record.kind == "rate" and record.arrival == "trace"


def test_a_trace_rescaled_to_a_rate(tmp_path):
    (tmp_path / "t.jsonl").write_text(TRACE)
    path = _write(tmp_path, _trace_scenario("{trace: {path: t.jsonl, rate_per_s: 2}, duration_s: 5}"))
    (stage,) = load_scenario(path).resolve()
    assert stage.duration_s == 5.0  # written: kept


@pytest.mark.parametrize("stage, expected", [
    ("{trace: {path: t.jsonl}, users: 2}", ":5: passes[0].stages[0].users: a trace stage replays"),
    ("{trace: {path: t.jsonl}, rate_per_s: 2}", ":5: passes[0].stages[0].rate_per_s: a trace stage replays"),
    ("{trace: {path: t.jsonl, speedup: 2, rate_per_s: 3}}",
     ":5: passes[0].stages[0].trace.rate_per_s: a trace takes 'speedup' or 'rate_per_s', not both"),
    ("{users: 2}", ":5: passes[0].stages[0]: a stage needs 'duration_s'"),
    ("{trace: {path: missing.jsonl}}", ":5: passes[0].stages[0].trace.path: no such file"),
])
def test_bad_trace_stages_name_the_scenario_line(tmp_path, stage, expected):
    (tmp_path / "t.jsonl").write_text(TRACE)
    path = _write(tmp_path, _trace_scenario(stage))
    message = _error(path)
    assert message.startswith(str(path) + expected), message


def test_a_bad_data_file_names_its_own_line(tmp_path):
    (tmp_path / "t.jsonl").write_text(TRACE + '{"t_s": -1, "prompt_tokens": 5, "output_tokens": 5}\n')
    path = _write(tmp_path, _trace_scenario("{trace: {path: t.jsonl}}"))
    message = _error(path)
    assert message.startswith(f"{tmp_path / 't.jsonl'}:4: "), message
    (tmp_path / "d.jsonl").write_text('{"prompt": "hi"}\nnot json\n')
    path = _write(tmp_path, "name: t\ndefaults:\n  workload:\n    dataset: {path: d.jsonl}\n"
                            "passes: [{name: p, stages: [{users: 1, duration_s: 5}]}]\n")
    assert _error(path).startswith(f"{tmp_path / 'd.jsonl'}:2: "), _error(path)


def test_dataset_and_conversation_settings_merge_and_exclude_each_other(tmp_path):
    (tmp_path / "d.txt").write_text("one prompt\nanother prompt\n")
    path = _write(tmp_path, "name: t\n"
                            "defaults:\n"
                            "  workload: {dataset: {path: d.txt, replacement: false}, output_tokens: 32}\n"
                            "passes:\n"
                            "  - name: p\n"
                            "    stages: [{users: 1, duration_s: 5}]\n"
                            "  - name: chat\n"
                            "    workload: {dataset: null, conversation: {turns: 3, think_time_s: 1}}\n"
                            "    stages: [{users: 2, duration_s: 5}]\n")
    first, second = load_scenario(path).resolve()
    workload = first.clients[0].workload
    assert workload.dataset is not None and workload.dataset.replacement is False
    assert workload.dataset.path == str((tmp_path / "d.txt").resolve())
    assert first.record().workload.prompt_tokens == "dataset d.txt"
    assert first.record().workload.output_tokens == "the dataset's, else 32"
    conv = second.clients[0].workload.conversation
    assert second.clients[0].workload.dataset is None and conv is not None and conv.turns == 3
    assert second.record().workload.prompt_tokens == "3-turn chat, first 300"
    bad = _write(tmp_path, "name: t\ndefaults:\n  workload: {dataset: {path: d.txt}, context_fill_ratio: 0.5}\n"
                           "passes: [{name: p, stages: [{users: 1, duration_s: 5}]}]\n", name="bad.yaml")
    assert "a workload takes 'dataset' or 'context_fill_ratio', not both" in _error(bad)


TENANTS = """\
name: t
defaults:
  slos: {error_rate_max: 0.01, ttft_p95_ms: 2000}
clients:
  - name: chat
    slos: {ttft_p95_ms: 500}
  - name: eval
    rate_per_s: 2
    slos: {e2e_p95_ms: 30000}
  - name: admin
    max_concurrency: 1
passes:
  - name: p
    stages:
      - {name: alone, users: 2, duration_s: 5, clients: [chat]}
      - {name: shared, users: 2, duration_s: 5, slos: {ttft_p95_ms: 900}}
"""


def test_client_classes_get_their_own_slos_and_quotas(tmp_path):
    alone, shared = load_scenario(_write(tmp_path, TENANTS)).resolve()
    assert [c.name for c in alone.clients] == ["chat"]
    assert [c.name for c in shared.clients] == ["chat", "eval", "admin"]
    by = {c.name: c for c in shared.clients}
    # a class's own SLOs win over the stage's, key by key
    assert by["chat"].slos == {"error_rate_max": 0.01, "ttft_p95_ms": 500.0}
    assert by["eval"].slos == {"error_rate_max": 0.01, "ttft_p95_ms": 900.0, "e2e_p95_ms": 30000.0}
    assert by["admin"].slos == {"error_rate_max": 0.01, "ttft_p95_ms": 900.0}
    assert (by["eval"].rate_per_s, by["admin"].max_concurrency) == (2.0, 1)
    assert shared.record().client_slos == {c.name: c.slos for c in shared.clients}
    assert alone.record().client_slos == {"chat": {"error_rate_max": 0.01, "ttft_p95_ms": 500.0}}


@pytest.mark.parametrize("old, new, expected", [
    ("clients: [chat]}", "clients: [chat, nobody]}",
     ":15: passes[0].stages[0].clients[1]: no client class named 'nobody' (the scenario's are admin, chat, eval)"),
    ("    max_concurrency: 1\n", "    max_concurrency: 1\n    rate_per_s: 1\n",
     ":11: clients[2].max_concurrency: a client class takes 'rate_per_s' or 'max_concurrency', not both"),
])
def test_bad_client_settings_name_the_line(tmp_path, old, new, expected):
    path = _write(tmp_path, TENANTS.replace(old, new))
    message = _error(path)
    assert message == str(path) + expected, message
