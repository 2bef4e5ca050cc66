"""Work-arounds for Locust behaviour that would corrupt our measurements.

Each is applied once, when the locustfile is imported, and says what it fixes.
"""

from __future__ import annotations

import functools
import select

from gevent import monkey
from geventhttpclient import connectionpool
from locust import argument_parser, runners, stats

from locustfiles.transports import JUST_CHECKED

# Seconds of silence before the master calls a worker missing (Locust's default is 3 missed
# 1-second heartbeats). On a box shared with the server, a worker's event loop can stall for
# several seconds; a worker declared missing has its users moved to the others mid-stage, and
# when all are, the test ends early. A worker that really died is still noticed, 10 s later.
HEARTBEAT_LIVENESS_S = 10


def _cached_default_args_dict():
    """Locust's ``default_args_dict`` builds a fresh argument parser on every call, and a
    worker calls it once per option for every spawn message (a dict comprehension in
    ``WorkerRunner``): ~100 parser builds, about 0.3 s of CPU on an idle machine and
    several seconds on a busy 2-core one. That blocks the worker's event loop, so no
    stream is read meanwhile (TTFT and inter-token gaps grow by the stall) and heartbeats
    stop, until the master declares the worker missing and ends the test early, losing its
    last stats. The defaults never change within a process, so build them once."""
    original = argument_parser.default_args_dict
    if getattr(original, "_envelope_cached", False):
        return original
    build_once = functools.cache(original)

    @functools.wraps(original)
    def default_args_dict() -> dict:
        return dict(build_once())  # a copy: callers may modify what they get

    default_args_dict._envelope_cached = True
    return default_args_dict


def _quiet_csv_writer():
    """Locust's CSV writer greenlet can run once more after Locust closed its files at exit
    and die with "I/O operation on closed file", printing a traceback after a clean run.
    The files were final by then (see ``locustfiles.llm._write_final_csvs``): end quietly."""
    original = stats.StatsCSVFileWriter.stats_writer
    if getattr(original, "_envelope_quiet", False):
        return original

    @functools.wraps(original)
    def stats_writer(self) -> None:
        try:
            original(self)
        except ValueError as exc:
            if "closed file" not in str(exc):
                raise

    stats_writer._envelope_quiet = True
    return stats_writer


def _socket_alive_without_yield():
    """geventhttpclient checks that a pooled keep-alive connection is still open before reusing it,
    with ``select.select([sock], [], [], 0)``. Under Locust's monkey-patching that is gevent's
    select, which yields to the hub even with a zero timeout, so other greenlets ran between a
    request's start stamp and its send (their turns showed as send delay: p50 0.38 ms before, 0.22
    ms after at 100 streams, 1.8 and 0.3 ms at 500; benchmarks/README.md). And ``select`` refuses
    descriptors at or above 1024 (FD_SETSIZE); the check read that as a dead connection, so past
    about a thousand open connections every request closed its connection and opened a new one.
    The unpatched ``poll`` asks the same question (readable, hung up or in error while idle: not
    reusable) with neither.

    A connection the pool was told about under :data:`JUST_CHECKED` passes without the question:
    the transport took it from this pool a moment before (checked then, or opened then) and nothing
    ran since. Asking again would read a server that resets a connection at accept as a stale
    idle connection and reconnect silently, so a refused connection would never fail a request."""
    original = connectionpool.ConnectionPool._is_socket_alive
    if getattr(original, "_envelope_no_yield", False):
        return original
    poll = monkey.get_original("select", "poll")
    readable = select.POLLIN | select.POLLPRI  # POLLHUP and POLLERR are always reported

    @functools.wraps(original)
    def _is_socket_alive(self, sock) -> bool:
        if sock is None:
            return False
        if sock is self.__dict__.pop(JUST_CHECKED, None):
            return True  # handed over by transports._connect_ahead: answered (or opened) just now
        try:
            fd = sock.fileno()
            if fd < 0:
                return False
            poller = poll()
            poller.register(fd, readable)
            return not poller.poll(0)
        except (OSError, ValueError):
            return False

    _is_socket_alive._envelope_no_yield = True
    return _is_socket_alive


def apply() -> None:
    argument_parser.default_args_dict = _cached_default_args_dict()
    stats.StatsCSVFileWriter.stats_writer = _quiet_csv_writer()
    runners.HEARTBEAT_LIVENESS = max(runners.HEARTBEAT_LIVENESS, HEARTBEAT_LIVENESS_S)
    connectionpool.ConnectionPool._is_socket_alive = _socket_alive_without_yield()
