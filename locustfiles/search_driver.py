"""Runs the search passes of a scenario: ends each probe once it is judged and chooses the next.

Pure of Locust and gevent, so it is tested with a stage clock and record files.
The load shape calls :meth:`SearchDriver.step` once a tick. A search probe is an
ordinary stage held at most ``max_probe_s``; once it has run ``probe_s`` (and
judged at least ``min_requests``), the driver counts its good and judged
requests (:mod:`envelope.attainment`), asks :func:`envelope.search.next_probe`
what comes next, ends the probe there (its duration becomes what it ran) and
inserts the next probe after it, or lets the scenario go on when the search is
over. ``search.json`` (:mod:`envelope.search_log`) says what it did and why.

Which requests a probe judges (:func:`envelope.search.probe_sample`, the same
rule the analysis applies to the probe's records): those sent in the probe (its
``stage_index``) after its first ``settle_s`` and ended by the decision, less
those sent in the last stretch before it (as long as the probe's p95 request,
where only fast requests could have ended), cancelled ones excepted. Requests
sent before the previous stage's last request finished are left out too: after
a step down (17 users to 2, say) the departing users' requests still load the
server, and a probe must measure its own level only.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from envelope.attainment import (Attainment, attainment_target, judge_record, preload_statistics,
                                 thresholds_from_slos)
from envelope.progress import RecordTailer
from envelope.scenario import ResolvedStage, probe_stage_name
from envelope.search import ProbeResult, bracket, min_requests_for, next_probe, probe_sample
from envelope.search_log import ProbeEntry, SearchEntry

from locustfiles.stage_clock import StageClock

__all__ = ["SearchDriver", "announced_stage"]

log = logging.getLogger("envelope")


class SearchDriver:
    """Steers the search probes of one run (the master's, or the single local process's)."""

    def __init__(self, clock: StageClock, *, records_dir: Callable[[], Path | None],
                 write: Callable[[list[SearchEntry]], None]) -> None:
        self.clock = clock
        self._records_dir = records_dir
        self._write = write
        self._tailer: RecordTailer | None = None
        # stage_index -> [(start unix s, completion unix s, good?)] for the probes' judged requests
        self._judged: dict[int, list[tuple[float, float, bool]]] = {}
        # the latest completion of any request sent before each stage_index began (drained by then)
        self._last_done_before: dict[int, float] = {}
        # stage_index -> (start, end) unix s of every request in flight at some point during that probe
        self._spans: dict[int, list[tuple[float, float]]] = {}
        self._probes: dict[str, list[ProbeResult]] = {}
        self._entries: dict[str, SearchEntry] = {}
        self._decided: set[int] = set()  # stage indexes of probes already judged
        preload_statistics()  # not in the middle of the first probe, where it would stall every request in flight

    @property
    def entries(self) -> list[SearchEntry]:
        return list(self._entries.values())

    # -- the tick ------------------------------------------------------------------------------
    def step(self, *, stage_index: int | None, stage_elapsed_s: float | None, now_unix_s: float) -> bool:
        """Judge the running probe when it is due; True when the stage list changed (the probe ended).

        ``stage_index``/``stage_elapsed_s``: where the schedule is now (None once it has run out).
        """
        running = self.clock.running
        if running is None or running.stage_index in self._decided:
            return False
        stage = self.clock.stages[running.stage_index]
        spec = stage.search
        if spec is None:
            return False
        entry = self._entry(stage)
        self._ingest()
        overdue = stage_index != running.stage_index  # a late tick: the schedule already left the probe
        # the schedule's own clock, so that the probe ends exactly where the next stage starts
        held_s = now_unix_s - running.start_unix_s if overdue or stage_elapsed_s is None else stage_elapsed_s
        if not overdue and held_s < spec.probe_s:
            return False
        opens = max(running.start_unix_s + spec.settle_for_s, self._last_done_before.get(running.stage_index, 0.0),
                    self._settled(running, stage, now_unix_s))
        seen = self._judged.get(running.stage_index, [])
        chosen = probe_sample([t for t, _, _ in seen], [t for _, t, _ in seen], opens_unix_s=opens,
                              closes_unix_s=now_unix_s)
        judged, good = int(chosen.sum()), sum(g for (_, _, g), c in zip(seen, chosen) if c)
        if not overdue and judged < min_requests_for(spec, attainment_target(stage.slos)) \
                and held_s < spec.probe_cap_s - 1.0:
            return False
        duration_s = min(held_s, stage.duration_s) if overdue else held_s
        self._decided.add(running.stage_index)
        target = attainment_target(stage.slos)
        probe = ProbeResult(level=stage.level, good=good, judged=judged, duration_s=duration_s)
        probes = self._probes.setdefault(stage.pass_name, [])
        probes.append(probe)
        decision = next_probe(spec, probes, target=target, elapsed_s=sum(p.duration_s for p in probes))
        share = Attainment.of(good, judged, confidence=spec.confidence)
        self._end_probe(running.stage_index, duration_s)
        if decision.level is not None:
            repeat = sum(1 for p in probes if p.level == decision.level) + 1
            name = probe_stage_name(stage.pass_name, decision.level, over=spec.over, repeat=repeat)
            self._insert(running.stage_index + 1, stage.probe(decision.level, index=running.stage_index + 1, name=name))
        result = bracket(spec, probes, target=target)
        entry = dataclasses.replace(
            entry,
            probes=entry.probes + (ProbeEntry(
                stage_index=running.stage_index, stage_name=stage.name, level=stage.level, good=good, judged=judged,
                duration_s=round(duration_s, 3), attainment=None if not judged else good / judged,
                attainment_low=share.low, attainment_high=share.high, verdict=share.verdict(target),
                decision_phase=decision.phase, decision=decision.reason, next_level=decision.level),),
            running_level=decision.level, done=decision.level is None,
            reason=decision.reason if decision.level is None else "",
            bracket=result.describe("users" if spec.over == "users" else "requests/s"),
            highest_pass=result.highest_pass, lowest_fail=result.lowest_fail, status=result.status,
        )
        self._entries[stage.pass_name] = entry
        log.info("envelope: search %s: %s", stage.pass_name, decision.reason)
        self._save()
        return True

    # -- parts ---------------------------------------------------------------------------------
    def _entry(self, stage: ResolvedStage) -> SearchEntry:
        entry = self._entries.get(stage.pass_name)
        if entry is None:
            spec = stage.search
            assert spec is not None
            thresholds = thresholds_from_slos(stage.slos)
            entry = SearchEntry(
                pass_name=stage.pass_name, over=spec.over, spec=spec.model_dump(mode="json"),
                target=attainment_target(stage.slos),
                thresholds={k: v for k, v in dataclasses.asdict(thresholds).items() if v is not None},
                running_level=stage.level,
            )
            self._entries[stage.pass_name] = entry
            self._save()
        return entry

    def _ingest(self) -> None:
        if self._tailer is None:
            records_dir = self._records_dir()
            if records_dir is None:
                return
            self._tailer = RecordTailer(records_dir)
        wanted = {index: self.clock.stages[index] for index in range(len(self.clock.stages))
                  if self.clock.stages[index].search is not None}
        running = self.clock.running
        for rec in self._tailer.poll():
            done = _completion_unix_s(rec)
            if done is None:
                continue
            start = rec.get("wall_start_unix_s", done)
            if running is not None and done > running.start_unix_s:  # in flight during the probe
                self._spans.setdefault(running.stage_index, []).append((start, done))
            if running is not None and running.stage_index in wanted and rec.get("stage_index") != running.stage_index \
                    and rec.get("wall_start_unix_s", done) < running.start_unix_s:
                # an earlier stage's request, still running when the probe began
                key = running.stage_index
                self._last_done_before[key] = max(self._last_done_before.get(key, 0.0), done)
            stage = wanted.get(rec.get("stage_index"))
            if stage is None or rec.get("pass_name") != stage.pass_name:
                continue
            good = judge_record(rec, thresholds_from_slos(stage.slos))
            if good is None:
                continue
            self._judged.setdefault(rec["stage_index"], []).append((rec["wall_start_unix_s"], done, good))

    def _settled(self, running, stage: ResolvedStage, now_unix_s: float) -> float:
        """Closed loop: when requests in flight (as far as the records tell) last fell to the probe's users.

        A user Locust is stopping may send once more with the new probe's workload before it stops;
        those requests load the server like any other, so judging waits for them as the table's
        window does (``analysis.table``: opened when in flight fell to the stage's users).
        """
        if stage.open_loop or not stage.users:
            return 0.0
        spans = self._spans.get(running.stage_index, [])
        t = np.array([a for a, _ in spans] + [b for _, b in spans], dtype=float)
        step = np.concatenate([np.ones(len(spans), dtype=np.int64), -np.ones(len(spans), dtype=np.int64)])
        order = np.lexsort((step, t))  # at one instant an end counts before a start
        t, flight = t[order], np.cumsum(step[order])
        over = np.flatnonzero((flight > stage.users) & (t < now_unix_s))
        if not over.size:
            return 0.0  # never more in flight than its users
        last = over[-1]  # judging opens when the last stretch over its users ended
        return float(t[last + 1]) if last + 1 < len(t) else now_unix_s

    def _end_probe(self, index: int, duration_s: float) -> None:
        stages = self.clock.stages
        stages[index] = dataclasses.replace(stages[index], duration_s=duration_s)
        self.clock.set_running_duration(duration_s)

    def _insert(self, index: int, stage: ResolvedStage) -> None:
        stages = self.clock.stages
        stages.insert(index, stage)
        for i in range(index + 1, len(stages)):
            stages[i] = dataclasses.replace(stages[i], index=i)

    def _save(self) -> None:
        try:
            self._write(self.entries)
        except OSError as exc:
            log.warning("envelope: could not write search.json (%s)", exc)


def _completion_unix_s(rec: Mapping[str, Any]) -> float | None:
    start = rec.get("wall_start_unix_s")
    t0 = rec.get("t_start_s")
    t_end = rec.get("t_done_s")
    if t_end is None:
        t_end = rec.get("t_last_token_s")
    if start is None or t0 is None or t_end is None:
        return None
    return start + (t_end - t0)


def announced_stage(static: Sequence[ResolvedStage], data: Mapping[str, Any]) -> ResolvedStage | None:
    """Worker: the stage the master announced, from this worker's own copy of the scenario.

    A search probe (``data["probe"]``: its pass and level) is built from the
    search pass's first probe; any other stage is found by name (a search before
    it shifted its index). None when the announcement names nothing known here.
    """
    index, name = int(data.get("stage_index", 0)), data.get("stage_name")
    probe = data.get("probe")
    if probe:
        template = next((s for s in static if s.pass_name == probe.get("pass_name") and s.search is not None), None)
        if template is None:
            return None
        return template.probe(float(probe["level"]), index=index, name=name or template.name)
    for stage in static:
        if stage.name == name:
            return stage if stage.index == index else dataclasses.replace(stage, index=index)
    return None
