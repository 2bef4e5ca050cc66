"""A Locust plugin for tests: stalls this process's event loop on a schedule, as a busy load generator would.

Load it next to the locustfile (``-f locustfiles/llm.py,tests/helpers/stall_plugin.py``). From the
environment: ``STALL_TEST_FIRST_S`` (seconds after the test starts), ``STALL_TEST_S`` (how long each
stall holds the CPU without yielding), ``STALL_TEST_EVERY_S`` and ``STALL_TEST_COUNT``.
"""

from __future__ import annotations

import os
import time

import gevent
from locust import events


def _hold_cpu(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:  # no yield: every greenlet of this process waits
        pass


def _stall(first_s: float, stall_s: float, every_s: float, count: int) -> None:
    gevent.sleep(first_s)
    for _ in range(count):
        _hold_cpu(stall_s)
        gevent.sleep(max(every_s - stall_s, 0.0))


@events.test_start.add_listener
def _start(environment, **_kw) -> None:
    if environment.runner is None or os.environ.get("STALL_TEST_S") is None:
        return
    gevent.spawn(_stall, float(os.environ.get("STALL_TEST_FIRST_S", "5")), float(os.environ["STALL_TEST_S"]),
                 float(os.environ.get("STALL_TEST_EVERY_S", "1")), int(os.environ.get("STALL_TEST_COUNT", "1")))
