"""Per-process state of an Envelope Locust run: options, stages, the record writer, the prompt factory.

One :class:`EnvelopeRun` lives on each Locust process (``environment.envelope``).
The master (or the single local process) owns the stage clock and writes
``run.json`` and ``stages.json``; every process that sends requests owns one
record file. Workers learn the run directory and the current stage from the
master through a custom message, so records are tagged with the stage that
was running when the request was sent.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gevent
import gevent.event

from envelope.prompts import PromptFactory
from envelope.records import RecordWriter
from envelope.rundir import RECORDS_DIR, RunStatus
from envelope.scenario import ResolvedStage, Scenario, load_scenario
from envelope.search_log import write_search_log
from envelope.secrets import REDACTED, Secret, resolve_api_key
from envelope.stages import StageRecord
from locustfiles.cluster import (
    RECORDS_MESSAGE,
    ClockSync,
    RecordShipper,
    RecordSink,
    WorkerLedger,
    record_file_name,
)
from locustfiles.health import EarlyStop, LoopLagWatcher
from locustfiles.run_files import RunFiles, run_dir_from_options
from locustfiles.search_driver import SearchDriver, announced_stage
from locustfiles.server_probe import dataset_key, probe_server
from locustfiles.sources import DatasetSampler, MeasuredDataset
from locustfiles.stage_clock import ManualStage, StageClock
from locustfiles.transports import preload_openai

__all__ = ["EnvelopeRun", "ManualStage", "STAGE_MESSAGE", "WorkerReport"]

log = logging.getLogger("envelope")

STAGE_MESSAGE = "envelope_stage"
ABORT_MESSAGE = "envelope_abort"  # worker -> master: stop the run, with this one-line reason
READY_MESSAGE = "envelope_ready"  # worker -> master: probed the server, prompts calibrated


@dataclass(frozen=True)
class WorkerReport:
    """What a worker's last stats report said about its load, and when the master got it."""

    in_flight: int
    users: int
    received_s: float
    open_loop: int = 0  # time.monotonic() on the master


