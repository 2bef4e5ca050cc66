import os
import subprocess
import sys
import textwrap
import time

import pytest

from server.cpu_arrangement import (
    EngineNice,
    ProcessView,
    is_engine_process,
    renice_pass,
    snapshot_group,
    thread_nice,
    threads_to_renice,
)
from server.process import stop_process_group
from server.profiles import ServerProfile, load_profile

# --- which processes are the engine ---


@pytest.mark.parametrize(
    "name, cmdline, engine",
    [
        ("VLLM::EngineCore", ("VLLM::EngineCore", "", ""), True),
        ("VLLM::Worker", ("VLLM::Worker",), True),
        ("VLLM::Worker_TP0", ("VLLM::Worker_TP0",), True),
        ("python3.11", ("VLLM::Worker", "-c", "..."), True),  # argv[0] set without setproctitle
        ("VLLM::EngineCor", (), True),  # the kernel's 15-character comm, cmdline unreadable
        ("python", ("/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"), False),  # the API server
        ("python", ("/venv/bin/python", "-B", "-c", "from multiprocessing..."), False),
        ("locust", ("locust", "-f", "VLLM::Worker"), False),  # a marker further on does not count
    ],
)
def test_engine_processes_are_recognised_by_name_or_argv0(name, cmdline, engine):
    assert is_engine_process(name, cmdline) is engine


def _tree():
    return [
        ProcessView(100, "python", ("python", "-m", "vllm.entrypoints.openai.api_server"), (100, 101, 102)),
        ProcessView(200, "VLLM::EngineCore", ("VLLM::EngineCore",), (200, 201)),
        ProcessView(300, "VLLM::Worker", ("VLLM::Worker",), (300, 301, 302, 303)),
    ]


def test_only_engine_threads_not_yet_at_the_target_are_picked():
    nice = {100: 0, 101: 0, 102: 0, 200: 19, 201: 0, 300: 0, 301: 19, 302: 0}  # 303 ended
    todo, seen = threads_to_renice(_tree(), nice.get, 19)
    assert todo == [201, 300, 302]
    assert seen == 5


def test_a_pass_counts_what_it_changed_and_ignores_failures():
    nice = {tid: 0 for proc in _tree() for tid in proc.thread_ids}
    refused = {302}

    def set_nice(tid, value):
        if tid in refused:
            return False
        nice[tid] = value
        return True

    assert renice_pass(1, 19, snapshot=lambda pgid: _tree(), nice_of=nice.get, set_nice=set_nice) == (5, 6)
    assert [nice[t] for t in (100, 101, 102)] == [0, 0, 0]  # the API server is never reniced
    assert renice_pass(1, 19, snapshot=lambda pgid: _tree(), nice_of=nice.get, set_nice=set_nice) == (0, 6)


def test_a_failing_snapshot_is_a_quiet_empty_pass():
    def broken(pgid):
        raise ProcessLookupError(pgid)

    keeper = EngineNice(1, 19, snapshot=broken)
    assert keeper.apply_once() == 0
    assert keeper.describe() == {"engine_nice": 19, "threads_reniced": 0, "engine_threads": 0}


# --- the profile setting ---


def test_cpu_tiny_sets_engine_nice_and_gpu_profiles_do_not():
    assert load_profile("cpu-tiny").engine_nice == 19
    assert load_profile("qwen3-8b").engine_nice is None
    assert load_profile("qwen3-8b-dummy").engine_nice is None


@pytest.mark.parametrize("value", [-1, 20])
def test_engine_nice_is_a_nice_value_that_needs_no_privilege(value):
    with pytest.raises(ValueError, match="engine_nice"):
        ServerProfile(name="x", device="cpu", model="m", served_model_name="m", max_model_len=1, engine_nice=value)


# --- a real process group ---

# The group leader stands for the API server: at nice 0, it starts an "engine" child
# (argv[0] VLLM::Worker, as setproctitle would show it) when told to, so the second
# child appears after the first pass with threads at the leader's nice 0.
_ENGINE = textwrap.dedent(
    """
    import os, sys, threading, time
    late = sys.argv[1]
    for _ in range(2):
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    while not os.path.exists(late):
        time.sleep(0.02)
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    time.sleep(60)
    """
)
_LEADER = textwrap.dedent(
    """
    import subprocess, sys, threading, time
    engine, late = sys.argv[1], sys.argv[2]
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    children = []
    for line in sys.stdin:
        children.append(subprocess.Popen(["VLLM::Worker", "-c", engine, late], executable=sys.executable))
    """
)


def _wait_for(predicate, timeout_s=30.0):  # generous: a loaded 2-core box starts Python slowly
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def _engines(pgid, threads):
    views = [v for v in snapshot_group(pgid) if is_engine_process(v.name, v.cmdline)]
    return views if views and all(len(v.thread_ids) >= threads for v in views) else None


def test_every_thread_of_the_engine_processes_reaches_the_nice_value_including_later_ones(tmp_path):
    late = tmp_path / "late"
    leader = subprocess.Popen(
        [sys.executable, "-c", _LEADER, _ENGINE, str(late)], stdin=subprocess.PIPE, start_new_session=True
    )
    keeper = EngineNice(leader.pid, 19, interval_s=0.05)
    try:
        assert leader.stdin is not None
        leader.stdin.write(b"spawn\n")
        leader.stdin.flush()
        (first,) = _wait_for(lambda: _engines(leader.pid, 3))
        assert keeper.apply_once() == 3  # main thread and two threads
        assert {thread_nice(t) for t in first.thread_ids} == {19}

        keeper.start()
        leader.stdin.write(b"spawn\n")  # a second engine process, born at nice 0
        leader.stdin.flush()
        late.touch()  # and one more thread in each
        engines = _wait_for(lambda: (lambda v: v if len(v) == 2 else None)(_engines(leader.pid, 4) or []))

        def all_niced():
            return all(thread_nice(t) == 19 for v in _engines(leader.pid, 4) or [] for t in v.thread_ids)

        _wait_for(all_niced)
        assert sum(len(v.thread_ids) for v in engines) == 8
        # 3, plus at least the second process's main thread (born at 0); threads it starts
        # after that pass inherit 19, as does the first process's late thread
        assert keeper.threads_reniced >= 4
        leader_threads = os.listdir(f"/proc/{leader.pid}/task")
        assert len(leader_threads) == 2
        assert {thread_nice(int(t)) for t in leader_threads} == {0}  # the API server stays at nice 0
    finally:
        keeper.stop()
        assert stop_process_group(leader.pid, grace_s=5) == []
        leader.stdin.close()
        leader.wait(timeout=5)
