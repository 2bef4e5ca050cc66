"""How many load-generator processes a scenario needs: the per-process budget and the ``auto`` rule.

One Locust process runs every stream on one gevent hub, and a chunk is
timestamped when its greenlet gets its turn; the more streams have data at
once, the later the last of them is read, long before the process is at 100%
of its core (``benchmarks/README.md``, "Client accuracy"). So one process
times only so many streams, or paces only so many requests a second,
accurately. That *budget* is measured, not guessed, by
``benchmarks/client_capacity.py --only budget,rate --write-budget PATH`` and
stored with how and where it was measured in ``client_budget.json`` beside
this module. A budget measured on your own load-generator machine can be
written anywhere and named by the ``ENVELOPE_CLIENT_BUDGET`` environment
variable (read when the budget is loaded; Locust's processes inherit it).

The ``auto`` rule (:func:`choose_processes`), used by ``envelope run --processes auto``
and by default when the scenario's peak needs more than one process:

    needed    = max(1, ceil(peak streams / streams budget), ceil(peak rate / rate budget))
    processes = min(needed, cores for the load generator)

*Peak streams*: the most users of any closed-loop stage (a search over users:
its ``max``), or the ``max_concurrency`` of an open-loop stage. *Peak rate*:
the highest ``rate_per_s`` of an open-loop stage (a search over rate: its
``max``; a trace replayed at a ``rate_per_s``: that rate), plus the rate quotas
of client classes. *Cores*: the CPUs this process may run on
(``os.sched_getaffinity``), less :data:`SERVER_CORES` when ``envelope run``
launches the server on the same machine. One process means no ``--processes``
(no master, no worker). When ``needed`` exceeds the cores, the run says so in
one line before it starts, and the stages whose load per process exceeds the
budget are flagged in the report (``analysis.table.trust_reasons``).

Pure: no Locust, no gevent; reads the budget file only when asked.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

__all__ = ["BUDGET_FILE", "BUDGET_ENV", "SERVER_CORES", "ClientBudget", "PeakLoad", "ProcessChoice", "load_budget",
           "scenario_peak", "choose_processes", "load_generator_cores", "over_budget_reason"]

BUDGET_FILE = Path(__file__).with_name("client_budget.json")
BUDGET_ENV = "ENVELOPE_CLIENT_BUDGET"  # a budget file measured on this machine, instead of BUDGET_FILE
# A vLLM launched on this machine keeps two cores busy whatever its device: its API server (HTTP,
# tokenising, streaming) and its engine core (which polls the device in a loop).
SERVER_CORES = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientBudget:
    """What one load-generator process handles accurately, and how that was measured."""

    streams_per_process: int
    rate_per_s_per_process: float
    measured_on: str = ""
    measured_utc: str = ""
    method: str = ""

    @classmethod
    def from_json(cls, data: Any) -> "ClientBudget":
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        streams, rate = data.get("streams_per_process"), data.get("rate_per_s_per_process")
        if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
            raise ValueError(f"streams_per_process must be a positive integer (got {streams!r})")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
            raise ValueError(f"rate_per_s_per_process must be a positive number (got {rate!r})")
        return cls(streams_per_process=streams, rate_per_s_per_process=float(rate),
                   measured_on=str(data.get("measured_on", "")), measured_utc=str(data.get("measured_utc", "")),
                   method=str(data.get("method", "")))


def load_budget(path: str | os.PathLike[str] | None = None) -> ClientBudget:
    """The stored budget: ``path``, else the file ``ENVELOPE_CLIENT_BUDGET`` names, else
    ``client_budget.json`` beside this module.

    Raises :class:`ValueError` with one line when the file is missing or malformed.
    """
    if path is None:
        path = os.environ.get(BUDGET_ENV) or BUDGET_FILE
    path = Path(path)
    try:
        return ClientBudget.from_json(json.loads(path.read_text(encoding="utf-8")))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the load-generator budget ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class PeakLoad:
    """The most a scenario asks of the load generator at once (None: no stage of that kind)."""

    streams: int | None = None
    rate_per_s: float | None = None


def scenario_peak(stages: Iterable[Any]) -> PeakLoad:
    """The peak streams and rate of resolved stages (:class:`envelope.scenario.ResolvedStage`)."""
    streams: int | None = None
    rate: float | None = None

    def more_streams(n: int | float | None) -> None:
        nonlocal streams
        if n:
            streams = max(streams or 0, int(math.ceil(n)))

    def more_rate(r: float | None) -> None:
        nonlocal rate
        if r:
            rate = max(rate or 0.0, float(r))

    for stage in stages:
        quota_rate = sum(c.rate_per_s for c in stage.clients if c.rate_per_s is not None)
        search = getattr(stage, "search", None)
        trace = getattr(stage, "trace", None)
        if search is not None:
            if search.over == "rate":
                more_rate(search.max + quota_rate)
                more_streams(search.max_concurrency)
            else:
                more_streams(search.max)
                more_rate(quota_rate)
        elif trace is not None:
            more_rate((getattr(trace, "rate_per_s", None) or 0.0) + quota_rate)
        elif stage.rate_per_s is not None:
            more_rate(stage.rate_per_s + quota_rate)
            more_streams(stage.max_concurrency)
        else:
            more_streams(stage.users)
            more_rate(quota_rate)
    return PeakLoad(streams=streams, rate_per_s=rate)


def load_generator_cores(*, server_here: bool, available: int | None = None) -> int:
    """The cores the load generator may use: this process's CPUs, less the server's when it runs here."""
    cores = len(os.sched_getaffinity(0)) if available is None else int(available)
    return max(cores - (SERVER_CORES if server_here else 0), 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessChoice:
    """How many processes a load gets on this machine, and why."""

    processes: int  # processes that send requests
    needed: int  # what the peak load needs by the budget
    cores: int  # cores the load generator may use
    peak: PeakLoad
    budget: ClientBudget

    @property
    def locust_processes(self) -> int | None:
        """Locust's ``--processes`` (None: one process, no master and workers)."""
        return self.processes if self.processes > 1 else None

    @property
    def short_of_cores(self) -> bool:
        return self.needed > self.processes

    def describe(self) -> str:
        """One line: the choice and its reasons."""
        return (f"{self.processes} load-generator process{'es' if self.processes != 1 else ''} "
                f"({self._load()}; {self._budget()}; {self.cores} core{'s' if self.cores != 1 else ''})")

    def warning(self) -> str | None:
        """The one line to print before the run when the machine has too few cores for the load."""
        if not self.short_of_cores:
            return None
        return (f"this machine has {self.cores} core{'s' if self.cores != 1 else ''} for the load generator "
                f"but the scenario's peak ({self._load()}) needs {self.needed} processes ({self._budget()}); "
                f"stages above the budget will be flagged in the report")

    def _load(self) -> str:
        parts = []
        if self.peak.streams:
            parts.append(f"{self.peak.streams} streams")
        if self.peak.rate_per_s:
            parts.append(f"{self.peak.rate_per_s:g} requests/s")
        return "peak " + (" and ".join(parts) if parts else "load unknown")

    def _budget(self) -> str:
        return (f"one process times {self.budget.streams_per_process} streams or paces "
                f"{self.budget.rate_per_s_per_process:g} requests/s accurately")


