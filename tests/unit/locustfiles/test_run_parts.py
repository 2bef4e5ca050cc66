"""The parts of a Locust process's run state, tested without Locust: stage clock, health, run files, probe."""

from __future__ import annotations

import json
from types import SimpleNamespace

from envelope.scenario import load_scenario
from envelope.stages import read_stages, schedule_completed
from locustfiles.health import EarlyStop, LoopLagWatcher
from locustfiles.run_files import RunFiles, run_dir_from_options
from locustfiles.server_probe import probe_server
from locustfiles.stage_clock import StageClock
from server.sim import SimConfig, SimServer

SCENARIO = """
name: t
passes:
  - name: p
    stages:
      - {users: 4, spawn_rate: 2, duration_s: 10}
      - {rate_per_s: 3, duration_s: 5}
"""


def _stages():
    return load_scenario("t.yaml", text=SCENARIO).resolve()


def test_stage_clock_logs_stages_as_they_run_and_writes_each_change(tmp_path):
    files = RunFiles(tmp_path / "run", name="t")
    clock = StageClock(_stages(), manual=False, on_change=files.write_stages)
    clock.enter(0, now_unix_s=100.0)
    clock.note_client_health(loop_lag_ms=7.25, cpu_percent=40.0)
    clock.note_client_health(loop_lag_ms=3.0)
    clock.enter(1, now_unix_s=110.0)
    assert clock.stage.name == "p-3rps" and clock.current_index == 1
    assert not schedule_completed(clock.log, clock.stages)
    clock.end(now_unix_s=115.5)
    assert not clock.end(now_unix_s=120.0)  # nothing running any more
    on_disk = read_stages(files.run_dir)
    assert on_disk == clock.log
    first, second = on_disk
    assert (first.start_unix_s, first.end_unix_s, first.client_loop_lag_max_ms, first.client_cpu_max_percent) == (
        100.0, 110.0, 7.25, 40.0)
    assert (second.kind, second.target_rate_per_s, second.end_unix_s) == ("rate", 3.0, 115.5)
    assert schedule_completed(clock.log, clock.stages)


def test_health_after_a_stage_ended_is_not_noted():
    clock = StageClock(_stages(), manual=False)
    clock.enter(0, now_unix_s=1.0)
    clock.end(now_unix_s=2.0)
    clock.note_client_health(loop_lag_ms=500.0)
    assert clock.log[0].client_loop_lag_max_ms is None


def test_manual_stage_is_one_open_ended_stage():
    clock = StageClock(_stages(), manual=True)
    assert clock.stage.name == "manual" and clock.stage.spawn_rate == 2.0  # the rest comes from the first stage
    assert clock.enter_manual(now_unix_s=5.0) and not clock.enter_manual(now_unix_s=6.0)
    [entry] = clock.log
    assert (entry.stage_name, entry.pass_name, entry.target_users, entry.duration_s, entry.end_unix_s) == (
        "manual", "manual", None, None, None)


def test_worker_follows_the_masters_stage_without_logging():
    clock = StageClock(_stages(), manual=False)
    assert not clock.follow(0) and clock.follow(1) and not clock.follow(1)
    assert clock.log == []


def test_loop_lag_watcher_keeps_the_worst_lateness_until_taken():
    times = iter([0.0, 0.05, 0.13, 0.18])  # the second sleep ran 30 ms late
    watcher = LoopLagWatcher(lambda s: None, interval_s=0.05, clock=lambda: next(times))
    watcher.run(ticks=3)
    assert round(watcher.take_ms(), 6) == 30.0
    assert watcher.take_ms() == 0.0


