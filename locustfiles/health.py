"""The load generator's own health: event-loop lag, and the early stop on rejected first requests.

Pure apart from the ``sleep`` the watcher is given (``gevent.sleep`` in a Locust
process), so both are tested without Locust.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable

__all__ = ["LoopLagWatcher", "EarlyStop", "EARLY_STOP_AFTER", "REJECTION_HINTS"]

EARLY_STOP_AFTER = 3  # rejections, with no success before them, that stop the run
REJECTION_HINTS = {
    "http_401": "check the API key (--api-key-env or --api-key-file)",
    "http_403": "check the API key's permissions",
    "http_404": "check the model name (--model) and that the server offers this endpoint",
}


class LoopLagWatcher:
    """How late a timer fires is how late a chunk's arrival can be noticed.

    :meth:`run` loops forever in its own greenlet, sleeping ``interval_s`` with
    ``sleep``. It keeps the worst lateness since :meth:`take_ms` last took it
    (the per-stage maximum the master reports), and every stall of at least
    ``keep_over_s`` with when it happened (the ``clock``'s time, the same
    ``perf_counter`` as the records' ``t_*_s``), so that a finished request can
    ask for the worst stall that overlapped it (:meth:`worst_overlapping_ms`).
    Stalls older than ``keep_for_s`` are forgotten: no request lasts that long.
    """

    def __init__(self, sleep: Callable[[float], Any], *, interval_s: float = 0.05,
                 clock: Callable[[], float] = time.perf_counter, keep_over_s: float = 0.005,
                 keep_for_s: float = 3600.0) -> None:
        self.sleep = sleep
        self.interval_s = interval_s
        self.clock = clock
        self.max_lag_s = 0.0
        self.keep_over_s = keep_over_s
        self.keep_for_s = keep_for_s
        self.stalls: deque[tuple[float, float]] = deque()  # (start, end) of each stall kept, in time order

    def run(self, *, ticks: int | None = None) -> None:
        """Watch (``ticks`` sleeps, or forever)."""
        last = self.clock()
        n = 0
        while ticks is None or n < ticks:
            self.sleep(self.interval_s)
            now = self.clock()
            self.note(now - last - self.interval_s, now_s=now)
            last = now
            n += 1

    def note(self, lag_s: float, *, now_s: float | None = None) -> None:
        """A timer fired ``lag_s`` late, noticed at ``now_s``: the loop could not run in ``[now - lag, now]``."""
        if lag_s > self.max_lag_s:
            self.max_lag_s = lag_s
        if now_s is not None and lag_s >= self.keep_over_s:
            self.stalls.append((now_s - lag_s, now_s))
            while self.stalls and self.stalls[0][1] < now_s - self.keep_for_s:
                self.stalls.popleft()

    def take_ms(self) -> float:
        """The worst lag since the last call, in ms; starts over."""
        lag, self.max_lag_s = self.max_lag_s, 0.0
        return lag * 1000.0

    def worst_overlapping_ms(self, start_s: float, end_s: float) -> float:
        """The longest kept stall that overlapped ``[start_s, end_s]``, in ms (0.0: none)."""
        worst = 0.0
        for s0, s1 in reversed(self.stalls):
            if s1 < start_s:
                break  # kept in time order: every earlier stall ended before the request began
            if s0 <= end_s:
                worst = max(worst, s1 - s0)
        return worst * 1000.0


class EarlyStop:
    """Stop the run when the first requests are all rejected (401/403/404) before any succeeded.

    The probe at start already checks the key and the model on ``/v1/models``;
    this catches what only the generation endpoint rejects, instead of recording
    thousands of identical failures. :meth:`note` returns the one-line reason
    once, when the run should stop; None otherwise.
    """

    def __init__(self, *, after: int = EARLY_STOP_AFTER) -> None:
        self.after = after
        self.succeeded_once = False
        self.rejected_before_success = 0
        self.fired = False

    def note(self, error_category: str | None, error_detail: str | None = None) -> str | None:
        if self.succeeded_once:
            return None
        if error_category is None:
            self.succeeded_once = True
            return None
        hint = REJECTION_HINTS.get(str(error_category))
        if hint is None:
            return None
        self.rejected_before_success += 1
        if self.rejected_before_success < self.after or self.fired:
            return None
        self.fired = True
        status = str(error_category).removeprefix("http_")
        detail = f" ({error_detail[:160]})" if error_detail else ""
        return (f"the server answered HTTP {status} to the first {self.rejected_before_success} requests "
                f"and none succeeded{detail}; {hint}. Stopped early.")
