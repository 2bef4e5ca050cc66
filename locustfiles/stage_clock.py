"""The stage clock of a run: which stage is current, and the log of stages as they ran.

Pure: no Locust, no gevent. The master (or the single local process) owns one
and calls :meth:`StageClock.enter` from the load shape's tick; every change is
handed to ``on_change`` (which writes ``stages.json`` through
:func:`envelope.stages.write_stages`). Workers keep a clock too, but only to know
the current stage the master announced (:meth:`StageClock.follow`); their log stays empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from envelope.scenario import ResolvedStage
from envelope.stages import StageRecord

__all__ = ["StageClock", "ManualStage"]


@dataclass(frozen=True)
class ManualStage:
    """The stand-in stage for interactive web-UI ramps: the user count is whatever the operator sets."""

    index: int
    pass_index: int
    pass_name: str
    name: str
    base: ResolvedStage

    def __getattr__(self, item: str) -> Any:
        return getattr(self.base, item)


class StageClock:
    """Stages planned (``stages``) and stages as they ran (``log``, one :class:`StageRecord` each)."""

    def __init__(self, stages: Sequence[ResolvedStage], *, manual: bool,
                 on_change: Callable[[list[StageRecord]], None] | None = None) -> None:
        self.stages: list[ResolvedStage] = list(stages)
        self.manual = manual
        self.current_index = 0
        self.log: list[StageRecord] = []
        self.on_change = on_change
        self.followed: ResolvedStage | None = None  # worker: the stage the master last announced

    @property
    def stage(self) -> ResolvedStage | ManualStage:
        """The stage requests are sent for now."""
        if self.manual:
            return ManualStage(index=0, pass_index=0, pass_name="manual", name="manual", base=self.stages[0])
        if self.followed is not None:
            return self.followed
        return self.stages[min(self.current_index, len(self.stages) - 1)]

    @property
    def running(self) -> StageRecord | None:
        """The stage in the log that has not ended, if any."""
        return self.log[-1] if self.log and self.log[-1].end_unix_s is None else None

    def enter(self, index: int, *, now_unix_s: float, max_model_len: int | None = None,
              client_processes: int | None = None, budget: Any = None) -> StageRecord:
        """A new stage began: close the running one, log the new one, say so.

        ``client_processes``: how many processes send its requests; ``budget``: what one handles
        accurately (an :class:`envelope.client_budget.ClientBudget`), both kept in its record.
        """
        self._close(now_unix_s)
        self.current_index = index
        record = self.stages[index].record(max_model_len=max_model_len).replace(start_unix_s=now_unix_s)
        if client_processes is not None:
            record = record.replace(
                client_processes=int(client_processes),
                client_budget_streams_per_process=None if budget is None else budget.streams_per_process,
                client_budget_rate_per_s_per_process=None if budget is None else budget.rate_per_s_per_process)
        self.log.append(record)
        self._changed()
        return record

    def end(self, *, now_unix_s: float) -> bool:
        """The schedule ended: close the running stage; False when none was running."""
        if self.running is None:
            return False
        self._close(now_unix_s)
        self._changed()
        return True

    def enter_manual(self, *, now_unix_s: float, max_model_len: int | None = None) -> bool:
        """Web-UI ramps: one open-ended stage for the whole run (once); False when already entered."""
        if self.log:
            return False
        base = self.stages[0].record(max_model_len=max_model_len)
        self.log.append(base.replace(pass_name="manual", stage_name="manual", stage_index=0, pass_index=0,
                                     target_users=None, spawn_rate=None, duration_s=None,
                                     start_unix_s=now_unix_s, end_unix_s=None))
        self._changed()
        return True

    def follow(self, index: int, stage: ResolvedStage | None = None) -> bool:
        """Worker: the master says stage ``index`` (``stage``, when known) is current; True when that is a change.

        A search inserts its probes as it goes, so a worker takes the stage the
        master announced rather than its own list's entry at that index.
        """
        changed = index != self.current_index
        self.current_index = index
        if stage is not None:
            self.followed = stage
        return changed

    def set_running_duration(self, duration_s: float) -> None:
        """A search ended its running probe: the stage lasted ``duration_s``, not the most it could have."""
        running = self.running
        if running is not None:
            self.log[-1] = running.replace(duration_s=round(float(duration_s), 3))
            self._changed()

    def note_client_health(self, *, loop_lag_ms: float | None = None, cpu_percent: float | None = None) -> None:
        """Keep the worst event-loop lag and CPU use of any load generator in the running stage."""
        running = self.running
        if running is None:
            return
        self.log[-1] = running.with_client_health(loop_lag_ms=loop_lag_ms, cpu_percent=cpu_percent)

    def _close(self, now_unix_s: float) -> None:
        if self.running is not None:
            self.log[-1] = self.log[-1].replace(end_unix_s=now_unix_s)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.log)
