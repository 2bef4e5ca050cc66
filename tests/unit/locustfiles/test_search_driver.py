"""The search driver: ends a probe once judged, inserts the next, logs why; workers rebuild what the master announced."""

from __future__ import annotations

import orjson

from envelope.scenario import load_scenario
from envelope.search_log import read_search_log, write_search_log
from locustfiles.search_driver import SearchDriver, announced_stage
from locustfiles.stage_clock import StageClock

SCENARIO = """\
name: s
defaults:
  slos: {ttft_ms: 200}
passes:
  - name: find
    search: {start: 4, probe_s: 20, settle_s: 5, min_requests: 10, budget_s: 200}
  - name: after
    stages: [{users: 1, duration_s: 10}]
"""


def _setup(tmp_path):
    stages = load_scenario("s.yaml", text=SCENARIO).resolve()
    logged = []
    clock = StageClock(stages, manual=False, on_change=lambda log: logged.append(list(log)))
    records = tmp_path / "records"
    records.mkdir()
    driver = SearchDriver(clock, records_dir=lambda: records, write=lambda e: write_search_log(tmp_path, e))
    return clock, driver, records / "h_1.jsonl"


def _write(path, stage_index, done_unix_s, *, ttft_s=0.1, error=None, pass_name="find", took_s=1.0):
    rec = {"stage_index": stage_index, "pass_name": pass_name, "wall_start_unix_s": done_unix_s - took_s,
           "t_start_s": 10.0, "t_first_token_s": 10.0 + ttft_s, "t_last_token_s": 10.0 + took_s - 0.1,
           "t_done_s": 10.0 + took_s,
           "output_tokens": 10, "error_category": error}
    with open(path, "ab") as fh:
        fh.write(orjson.dumps(rec) + b"\n")


def test_a_probe_ends_once_judged_and_the_next_is_inserted(tmp_path):
    clock, driver, path = _setup(tmp_path)
    clock.enter(0, now_unix_s=1000.0)
    for i in range(100):  # 100 good requests of 0.5 s completing through the probe (at most 3 in flight)
        _write(path, 0, 1003.0 + 0.17 * i, took_s=0.5)
    _write(path, 0, 1010.0, error="cancelled", took_s=0.1)  # not judged
    _write(path, 1, 1030.0, pass_name="after")  # another stage's: ignored
    assert not driver.step(stage_index=0, stage_elapsed_s=19.0, now_unix_s=1019.0)  # before probe_s
    assert driver.step(stage_index=0, stage_elapsed_s=20.0, now_unix_s=1020.0)
    # the probe lasted what it ran; 8 users come next; the fixed stage moved one place on
    assert [(s.name, s.index, s.users) for s in clock.stages] == [("find-4u", 0, 4), ("find-8u", 1, 8),
                                                                  ("after-1u", 2, 1)]
    assert clock.stages[0].duration_s == 20.0 and clock.log[-1].duration_s == 20.0
    (entry,) = read_search_log(tmp_path)
    (probe,) = entry.probes
    # sent after the settle time (1005 s), ended by the decision, and not in its last 0.5 s (the p95 request)
    judged = sum(1 for i in range(100) if 1005.0 <= 1002.5 + 0.17 * i < 1019.5)
    assert (probe.good, probe.judged, probe.verdict) == (judged, judged, "pass")
    assert probe.next_level == 8 and entry.running_level == 8 and not entry.done
    assert entry.thresholds == {"ttft_ms": 200.0} and entry.target == 0.95
    assert not driver.step(stage_index=0, stage_elapsed_s=20.5, now_unix_s=1020.5)  # judged once only


def test_a_probe_with_too_few_requests_is_held_until_it_has_them_or_its_cap(tmp_path):
    clock, driver, path = _setup(tmp_path)
    clock.enter(0, now_unix_s=1000.0)
    for i in range(5):
        _write(path, 0, 1006.0 + i, ttft_s=0.5)  # all over the threshold
    assert not driver.step(stage_index=0, stage_elapsed_s=25.0, now_unix_s=1025.0)  # 5 < min_requests 10
    assert driver.step(stage_index=0, stage_elapsed_s=59.5, now_unix_s=1059.5)  # the cap (60 s) less a tick
    (entry,) = read_search_log(tmp_path)
    assert (entry.probes[0].good, entry.probes[0].judged, entry.probes[0].verdict) == (0, 5, "fail")
    assert clock.stages[1].users == 2  # failed at the start: shrink


def test_an_overdue_probe_is_judged_when_the_schedule_already_left_it(tmp_path):
    clock, driver, path = _setup(tmp_path)
    clock.enter(0, now_unix_s=1000.0)
    for i in range(80):
        _write(path, 0, 1006.0 + 0.5 * i)
    # a late tick: the schedule is already in the next stage (60 s held); the probe still gets judged
    assert driver.step(stage_index=1, stage_elapsed_s=2.0, now_unix_s=1062.0)
    assert clock.stages[0].duration_s == 60.0
    assert clock.stages[1].name == "find-8u"


