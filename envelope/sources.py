"""The data files a scenario names (datasets, traces): found next to the scenario, read once, checked.

A scenario's ``dataset`` and ``trace`` paths are relative to the scenario file.
:func:`anchor_sources` makes them absolute and reads every file, so a bad file
fails the scenario's loading with its own ``file:line`` (before a server starts
or any load is sent); the entries stay in a per-process cache that the load
generator and :meth:`envelope.scenario.Scenario.resolve` read again for free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from envelope.config import ConfigError, find_line
from envelope.datasets import DatasetEntry, read_dataset
from envelope.traces import TraceEntry, read_trace, trace_offsets_s

if TYPE_CHECKING:  # pragma: no cover
    from envelope.scenario import DatasetSource, Scenario, TraceSource

__all__ = ["dataset_entries", "trace_entries", "TracePlan", "trace_plan", "anchor_sources"]

# the last request of a replay is sent this long before its stage ends, so that it is sent within it
TRACE_TAIL_S = 1.0


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


@lru_cache(maxsize=32)
def _dataset(path: str, fmt: str, limit: int | None, stamp: tuple[int, int]) -> tuple[DatasetEntry, ...]:
    return tuple(read_dataset(path, format=fmt, limit=limit))  # type: ignore[arg-type]


@lru_cache(maxsize=32)
def _trace(path: str, fmt: str, stamp: tuple[int, int]) -> tuple[TraceEntry, ...]:
    return tuple(read_trace(path, format=fmt))  # type: ignore[arg-type]


def _readable(path: str) -> tuple[int, int]:
    try:
        return _stamp(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None


def dataset_entries(source: DatasetSource) -> tuple[DatasetEntry, ...]:
    """The entries of a dataset (its path made absolute by :func:`anchor_sources`); read once per process."""
    return _dataset(source.path, source.format, source.limit, _readable(source.path))


def trace_entries(source: TraceSource) -> tuple[TraceEntry, ...]:
    """The entries of a trace, sorted by time; read once per process."""
    return _trace(source.path, source.format, _readable(source.path))


@dataclass(frozen=True, kw_only=True, slots=True)
class TracePlan:
    """A trace as a stage replays it: each entry's send offset, the stage's length and mean rate."""

    entries: tuple[TraceEntry, ...]
    offsets_s: tuple[float, ...]  # from the stage's start, after speedup or rate scaling
    duration_s: float  # the last send plus TRACE_TAIL_S
    rate_per_s: float  # requests / duration_s: the stage's mean rate as replayed


def trace_plan(source: TraceSource) -> TracePlan:
    entries = trace_entries(source)
    offsets = tuple(trace_offsets_s(entries, speedup=source.speedup, rate_per_s=source.rate_per_s))
    duration = (offsets[-1] if offsets else 0.0) + TRACE_TAIL_S
    return TracePlan(entries=entries, offsets_s=offsets, duration_s=duration, rate_per_s=len(entries) / duration)


def _walk(scenario: Scenario) -> Iterator[tuple[tuple[str | int, ...], Any, Callable[[Any], Any]]]:
    """(YAML path, source model, rebuild(new source) -> new scenario) for every dataset and trace."""

    def workload_sites(prefix: tuple[str | int, ...], holder_get, holder_set):
        workload = holder_get()
        if workload is not None and workload.dataset is not None:
            yield (prefix + ("workload", "dataset"), workload.dataset,
                   lambda new: holder_set(workload.model_copy(update={"dataset": new})))

    sc = scenario
    yield from workload_sites(("defaults",), lambda: sc.defaults.workload,
                              lambda w: sc.model_copy(update={"defaults": sc.defaults.model_copy(update={"workload": w})}))
    for ci, client in enumerate(sc.clients):
        yield from workload_sites(("clients", ci), lambda c=client: c.workload,
                                  lambda w, ci=ci, c=client: _with_item(sc, "clients", ci, c.model_copy(update={"workload": w})))
    for pi, pass_ in enumerate(sc.passes):
        yield from workload_sites(("passes", pi), lambda p=pass_: p.workload,
                                  lambda w, pi=pi, p=pass_: _with_item(sc, "passes", pi, p.model_copy(update={"workload": w})))
        for si, stage in enumerate(pass_.stages or ()):
            def set_stage(new_stage, pi=pi, si=si, p=pass_):
                stages = list(p.stages or ())
                stages[si] = new_stage
                return _with_item(sc, "passes", pi, p.model_copy(update={"stages": stages}))

            yield from workload_sites(("passes", pi, "stages", si), lambda st=stage: st.workload,
                                      lambda w, st=stage, f=set_stage: f(st.model_copy(update={"workload": w})))
            if stage.trace is not None:
                yield (("passes", pi, "stages", si, "trace"), stage.trace,
                       lambda new, st=stage, f=set_stage: f(st.model_copy(update={"trace": new})))


def _with_item(scenario: Scenario, field: str, index: int, item: Any) -> Scenario:
    items = list(getattr(scenario, field))
    items[index] = item
    return scenario.model_copy(update={field: items})


def anchor_sources(scenario: Scenario, scenario_path: str | os.PathLike[str], *, text: str | None = None) -> Scenario:
    """``scenario`` with every dataset and trace path made absolute (relative to the scenario file) and
    every such file read and checked; a trace stage without ``duration_s`` lasts as long as its replay.

    Raises :class:`ConfigError`: the data file's own ``file:line`` for a bad file, the
    scenario's line for a file that is not there.
    """
    base = Path(scenario_path).parent
    while True:  # each rebuild makes a new scenario: walk again until every path is absolute
        for at, source, rebuild in _walk(scenario):
            if not os.path.isabs(source.path):
                scenario = rebuild(source.model_copy(update={"path": str((base / source.path).resolve())}))
                break
        else:
            break
    for at, source, _ in _walk(scenario):
        line = find_line(scenario_path, at + ("path",), text=text)
        where = f"{scenario_path}:{line}" if line is not None else str(scenario_path)
        if not os.path.exists(source.path):
            key = "".join(f"[{a}]" if isinstance(a, int) else f".{a}" for a in at).lstrip(".")
            raise ConfigError(f"{where}: {key}.path: no such file {source.path}")
        if at[-1] == "trace":
            plan = trace_plan(source)
            if plan.rate_per_s <= 0 or not plan.entries:
                raise ConfigError(f"{where}: the trace {source.path} has no requests")
        else:
            dataset_entries(source)
    for pi, pass_ in enumerate(scenario.passes):
        for si, stage in enumerate(pass_.stages or ()):
            if stage.trace is not None and stage.duration_s is None:
                stages = list(pass_.stages or ())
                stages[si] = stage.model_copy(update={"duration_s": trace_plan(stage.trace).duration_s})
                pass_ = pass_.model_copy(update={"stages": stages})
                scenario = _with_item(scenario, "passes", pi, pass_)
    return scenario