def choose_processes(*, peak_streams: int | None = None, peak_rate_per_s: float | None = None, cores: int,
                     budget: ClientBudget | None = None) -> ProcessChoice:
    """The ``auto`` rule (see the module docstring)."""
    budget = budget or load_budget()
    needed = 1
    if peak_streams:
        needed = max(needed, math.ceil(peak_streams / budget.streams_per_process))
    if peak_rate_per_s:
        needed = max(needed, math.ceil(peak_rate_per_s / budget.rate_per_s_per_process - 1e-9))
    return ProcessChoice(processes=max(1, min(needed, int(cores))), needed=needed, cores=max(int(cores), 1),
                         peak=PeakLoad(streams=peak_streams, rate_per_s=peak_rate_per_s), budget=budget)


def over_budget_reason(*, kind: str, target_users: int | None, target_rate_per_s: float | None,
                       processes: int | None, streams_budget: int | None, rate_budget_per_s: float | None) -> str | None:
    """Why a stage's load per process exceeded the budget (None: it did not, or the stage does not say).

    ``kind``: ``users`` or ``rate``; ``processes``: how many processes sent its requests.
    """
    if not processes or processes < 1:
        return None
    if kind == "rate":
        if not target_rate_per_s or not rate_budget_per_s:
            return None
        per = target_rate_per_s / processes
        if per <= rate_budget_per_s * (1 + 1e-9):
            return None
        return (f"load generator over its budget: {per:.4g} requests/s per process ({processes} process"
                f"{'es' if processes != 1 else ''}), where one paces {rate_budget_per_s:g}/s accurately "
                "(envelope/client_budget.json); send lag and TTFT include its own delays")
    if not target_users or not streams_budget:
        return None
    per_streams = math.ceil(target_users / processes)
    if per_streams <= streams_budget:
        return None
    return (f"load generator over its budget: {per_streams} streams per process ({processes} process"
            f"{'es' if processes != 1 else ''}), where one times {streams_budget} accurately "
            "(envelope/client_budget.json); TTFT and ITL include its own delays")