def test_stalls_are_kept_with_their_times_and_found_by_the_requests_they_overlap():
    times = iter([0.0, 0.05, 0.10, 0.35, 0.40, 0.452, 0.50])  # 200 ms stall ends at 0.35, 2 ms at 0.452
    watcher = LoopLagWatcher(lambda s: None, interval_s=0.05, clock=lambda: next(times), keep_over_s=0.005)
    watcher.run(ticks=6)
    assert [(round(a, 6), round(b, 6)) for a, b in watcher.stalls] == [(0.15, 0.35)]  # the 2 ms one is noise
    assert round(watcher.worst_overlapping_ms(0.0, 0.14), 6) == 0.0  # ended before the stall
    assert round(watcher.worst_overlapping_ms(0.30, 0.50), 6) == 200.0  # overlaps its end
    assert round(watcher.worst_overlapping_ms(0.16, 0.20), 6) == 200.0  # inside it
    assert round(watcher.worst_overlapping_ms(0.36, 0.50), 6) == 0.0  # after it


def test_early_stop_fires_once_after_three_rejections_and_never_after_a_success():
    stop = EarlyStop()
    assert [stop.note("http_401", "bad key") for _ in range(2)] == [None, None]
    message = stop.note("http_401", "bad key")
    assert message.startswith("the server answered HTTP 401 to the first 3 requests and none succeeded (bad key)")
    assert stop.note("http_401") is None
    fine = EarlyStop()
    fine.note(None)
    assert all(fine.note("http_404") is None for _ in range(5))
    other = EarlyStop()
    assert all(other.note("timeout") is None for _ in range(5))  # not a rejection


def test_run_dir_from_options():
    assert run_dir_from_options(SimpleNamespace(run_dir="a/b")).as_posix() == "a/b"
    assert run_dir_from_options(SimpleNamespace(run_dir=None, csv_prefix="r/locust/locust")).as_posix() == "r"
    assert run_dir_from_options(SimpleNamespace(run_dir=None, csv_prefix="r/stats")).as_posix() == "r"
    assert run_dir_from_options(SimpleNamespace()) is None


def test_run_json_is_written_once_owned_and_finished(tmp_path):
    scenario = tmp_path / "s.yaml"
    scenario.write_text(SCENARIO)
    files = RunFiles(tmp_path / "run", name="t")
    kw = dict(scenario_path=str(scenario), quick=True, options={"api_key": "***"}, started_unix_s=1.0,
              argv=["locust", "--api-key-file", "k.txt", "-f", "x"])
    files.write_run_json("running", **kw)
    files.write_run_json("complete", **kw)
    info = json.loads((files.run_dir / "run.json").read_text())
    assert (info["status"], info["written_by"], info["schema_version"]) == ("complete", "locust", 1)
    assert info["ended_unix_s"] is not None and "k.txt" in info["argv"] and "--api-key-file" not in info["argv"]
    assert (files.run_dir / "scenario.yaml").read_text() == SCENARIO


def test_run_json_owned_by_envelope_run_is_left_alone(tmp_path):
    (tmp_path / "run.json").write_text('{"run_id": "x", "status": "running", "written_by": "envelope run"}')
    RunFiles(tmp_path, name="t").write_run_json("complete", scenario_path=None, quick=False, options={},
                                                started_unix_s=1.0, argv=[])
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "running"


def test_probe_learns_the_model_and_length_and_calibrates_prompts():
    scenario = load_scenario("t.yaml", text=SCENARIO)
    with SimServer(SimConfig(model="m1", max_model_len=2048)) as sim:
        url = sim.base_url
        facts = probe_server(url, headers={}, model=None, scenario=scenario)
        assert (facts.model, facts.max_model_len, facts.problems) == ("m1", 2048, ())
        assert facts.factory is not None
        wrong = probe_server(url, headers={}, model="other", scenario=scenario)
        assert wrong.problems == (f"model 'other' is not served by {url} (it serves: m1)",)
    with SimServer(SimConfig(model="m1", max_model_len=300)) as sim:  # 300-token prompts + 128 output do not fit
        url = sim.base_url
        assert "exceeds the server's max_model_len 300" in probe_server(url, headers={}, model=None,
                                                                         scenario=scenario).problems[0]


def test_probe_of_nothing_says_it_cannot_reach():
    facts = probe_server("http://127.0.0.1:9", headers={}, model=None, scenario=load_scenario("t.yaml", text=SCENARIO),
                         timeout_s=2.0)
    assert facts.problems[0].startswith("--host http://127.0.0.1:9: cannot reach the server")
