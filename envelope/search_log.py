"""``search.json``: what each search pass of a run probed, judged and decided, as it happened.

The Locust side writes it after every probe (``locustfiles/search_driver.py``);
the progress display, the web UI's LLM tab and the analysis read it. The probes
themselves are ordinary stages (``stages.json``, the records); this file adds
what only the search knows: the spec it ran with, the live count of good and
judged requests of each probe, and each decision with its reason.

The analysis recomputes every probe's attainment from the records and the
stage's steady-state window, and the bracket from those
(:func:`envelope.search.bracket`); the live figures here are what steered the search.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import orjson

from envelope.rundir import SEARCH_FILE, atomic_write_json

__all__ = ["ProbeEntry", "SearchEntry", "write_search_log", "read_search_log"]

SCHEMA_VERSION = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class ProbeEntry:
    """One probe: its stage, level, and the live judgement that steered the search."""

    stage_index: int
    stage_name: str
    level: float
    good: int
    judged: int
    duration_s: float
    attainment: float | None  # good / judged
    attainment_low: float
    attainment_high: float
    verdict: str  # pass | fail | unresolved (at the search's confidence)
    decision_phase: str = ""
    decision: str = ""  # the sentence that chose what came next
    next_level: float | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class SearchEntry:
    """One search pass: its settings, probes so far, and (once done) the bracket."""

    pass_name: str
    over: str  # users | rate
    spec: Mapping[str, Any]  # the SearchSpec as it ran (after --quick)
    target: float  # attainment target
    thresholds: Mapping[str, float]  # per-request thresholds, ms (ttft_ms, tpot_ms, e2e_ms)
    probes: tuple[ProbeEntry, ...] = ()
    running_level: float | None = None  # the probe now running, if any
    done: bool = False
    reason: str = ""  # why it ended
    bracket: str = ""  # the live answer, one sentence
    highest_pass: float | None = None
    lowest_fail: float | None = None
    status: str = ""  # envelope.search.Bracket.status

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["spec"] = dict(self.spec)
        out["thresholds"] = dict(self.thresholds)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SearchEntry":
        probes = tuple(ProbeEntry(**{k: v for k, v in p.items() if k in ProbeEntry.__dataclass_fields__})
                       for p in data.get("probes") or ())
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "probes"}
        return cls(**known, probes=probes)


def write_search_log(run_dir: str | os.PathLike[str], searches: Sequence[SearchEntry]) -> None:
    atomic_write_json(Path(run_dir) / SEARCH_FILE,
                      {"schema_version": SCHEMA_VERSION, "searches": [s.to_json() for s in searches]})


def read_search_log(run_dir: str | os.PathLike[str]) -> list[SearchEntry]:
    """The searches of a run (empty when it had none); ValueError names the file when it is damaged."""
    path = Path(run_dir) / SEARCH_FILE
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from exc
    try:
        return [SearchEntry.from_json(s) for s in data.get("searches") or ()]
    except (TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a search log ({exc})") from exc