class EnvelopeRun:
    """Everything one Locust process needs to send requests and write what they did.

    It composes parts that each do one job and need no Locust to be tested:
    :class:`~locustfiles.run_files.RunFiles` (the run directory, run.json, stages.json,
    workers.json), :class:`~locustfiles.stage_clock.StageClock` (which stage is
    current, and the stages as they ran), :class:`~locustfiles.health.LoopLagWatcher`
    and :class:`~locustfiles.health.EarlyStop` (the load generator's health), and
    :func:`~locustfiles.server_probe.probe_server` (model, max length, prompt
    calibration). What is left here is the wiring to Locust: options, the record
    writer or shipper, and the messages between master and workers.
    """

    def __init__(self, environment, options) -> None:
        self.environment = environment
        self.options = options
        self.is_worker = bool(getattr(options, "worker", False))
        self.is_master = bool(getattr(options, "master", False))
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.scenario_path: str | None = getattr(options, "scenario", None) or None
        self.scenario: Scenario = load_scenario(self.scenario_path) if self.scenario_path else _default_scenario()
        if self.is_master and self.scenario_path:
            # Locust sends the master's options to its workers with every spawn message; the scenario
            # goes with them as text, so a worker on another host runs exactly the master's stages
            # (see adopt_master_options) and needs no copy of the file.
            options.envelope_scenario_yaml = Path(self.scenario_path).read_text(encoding="utf-8")
        # a worker's own --scenario, if it was given one: only to warn when the master's differs
        self._own_scenario_yaml = (Path(self.scenario_path).read_text(encoding="utf-8")
                                   if self.is_worker and self.scenario_path else None)
        self.files = RunFiles(run_dir_from_options(options),
                              name=self.scenario.name if self.scenario_path else "manual")
        self._resolve_stages(options)
        self.api_key: Secret | None = resolve_api_key(
            env_var=getattr(options, "api_key_env", None) or None,
            file=getattr(options, "api_key_file", None) or None,
        )
        self.record_text = bool(getattr(options, "record_text", False) or self.scenario.record_text)
        self.writer: RecordWriter | RecordShipper | None = None
        self.factory: PromptFactory | None = None
        self.datasets: dict[tuple, MeasuredDataset] = {}  # measured at the probe, by dataset_key
        self._samplers: dict[tuple, DatasetSampler] = {}
        self.model: str | None = getattr(options, "model", None) or self.scenario.model
        self.max_model_len: int | None = None
        # what the server does with vLLM's extensions (envelope.capabilities), learned at the probe, and
        # the model's tokenizer on this machine where the run counts or sizes tokens with it
        self.capabilities = None
        self.local_tokenizer = None
        self.started_unix_s = time.time()
        # requests being sent by this process now; on a master, each worker's last report
        self.in_flight = 0
        # a request of this process got usage from the server: from then on, a stream that asked
        # for usage and got none is a missing_usage failure (see locustfiles.users.send_one)
        self.server_gave_usage = False
        self.worker_reports: dict[str, WorkerReport] = {}  # client_id -> its last report
        # early stop: requests rejected before any succeeded (a wrong key or model), and who to tell
        self.early_stop = EarlyStop()
        self.on_abort = None  # callable(message) set by the locustfile
        self.aborted = False  # the run is stopping early (master/local: the shape drains and ends)
        self.open_loop = None  # locustfiles.open_loop.OpenLoop, on processes that send
        self._seen_stage = False
        # ready to send: the server was probed and prompts calibrated (test_start); on a master,
        # which workers have said so
        self.ready = False
        self.ready_event = gevent.event.Event()
        self.ready_workers: set[str] = set()
        self.loop_lag = LoopLagWatcher(gevent.sleep)
        # distributed runs: a worker ships its records and aligns its wall clock to the master's;
        # the master writes what workers ship and keeps their ledger (workers.json)
        self.clock: ClockSync | None = ClockSync() if self.is_worker else None
        self.clock_offset_s = 0.0  # added to time.time() for wall_start_unix_s (master's clock)
        self.sink: RecordSink | None = None
        self.finishing: set[str] = set()  # master, interrupted: workers yet to confirm their last records
        self.drained = False  # master/local: the schedule ended and every worker proved it had nothing left
        self.ledger: WorkerLedger | None = None
        if self.is_master:
            from locustfiles.patches import HEARTBEAT_LIVENESS_S

            self.sink = RecordSink(lambda: self.ensure_run_dir() / "records")
            self.ledger = WorkerLedger(heartbeat_timeout_s=HEARTBEAT_LIVENESS_S)

    def _resolve_stages(self, options) -> None:
        stages = self.scenario.resolve(
            quick=bool(getattr(options, "quick", False)),
            duration_scale=getattr(options, "duration_scale", None),
        )
        # Without a scenario, or with --manual, the operator drives the user count from the web UI.
        manual = not self.scenario_path or bool(getattr(options, "manual", False))
        self.stage_clock = StageClock(stages, manual=manual, on_change=self.files.write_stages)
        if any(c.transport == "openai" for s in stages for c in s.clients):
            preload_openai()
        # the master (or the one local process) steers search passes; workers follow its announcements
        self.search: SearchDriver | None = None
        if not manual and not self.is_worker and any(s.search is not None for s in stages):
            self.search = SearchDriver(
                self.stage_clock,
                records_dir=lambda: None if self.run_dir is None else self.run_dir / RECORDS_DIR,
                write=lambda entries: write_search_log(self.ensure_run_dir(), entries))

    def adopt_master_options(self, options) -> None:
        """Worker, at test start: run the master's scenario and options, whatever this host was given.

        ``options`` is this worker's parsed options after Locust updated them with the
        master's (the spawn message carries them). The API key is never among them:
        each worker reads its own from its environment.
        """
        text = getattr(options, "envelope_scenario_yaml", None)
        path = getattr(options, "scenario", None) or None
        if text:
            source = path or "<the master's scenario>"
            if self._own_scenario_yaml is not None and self._own_scenario_yaml != text:
                log.warning(
                    "envelope: this worker's --scenario differs from the master's; running the master's (%s)", source)
                self._own_scenario_yaml = None  # said once
            self.scenario = load_scenario(source, text=text)
            self.scenario_path = path
        else:  # the master runs without a scenario: the web UI drives the user count
            self.scenario, self.scenario_path = _default_scenario(), None
        self._resolve_stages(options)
        self.model = getattr(options, "model", None) or self.scenario.model
        self.record_text = bool(getattr(options, "record_text", False) or self.scenario.record_text)

    # -- the parts, as the rest of the locustfiles see them ------------------------------------------
    @property
    def run_dir(self) -> Path | None:
        return self.files.run_dir

    @property
    def run_id(self) -> str:
        return self.files.run_id

    @property
    def stages(self) -> list[ResolvedStage]:
        return self.stage_clock.stages

    @property
    def manual(self) -> bool:
        return self.stage_clock.manual

    @property
    def current_index(self) -> int:
        return self.stage_clock.current_index

    @property
    def stage_log(self) -> list[StageRecord]:
        return self.stage_clock.log

    @property
    def stage(self) -> ResolvedStage | ManualStage:
        return self.stage_clock.stage

    def ensure_run_dir(self) -> Path:
        return self.files.ensure()

    # -- where records go ----------------------------------------------------------------------------
    def record_writer(self) -> RecordWriter | RecordShipper:
        """Where this process's records go: its own file, or, on a worker, to the master."""
        if self.writer is None:
            if self.is_worker:
                runner = self.environment.runner
                self.writer = RecordShipper(self.worker_id,
                                            lambda payload: runner.send_message(RECORDS_MESSAGE, payload),
                                            compress=bool(getattr(self.options, "compress_records", False)))
                log.info("envelope: shipping records to the master%s", " (zlib)" if self.writer.compress else "")
            else:
                self.writer = RecordWriter(self.ensure_run_dir() / "records" / record_file_name(self.worker_id))
        return self.writer

    def ship_records(self) -> None:
        """Worker: send the records not yet sent (called often, and before every stats report)."""
        if isinstance(self.writer, RecordShipper):
            self.writer.flush()

    def set_clock(self, estimate) -> None:
        """Worker: use this offset to the master's wall clock from now on."""
        self.clock_offset_s = estimate.offset_s

    def write_workers_json(self) -> None:
        if self.ledger is None:
            return
        self.ledger.changed = False
        self.files.write_workers(self.ledger.to_json(time.time()))

    # -- stages ----------------------------------------------------------------------------------
    def enter_stage(self, index: int, *, now_unix_s: float | None = None) -> None:
        """Master/local: a new stage began (called from the shape's tick)."""
        self.stage_clock.enter(index, now_unix_s=time.time() if now_unix_s is None else now_unix_s,
                               max_model_len=self.max_model_len, client_processes=self._sending_processes(),
                               budget=self._client_budget())
        self._broadcast()
        if self.open_loop is not None:  # local runner: this process sends
            self.open_loop.enter(self.stages[index])

    def _sending_processes(self) -> int:
        """How many processes send this run's requests now: the live workers, or this one."""
        runner = self.environment.runner
        if not self.is_master or runner is None:
            return 1
        return max(sum(1 for node in getattr(runner, "clients", {}).values() if node.state != "missing"), 1)

    def _client_budget(self):
        """The stored per-process budget (None, with a log line once, when it cannot be read)."""
        if not hasattr(self, "_budget"):
            from envelope.client_budget import load_budget

            try:
                self._budget = load_budget()
            except ValueError as exc:
                log.warning("envelope: no load-generator budget, stages are not checked against it: %s", exc)
                self._budget = None
        return self._budget

    def end_stages(self, *, now_unix_s: float | None = None) -> None:
        if self.ledger is not None:  # workers that go from now on went with the run
            self.ledger.closing = True
        if self.stage_clock.end(now_unix_s=time.time() if now_unix_s is None else now_unix_s):
            self._broadcast(ended=True)
            if self.open_loop is not None:
                self.open_loop.stop_dispatching()

    def enter_manual(self) -> None:
        """Master/local, web-UI ramps: one open-ended stage for the whole run."""
        if self.stage_clock.enter_manual(now_unix_s=time.time(), max_model_len=self.max_model_len):
            self._broadcast()

    def _broadcast(self, *, ended: bool = False) -> None:
        runner = self.environment.runner
        if self.is_master and runner is not None:
            # each live worker's rank among the live ones splits an open-loop stage's rate and
            # concurrency cap (Locust's worker indexes keep gaps where a worker was lost)
            live = sorted((node_id for node_id, node in runner.clients.items() if node.state != "missing"),
                          key=runner.get_worker_index)
            stage = self.stage_clock.stage
            runner.send_message(STAGE_MESSAGE, {"run_dir": str(self.run_dir), "stage_index": self.current_index,
                                                "stage_name": stage.name,
                                                "probe": ({"pass_name": stage.pass_name, "level": stage.level}
                                                          if getattr(stage, "search", None) is not None else None),
                                                "ended": ended, "processes": max(len(live), 1),
                                                "ranks": {node_id: i for i, node_id in enumerate(live)}})

    def on_stage_message(self, data: dict) -> None:
        """Worker: the master says which run directory and stage are current (or that the stages ended)."""
        self.files.adopt(data.get("run_dir"))
        index = int(data.get("stage_index", 0))
        stage = None if self.manual else announced_stage(self.stage_clock.stages, data)
        changed = self.stage_clock.follow(index, stage) or not self._seen_stage
        self._seen_stage = True
        if self.open_loop is None or self.manual:
            return
        if data.get("ended"):
            self.open_loop.stop_dispatching()
        elif changed:
            runner = self.environment.runner
            rank = (data.get("ranks") or {}).get(getattr(runner, "client_id", None))
            worker_index = rank if rank is not None else (getattr(runner, "worker_index", 0) or 0)
            self.open_loop.enter(stage or self.stages[index], processes=int(data.get("processes") or 1),
                                 index=worker_index)

    # -- the load generator's own health, per stage ----------------------------------------------
    def watch_event_loop(self) -> None:
        """Sending processes, in their own greenlet: see :class:`~locustfiles.health.LoopLagWatcher`."""
        self.loop_lag.run()

    def take_loop_lag_ms(self) -> float:
        return self.loop_lag.take_ms()

    def note_client_health(self, *, loop_lag_ms: float | None = None, cpu_percent: float | None = None) -> None:
        """Master/local: keep the worst event-loop lag and CPU use of any load generator in this stage."""
        self.stage_clock.note_client_health(loop_lag_ms=loop_lag_ms, cpu_percent=cpu_percent)

    def mark_ready(self) -> None:
        self.ready = True
        self.ready_event.set()

    def note_result(self, record) -> None:
        """Stop the run when the first requests are all rejected (see :class:`~locustfiles.health.EarlyStop`)."""
        message = self.early_stop.note(record.error_category, record.error_detail)
        if message is not None and self.on_abort is not None:
            self.on_abort(message)

    # -- run.json --------------------------------------------------------------------------------
    def write_run_json(self, status: RunStatus | str) -> None:
        """Master/local: describe the run, unless an ``envelope run`` orchestrator already owns run.json."""
        self.files.write_run_json(
            status, scenario_path=self.scenario_path, quick=bool(getattr(self.options, "quick", False)),
            options={"host": getattr(self.options, "host", None), "api_key": REDACTED if self.api_key else None,
                     "record_text": self.record_text, "manual": self.manual},
            started_unix_s=self.started_unix_s, argv=sys.argv)

    # -- the server ------------------------------------------------------------------------------
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key.get()}"} if self.api_key else {}

    def probe_server(self, host: str) -> list[str]:
        """Learn the served model and max length, calibrate prompts; return one-line problems, if any."""
        from envelope.capabilities import ServerCapabilities, write_capabilities

        known = None
        shipped = getattr(self.options, "envelope_capabilities_json", None) if self.is_worker else None
        if shipped:
            # the master probed once for the whole run (its spawn messages carry the answer): the probe's
            # requests are generated tokens the server counts, so they are sent once, not once per worker
            known = ServerCapabilities.from_json(json.loads(shipped))
        facts = probe_server(host, headers=self.auth_headers(), model=self.model, scenario=self.scenario,
                             tokenizer=getattr(self.options, "tokenizer", None) or None,
                             count_tokens=getattr(self.options, "count_tokens", None) or "server",
                             capabilities=known)
        self.capabilities = facts.capabilities
        self.local_tokenizer = facts.local_tokenizer
        if facts.capabilities is not None and not self.is_worker:
            write_capabilities(self.ensure_run_dir(), facts.capabilities)
            self.options.envelope_capabilities_json = json.dumps(facts.capabilities.to_json())
        if facts.model is not None:
            self.model = facts.model
        if facts.max_model_len is not None:
            self.max_model_len = facts.max_model_len
        if facts.factory is not None:
            self.factory = facts.factory
        self.datasets = dict(facts.datasets)
        self._samplers = {}
        if not facts.problems and not self.is_worker:
            self.write_sources_log()
        return list(facts.problems)

    def dataset_sampler(self, source, endpoint: str) -> DatasetSampler:
        """This process's sampler of a dataset (measured at the probe), made on first use."""
        key = dataset_key(source, endpoint)
        sampler = self._samplers.get(key)
        if sampler is None:
            loop = self.open_loop
            processes, rank = (loop.processes, loop.rank) if loop is not None else (1, 0)
            sampler = self._samplers[key] = DatasetSampler(self.datasets[key], seed=self.scenario.seed,
                                                           processes=processes, index=rank)
        return sampler

    def write_sources_log(self) -> None:
        """Master/local: ``sources.json``, the datasets and traces this run draws from, with their lengths."""
        from envelope.source_log import LengthSummary, SourceEntry, write_source_log
        from envelope.sources import trace_plan

        entries: list[SourceEntry] = []
        for key, measured in self.datasets.items():
            stages = [s.name for s in self.stages
                      if any(c.workload.dataset is not None and dataset_key(c.workload.dataset, c.endpoint) == key
                             for c in s.clients)]
            entries.append(measured.log_entry(stages))
        traces: dict[tuple, list[str]] = {}
        for stage in self.stages:
            if stage.trace is not None:
                traces.setdefault((stage.trace.path, stage.trace.format), []).append(stage.name)
        for (path, fmt), names in traces.items():
            stage = next(s for s in self.stages if s.name == names[0])
            replay = trace_plan(stage.trace)
            fits = [e for e in replay.entries
                    if self.max_model_len is None or e.prompt_tokens + e.output_tokens <= self.max_model_len]
            entries.append(SourceEntry(
                kind="trace", path=path, format=fmt, entries=len(replay.entries),
                skipped_too_long=len(replay.entries) - len(fits),
                prompt_tokens=LengthSummary.of([e.prompt_tokens for e in replay.entries]),
                output_tokens=LengthSummary.of([e.output_tokens for e in replay.entries]),
                stages=tuple(names), exact=bool(self.factory is not None and self.factory.exact)))
        if entries:
            write_source_log(self.ensure_run_dir(), entries)


def _default_scenario() -> Scenario:
    """The workload used when no scenario is given (web-UI ramps): 300-token prompts, 128 output tokens."""
    from envelope.config import validate_data

    data = {
        "name": "manual",
        "passes": [{"name": "manual", "stages": [{"users": 1, "duration_s": 3600}]}],
    }
    return validate_data(data, Scenario, source="<built-in default scenario>")