def test_workers_rebuild_the_announced_probe_and_find_later_stages_by_name():
    static = load_scenario("s.yaml", text=SCENARIO).resolve()
    probe = announced_stage(static, {"stage_index": 3, "stage_name": "find-6u",
                                     "probe": {"pass_name": "find", "level": 6}})
    assert (probe.name, probe.index, probe.users, probe.search is not None) == ("find-6u", 3, 6, True)
    after = announced_stage(static, {"stage_index": 4, "stage_name": "after-1u", "probe": None})
    assert (after.name, after.index, after.users) == ("after-1u", 4, 1)
    assert announced_stage(static, {"stage_index": 0, "stage_name": "nothing"}) is None


def test_requests_sent_while_an_earlier_stage_drains_are_not_judged(tmp_path):
    """A step down: the earlier stage's last request ends 12 s into the probe; what was sent before then
    ran beside it and is left out, whatever its verdict."""
    clock, driver, path = _setup(tmp_path)
    clock.enter(0, now_unix_s=1000.0)
    _write(path, 7, 1012.0, pass_name="before", took_s=13.0)  # sent at 999 s, before the probe: drains at 1012 s
    for i in range(20):  # sent 1005..1010.7 s (before the drain), all too slow
        _write(path, 0, 1006.0 + 0.3 * i, ttft_s=0.5)
    for i in range(80):  # sent from 1012 s on (done 1012.3..1018.6 s), all good, 3.75 in flight
        _write(path, 0, 1012.3 + 0.08 * i, took_s=0.3)
    assert driver.step(stage_index=0, stage_elapsed_s=20.0, now_unix_s=1020.0)
    (entry,) = read_search_log(tmp_path)
    assert (entry.probes[0].good, entry.probes[0].judged) == (80, 80)


def test_judging_waits_until_requests_in_flight_fall_to_the_probes_users(tmp_path):
    """A step down: users being stopped sent once more with the probe's workload (10 slow requests until
    1012 s beside the probe's 4 users); requests sent before in flight fell to 4 are not judged."""
    clock, driver, path = _setup(tmp_path)
    clock.enter(0, now_unix_s=1000.0)
    _write(path, 5, 1001.0, pass_name="before", took_s=2.0)  # the earlier stage: in flight at the start
    for i in range(10):
        _write(path, 0, 1012.0, ttft_s=0.5, took_s=11.5)  # sent at 1000.5 by users on their way out
    for i in range(40):  # the probe's own users, one request every 0.45 s from 1005 s, 1 s each, all good
        _write(path, 0, 1006.0 + 0.45 * i)
    assert driver.step(stage_index=0, stage_elapsed_s=20.0, now_unix_s=1020.0)
    (entry,) = read_search_log(tmp_path)
    # sent from 1012 s (when the slow ones ended), ended by 1020 s, not in the last second
    expected = sum(1 for i in range(40) if 1012.0 <= 1005.0 + 0.45 * i < 1019.0)
    assert (entry.probes[0].good, entry.probes[0].judged) == (expected, expected)


_NOTHING_IMPORTED_MID_PROBE = '''
import sys, orjson
from envelope.scenario import load_scenario
from locustfiles.search_driver import SearchDriver
from locustfiles.stage_clock import StageClock

text = "name: s\\ndefaults: {slos: {ttft_ms: 200}}\\npasses:\\n  - name: find\\n    search: {start: 4, probe_s: 20}\\n"
clock = StageClock(load_scenario("s.yaml", text=text).resolve(), manual=False, on_change=lambda log: None)
records = sys.argv[1]
driver = SearchDriver(clock, records_dir=lambda: __import__("pathlib").Path(records), write=lambda e: None)
with open(records + "/h_1.jsonl", "wb") as fh:
    for i in range(100):
        done = 1003.0 + 0.5 * i
        fh.write(orjson.dumps({"stage_index": 0, "pass_name": "find", "wall_start_unix_s": done - 0.5,
                               "t_start_s": 10.0, "t_first_token_s": 10.1, "t_last_token_s": 10.4, "t_done_s": 10.5,
                               "output_tokens": 10, "error_category": None}) + b"\\n")
clock.enter(0, now_unix_s=1000.0)
before = set(sys.modules)
assert driver.step(stage_index=0, stage_elapsed_s=55.0, now_unix_s=1055.0)  # judged: interval and request count
print(sorted(m for m in set(sys.modules) - before if m.split(".")[0] in ("scipy", "numpy", "pandas")))
'''


def test_deciding_a_probe_imports_nothing_while_requests_are_in_flight(tmp_path):
    """The driver is built before the load; its first decision comes mid-probe, in the gevent loop that times
    every request in flight. Importing scipy.stats there (1.9 s on a slow box) stalled them all, so the
    driver imports it when it is built (envelope.attainment.preload_statistics)."""
    import subprocess
    import sys
    from pathlib import Path

    records = tmp_path / "records"
    records.mkdir()
    repo = Path(__file__).resolve().parents[3]
    proc = subprocess.run([sys.executable, "-c", _NOTHING_IMPORTED_MID_PROBE, str(records)], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout
