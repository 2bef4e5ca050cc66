"""Stop a whole process group: SIGTERM, a grace period, then SIGKILL, and check nothing is left.

vLLM on CPU forks an engine-core and a worker process; killing only the API
server would orphan them. The launcher starts vLLM as a session leader, so its
process group holds every process it spawned.
"""

from __future__ import annotations

import os
import signal
import time

import psutil

__all__ = ["group_members", "stop_process_group"]


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            continue
    return out


def stop_process_group(pgid: int, *, grace_s: float = 15.0, poll_interval_s: float = 0.1) -> list[int]:
    """Stop every process of group ``pgid`` (and their descendants); return pids still alive (normally ``[]``).

    Sends SIGTERM to the group, waits up to ``grace_s``, then SIGKILLs the group
    and any straggler that left it. Zombies count as stopped: their parent reaps them.
    """
    tracked = group_members(pgid)
    for proc in list(tracked):
        try:
            tracked.extend(proc.children(recursive=True))
        except psutil.Error:
            pass
    if not tracked:
        return []
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _alive(tracked) and time.monotonic() < deadline:
        time.sleep(poll_interval_s)
    remaining = _alive(tracked) + group_members(pgid)
    if remaining:
        _signal_group(pgid, signal.SIGKILL)
        for proc in remaining:
            try:
                proc.kill()
            except psutil.Error:
                pass
        kill_deadline = time.monotonic() + 5.0
        while (_alive(remaining) or group_members(pgid)) and time.monotonic() < kill_deadline:
            time.sleep(poll_interval_s)
    return sorted({p.pid for p in _alive(tracked) + group_members(pgid)})


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
