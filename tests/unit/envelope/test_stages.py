"""The stage record and stages.json: one schema, one writer, one reader that also reads old files."""

from __future__ import annotations

import json

import pytest

from envelope.stages import (
    STAGES_SCHEMA_VERSION,
    StageKind,
    StageRecord,
    StagesFileError,
    WorkloadSummary,
    read_stages,
    write_stages,
)

CLOSED = StageRecord(stage_index=0, stage_name="p-4u", pass_index=0, pass_name="p", target_users=4, spawn_rate=2.0,
                     duration_s=30.0, slos={"ttft_p95_ms": 1000.0},
                     workload=WorkloadSummary(prompt_tokens=300, output_tokens=128))
OPEN = StageRecord(stage_index=1, stage_name="p-2rps", pass_index=0, pass_name="p", kind=StageKind.RATE,
                   target_rate_per_s=2.0, duration_s=10.0, arrival="gamma", burstiness=0.5, max_concurrency=8,
                   workload=WorkloadSummary(prompt_tokens="uniform(100..500)", output_tokens=None),
                   clients={"a": WorkloadSummary(prompt_tokens=10), "b": WorkloadSummary(prompt_tokens=20)})


def test_round_trip_through_the_file(tmp_path):
    stages = [CLOSED.replace(start_unix_s=100.0, end_unix_s=130.0, client_loop_lag_max_ms=3.5),
              OPEN.replace(start_unix_s=130.0)]
    write_stages(tmp_path, stages)
    data = json.loads((tmp_path / "stages.json").read_text())
    assert data["schema_version"] == STAGES_SCHEMA_VERSION
    assert [s["stage_name"] for s in data["stages"]] == ["p-4u", "p-2rps"]
    assert "arrival" not in data["stages"][0] and data["stages"][1]["arrival"] == "gamma"
    assert read_stages(tmp_path) == stages


def test_a_bare_list_written_before_the_schema_version_reads_the_same(tmp_path):
    old = [{"stage_index": 3, "stage_name": "s", "start_unix_s": 5, "end_unix_s": None,
            "slos": {"e2e_p95_ms": 100}, "workload": {"prompt_tokens": 64, "output_tokens": 32}}]
    (tmp_path / "stages.json").write_text(json.dumps(old))
    [stage] = read_stages(tmp_path)
    assert (stage.stage_index, stage.kind, stage.pass_index, stage.pass_name) == (3, StageKind.USERS, 0, "")
    assert (stage.start_unix_s, stage.end_unix_s, stage.slos) == (5.0, None, {"e2e_p95_ms": 100})
    assert stage.workload == WorkloadSummary(prompt_tokens=64, output_tokens=32)


def test_defaults_for_missing_names_and_index(tmp_path):
    (tmp_path / "stages.json").write_text(json.dumps([{"start_unix_s": 1.0}, {"start_unix_s": 2.0}]))
    assert [(s.stage_index, s.stage_name) for s in read_stages(tmp_path)] == [(0, "stage-0"), (1, "stage-1")]


def test_entries_that_cannot_be_stages_are_skipped_and_said(tmp_path):
    (tmp_path / "stages.json").write_text(json.dumps(
        [{"stage_name": "a"}, {"stage_name": "b", "start_unix_s": "soon"}, {"stage_name": "c", "start_unix_s": 1,
                                                                             "kind": "users"}]))
    problems: list[str] = []
    assert [s.stage_name for s in read_stages(tmp_path, problems=problems)] == ["c"]
    assert problems == ["stages.json: stage 0 has no start_unix_s; skipped",
                        "stages.json: stage 1: start_unix_s is 'soon', not a number; skipped"]


@pytest.mark.parametrize("text, message", [
    ("{not json", "stages.json: unreadable"),
    ('{"stages": 3}', "stages.json: not a list of stage objects"),
    ("[1, 2]", "stages.json: not a list of stage objects"),
])
def test_unusable_files_raise_one_line(tmp_path, text, message):
    (tmp_path / "stages.json").write_text(text)
    with pytest.raises(StagesFileError, match=message):
        read_stages(tmp_path)


def test_absent_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_stages(tmp_path)


def test_client_health_keeps_the_worst():
    s = CLOSED.with_client_health(loop_lag_ms=12.34567, cpu_percent=None)
    assert s.client_loop_lag_max_ms == 12.346 and s.client_cpu_max_percent is None
    assert s.with_client_health(loop_lag_ms=3.0) is s
    assert s.with_client_health(loop_lag_ms=20.0, cpu_percent=55.0).client_cpu_max_percent == 55.0


def test_a_schedule_with_a_search_is_complete_only_once_every_pass_ran():
    from envelope.scenario import load_scenario
    from envelope.stages import schedule_completed

    planned = load_scenario("s.yaml", text=(
        "name: s\ndefaults: {slos: {ttft_ms: 100}}\npasses:\n"
        "  - {name: find, search: {start: 4, probe_s: 10}}\n"
        "  - {name: after, stages: [{users: 1, duration_s: 10}]}\n")).resolve()
    probes = [StageRecord(stage_index=i, stage_name=f"find-{n}u", pass_name="find", start_unix_s=10.0 * i,
                          end_unix_s=10.0 * i + 10, duration_s=10.0) for i, n in enumerate((4, 8, 6))]
    after = StageRecord(stage_index=3, stage_name="after-1u", pass_name="after", start_unix_s=30.0,
                        end_unix_s=40.0, duration_s=10.0)
    assert schedule_completed(probes + [after], planned)  # more stages than planned: the probes
    assert not schedule_completed(probes, planned)  # the pass after the search never ran
