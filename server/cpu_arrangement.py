"""Keep vLLM's CPU engine out of the way of its API front end and the load generator.

On a box with few cores, vLLM's engine-core (scheduler) and worker processes,
its API server and Locust share cores. The engine busy-polls, and the API server
and the client are starved: the client sees a far longer TTFT than the server's
own histogram (measured on 2 cores: 136 ms vs 17 ms at 1 user). Nice 19 on every
thread of the engine processes, with the API server and the client left at nice
0, closes that gap for a few percent of generation throughput (server/README.md).

``renice(2)`` on a pid changes only that thread, and a thread inherits its
creator's nice value at creation: so every thread of ``/proc/PID/task`` is set,
and :class:`EngineNice` repeats the pass every second for threads created later.
Errors (a thread that ended, no permission) are ignored: the arrangement is a
courtesy to the measurement, never a reason to fail a run.

The pure part (:func:`is_engine_process`, :func:`threads_to_renice`) works on
:class:`ProcessView` snapshots, so it is tested on a fake process tree.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

__all__ = [
    "ENGINE_MARKERS",
    "EngineNice",
    "ProcessView",
    "is_engine_process",
    "keep_group_niced",
    "renice_pass",
    "snapshot_group",
    "thread_nice",
    "threads_to_renice",
]

# vLLM names its processes with setproctitle: psutil's name() and cmdline()[0]
# read "VLLM::EngineCore" and "VLLM::Worker" (the kernel's comm is cut to 15
# characters, "VLLM::EngineCor"). The API server keeps "python -m vllm...".
ENGINE_MARKERS: tuple[str, ...] = ("VLLM::EngineCore", "VLLM::Worker")


@dataclass(frozen=True)
class ProcessView:
    """One process as seen by a pass: its name, command line and thread ids."""

    pid: int
    name: str
    cmdline: tuple[str, ...]
    thread_ids: tuple[int, ...]


def is_engine_process(name: str, cmdline: Sequence[str], markers: Sequence[str] = ENGINE_MARKERS) -> bool:
    """True when the process name or the start of its command line carries an engine marker."""
    first = cmdline[0] if cmdline else ""
    # name[:15]: the kernel keeps 15 characters of a name ("VLLM::EngineCor"); psutil
    # completes it from the command line when it can read that
    return any(name.startswith(m[:15]) or first.startswith(m) for m in markers)


def threads_to_renice(
    processes: Iterable[ProcessView],
    nice_of: Callable[[int], int | None],
    target: int,
    markers: Sequence[str] = ENGINE_MARKERS,
) -> tuple[list[int], int]:
    """Engine threads whose nice value is not ``target`` yet, and the number of engine threads seen.

    ``nice_of(tid)`` returns a thread's nice value, or None when it is gone.
    """
    todo: list[int] = []
    seen = 0
    for proc in processes:
        if not is_engine_process(proc.name, proc.cmdline, markers):
            continue
        for tid in proc.thread_ids:
            nice = nice_of(tid)
            if nice is None:
                continue
            seen += 1
            if nice != target:
                todo.append(tid)
    return todo, seen


# -- the system side (Linux) --


def thread_nice(tid: int) -> int | None:
    """A thread's nice value, or None when it cannot be read (it ended)."""
    try:
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:
        return None


def _set_thread_nice(tid: int, nice: int) -> bool:
    try:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError:  # the thread ended, or lowering a nice value without the right
        return False
    return True


def _thread_ids(pid: int) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except (OSError, ValueError):
        return ()


def snapshot_group(pgid: int) -> list[ProcessView]:
    """The live processes of group ``pgid`` with their threads; processes that vanish are left out."""
    import psutil

    from server.process import group_members

    views = []
    for proc in group_members(pgid):
        try:
            views.append(ProcessView(proc.pid, proc.name(), tuple(proc.cmdline()), _thread_ids(proc.pid)))
        except psutil.Error:
            continue
    return views


def renice_pass(
    pgid: int,
    target: int,
    *,
    markers: Sequence[str] = ENGINE_MARKERS,
    snapshot: Callable[[int], list[ProcessView]] = snapshot_group,
    nice_of: Callable[[int], int | None] = thread_nice,
    set_nice: Callable[[int, int], bool] = _set_thread_nice,
) -> tuple[int, int]:
    """One pass over group ``pgid``: ``(threads reniced now, engine threads seen)``."""
    todo, seen = threads_to_renice(snapshot(pgid), nice_of, target, markers)
    return sum(1 for tid in todo if set_nice(tid, target)), seen


class EngineNice:
    """A daemon thread that keeps every engine thread of a process group at one nice value.

    ``apply_once()`` runs a pass now (the launcher calls it when the server is
    healthy); ``start()`` repeats it every ``interval_s`` until ``stop()``.
    """

    def __init__(
        self,
        pgid: int,
        nice: int,
        *,
        interval_s: float = 1.0,
        markers: Sequence[str] = ENGINE_MARKERS,
        snapshot: Callable[[int], list[ProcessView]] = snapshot_group,
    ) -> None:
        self.pgid = pgid
        self.nice = nice
        self.interval_s = interval_s
        self.markers = tuple(markers)
        self._snapshot = snapshot
        self.threads_reniced = 0  # over all passes
        self.engine_threads = 0  # seen by the last pass
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EngineNice(pgid={self.pgid}, nice={self.nice}, threads_reniced={self.threads_reniced})"

    def apply_once(self) -> int:
        """One pass; returns how many threads it reniced. Never raises for a vanished process or thread."""
        with self._lock:
            try:
                done, seen = renice_pass(self.pgid, self.nice, markers=self.markers, snapshot=self._snapshot)
            except Exception:  # a process tree changing under us: try again next pass
                return 0
            self.threads_reniced += done
            self.engine_threads = seen
            return done

    def start(self) -> "EngineNice":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="envelope-engine-nice", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def describe(self) -> dict[str, int]:
        """What goes into ``server.json`` as ``cpu_arrangement``."""
        return {"engine_nice": self.nice, "threads_reniced": self.threads_reniced, "engine_threads": self.engine_threads}

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.apply_once()


def keep_group_niced(pgid: int, nice: int, *, interval_s: float = 1.0) -> int:
    """Renice group ``pgid``'s engine threads every ``interval_s`` until the group is gone; returns the count.

    For ``envelope server up``, whose own process exits once the server is
    healthy: it runs this in a detached ``python -m server.cpu_arrangement``.
    """
    import time

    from server.process import group_members

    keeper = EngineNice(pgid, nice, interval_s=interval_s)
    while group_members(pgid):
        keeper.apply_once()
        time.sleep(interval_s)
    return keeper.threads_reniced


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m server.cpu_arrangement",
                                     description="Keep a vLLM process group's engine threads at a nice value.")
    parser.add_argument("pgid", type=int)
    parser.add_argument("nice", type=int)
    args = parser.parse_args(argv)
    keep_group_niced(args.pgid, args.nice)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
