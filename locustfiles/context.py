"""Per-process state of an Envelope Locust run: options, stages, the record writer, the prompt factory.

One :class:`EnvelopeRun` lives on each Locust process (``environment.envelope``).
The master (or the single local process) owns the stage clock and writes
``run.json`` and ``stages.json``; every process that sends requests owns one
record file. Workers learn the run directory and the current stage from the
master through a custom message, so records are tagged with the stage that
was running when the request was sent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent.event

from envelope.prompts import PromptFactory, TokenizerProbe, calibrate
from envelope.records import RecordWriter
from envelope.scenario import ResolvedStage, Scenario, check_against_server, load_scenario
from envelope.secrets import REDACTED, Secret, resolve_api_key
from locustfiles.cluster import (
    RECORDS_MESSAGE,
    WORKERS_FILE,
    ClockSync,
    RecordShipper,
    RecordSink,
    WorkerLedger,
    record_file_name,
)

__all__ = ["EnvelopeRun", "ManualStage", "STAGE_MESSAGE", "atomic_write_json"]

log = logging.getLogger("envelope")

STAGE_MESSAGE = "envelope_stage"
ABORT_MESSAGE = "envelope_abort"  # worker -> master: stop the run, with this one-line reason
READY_MESSAGE = "envelope_ready"  # worker -> master: probed the server, prompts calibrated


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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


EARLY_STOP_AFTER = 3  # rejections, with no success before them, that stop the run
REJECTION_HINTS = {
    "http_401": "check the API key (--api-key-env or --api-key-file)",
    "http_403": "check the API key's permissions",
    "http_404": "check the model name (--model) and that the server offers this endpoint",
}


@dataclass(frozen=True)
class WorkerReport:
    """What a worker's last stats report said about its load, and when the master got it."""

    in_flight: int
    users: int
    received_s: float
    open_loop: int = 0  # time.monotonic() on the master


class EnvelopeRun:
    """Everything one Locust process needs to send requests and write what they did."""

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
        self._resolve_stages(options)
        self.run_dir = self._run_dir_from_options(options)
        self.run_id = self.run_dir.name if self.run_dir else ""
        self.api_key: Secret | None = resolve_api_key(
            env_var=getattr(options, "api_key_env", None) or None,
            file=getattr(options, "api_key_file", None) or None,
        )
        self.record_text = bool(getattr(options, "record_text", False) or self.scenario.record_text)
        self.current_index = 0
        self.stage_log: list[dict] = []
        self.writer: RecordWriter | RecordShipper | None = None
        self.factory: PromptFactory | None = None
        self.model: str | None = getattr(options, "model", None) or self.scenario.model
        self.max_model_len: int | None = None
        self._created_run_json = False
        self.started_unix_s = time.time()
        # requests being sent by this process now; on a master, each worker's last report
        self.in_flight = 0
        self.worker_reports: dict[str, WorkerReport] = {}  # client_id -> its last report
        # early stop: requests rejected before any succeeded (a wrong key or model), and who to tell
        self.succeeded_once = False
        self.rejected_before_success = 0
        self.on_abort = None  # callable(message) set by the locustfile
        self._aborted = False  # this process asked for the stop
        self.aborted = False  # the run is stopping early (master/local: the shape drains and ends)
        self.open_loop = None  # locustfiles.open_loop.OpenLoop, on processes that send
        self._seen_stage = False
        # ready to send: the server was probed and prompts calibrated (test_start); on a master,
        # which workers have said so
        self.ready = False
        self.ready_event = gevent.event.Event()
        self.ready_workers: set[str] = set()
        self.loop_lag_max_s = 0.0
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
        self.stages: list[ResolvedStage] = self.scenario.resolve(
            quick=bool(getattr(options, "quick", False)),
            duration_scale=getattr(options, "duration_scale", None),
        )
        # Without a scenario, or with --manual, the operator drives the user count from the web UI.
        self.manual = not self.scenario_path or bool(getattr(options, "manual", False))

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

    # -- where things go -------------------------------------------------------------------------
    @staticmethod
    def _run_dir_from_options(options) -> Path | None:
        explicit = getattr(options, "run_dir", None)
        if explicit:
            return Path(explicit)
        csv_prefix = getattr(options, "csv_prefix", None)
        if csv_prefix:
            parent = Path(csv_prefix).parent
            # --csv RUN/locust/stats puts CSVs in RUN/locust/; the run directory is RUN
            return parent.parent if parent.name == "locust" else parent
        return None  # chosen at test start by the master (see ensure_run_dir)

    def ensure_run_dir(self) -> Path:
        if self.run_dir is None:
            name = self.scenario.name if self.scenario_path else "manual"
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            self.run_dir = Path("runs") / f"{stamp}-{name}"
            self.run_id = self.run_dir.name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return self.run_dir

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
        atomic_write_json(self.ensure_run_dir() / WORKERS_FILE, self.ledger.to_json(time.time()))

    # -- stages ----------------------------------------------------------------------------------
    @property
    def stage(self) -> ResolvedStage | ManualStage:
        if self.manual:
            return ManualStage(index=0, pass_index=0, pass_name="manual", name="manual", base=self.stages[0])
        return self.stages[min(self.current_index, len(self.stages) - 1)]

    def enter_stage(self, index: int, *, now_unix_s: float | None = None) -> None:
        """Master/local: a new stage began (called from the shape's tick)."""
        now = time.time() if now_unix_s is None else now_unix_s
        if self.stage_log and self.stage_log[-1]["end_unix_s"] is None:
            self.stage_log[-1]["end_unix_s"] = now
        self.current_index = index
        entry = self.stages[index].describe(max_model_len=self.max_model_len)
        entry.update(start_unix_s=now, end_unix_s=None, client_loop_lag_max_ms=None, client_cpu_max_percent=None)
        self.stage_log.append(entry)
        self.write_stages()
        self._broadcast()
        if self.open_loop is not None:  # local runner: this process sends
            self.open_loop.enter(self.stages[index])

    def end_stages(self, *, now_unix_s: float | None = None) -> None:
        if self.ledger is not None:  # workers that go from now on went with the run
            self.ledger.closing = True
        if self.stage_log and self.stage_log[-1]["end_unix_s"] is None:
            self.stage_log[-1]["end_unix_s"] = time.time() if now_unix_s is None else now_unix_s
            self.write_stages()
            self._broadcast(ended=True)
            if self.open_loop is not None:
                self.open_loop.stop_dispatching()

    def enter_manual(self) -> None:
        """Master/local, web-UI ramps: one open-ended stage for the whole run."""
        if not self.stage_log:
            stage = self.stage
            entry = stage.base.describe(max_model_len=self.max_model_len)
            entry.update(pass_name="manual", stage_name="manual", stage_index=0, pass_index=0,
                         target_users=None, spawn_rate=None, duration_s=None,
                         start_unix_s=time.time(), end_unix_s=None)
            self.stage_log.append(entry)
            self.write_stages()
            self._broadcast()

    def write_stages(self) -> None:
        run_dir = self.ensure_run_dir()
        atomic_write_json(run_dir / "stages.json", self.stage_log)

    def _broadcast(self, *, ended: bool = False) -> None:
        runner = self.environment.runner
        if self.is_master and runner is not None:
            # each live worker's rank among the live ones splits an open-loop stage's rate and
            # concurrency cap (Locust's worker indexes keep gaps where a worker was lost)
            live = sorted((node_id for node_id, node in runner.clients.items() if node.state != "missing"),
                          key=runner.get_worker_index)
            runner.send_message(STAGE_MESSAGE, {"run_dir": str(self.run_dir), "stage_index": self.current_index,
                                                "ended": ended, "processes": max(len(live), 1),
                                                "ranks": {node_id: i for i, node_id in enumerate(live)}})

    def on_stage_message(self, data: dict) -> None:
        """Worker: the master says which run directory and stage are current (or that the stages ended)."""
        if self.run_dir is None and data.get("run_dir"):
            self.run_dir = Path(data["run_dir"])
            self.run_id = self.run_dir.name
        index = int(data.get("stage_index", 0))
        changed = index != self.current_index or not self._seen_stage
        self.current_index, self._seen_stage = index, True
        if self.open_loop is None or self.manual:
            return
        if data.get("ended"):
            self.open_loop.stop_dispatching()
        elif changed:
            runner = self.environment.runner
            rank = (data.get("ranks") or {}).get(getattr(runner, "client_id", None))
            worker_index = rank if rank is not None else (getattr(runner, "worker_index", 0) or 0)
            self.open_loop.enter(self.stages[index], processes=int(data.get("processes") or 1), index=worker_index)

    # -- the load generator's own health, per stage ----------------------------------------------
    def watch_event_loop(self, interval_s: float = 0.05) -> None:
        """Sending processes: how late a timer fires is how late a chunk's arrival can be noticed.

        Runs in its own greenlet; :attr:`loop_lag_max_s` holds the worst lag since it was last taken.
        """
        last = time.perf_counter()
        while True:
            gevent.sleep(interval_s)
            now = time.perf_counter()
            lag = now - last - interval_s
            if lag > self.loop_lag_max_s:
                self.loop_lag_max_s = lag
            last = now

    def take_loop_lag_ms(self) -> float:
        lag, self.loop_lag_max_s = self.loop_lag_max_s, 0.0
        return lag * 1000.0

    def note_client_health(self, *, loop_lag_ms: float | None = None, cpu_percent: float | None = None) -> None:
        """Master/local: keep the worst event-loop lag and CPU use of any load generator in this stage."""
        if not self.stage_log or self.stage_log[-1]["end_unix_s"] is not None:
            return
        entry = self.stage_log[-1]
        for key, value in (("client_loop_lag_max_ms", loop_lag_ms), ("client_cpu_max_percent", cpu_percent)):
            if value is not None and value > (entry.get(key) or 0.0):
                entry[key] = round(float(value), 3)

    def mark_ready(self) -> None:
        self.ready = True
        self.ready_event.set()

    # -- early stop -----------------------------------------------------------------------------
    def note_result(self, record) -> None:
        """Stop the run when the first requests are all rejected (401/403/404) before any succeeded.

        The probe at start already checks the key and the model on ``/v1/models``;
        this catches what only the generation endpoint rejects, instead of
        recording thousands of identical failures.
        """
        if self.succeeded_once:
            return
        category = record.error_category
        if category is None:
            self.succeeded_once = True
            return
        hint = REJECTION_HINTS.get(category)
        if hint is None:
            return
        self.rejected_before_success += 1
        if self.rejected_before_success >= EARLY_STOP_AFTER and not self._aborted and self.on_abort is not None:
            self._aborted = True
            status = category.removeprefix("http_")
            detail = f" ({record.error_detail[:160]})" if record.error_detail else ""
            self.on_abort(f"the server answered HTTP {status} to the first {self.rejected_before_success} requests "
                          f"and none succeeded{detail}; {hint}. Stopped early.")

    # -- run.json --------------------------------------------------------------------------------
    def write_run_json(self, status: str) -> None:
        """Master/local: describe the run, unless an ``envelope run`` orchestrator already owns run.json."""
        run_dir = self.ensure_run_dir()
        path = run_dir / "run.json"
        if path.exists() and not self._created_run_json:
            return
        self._created_run_json = True
        import locust

        info = {
            "run_id": self.run_id,
            "status": status,
            "scenario_path": self.scenario_path,
            "scenario_sha256": _sha256(self.scenario_path),
            "quick": bool(getattr(self.options, "quick", False)),
            "options": {
                "host": getattr(self.options, "host", None),
                "api_key": REDACTED if self.api_key else None,
                "record_text": self.record_text,
                "manual": self.manual,
            },
            "versions": {"locust": locust.__version__, "python": platform.python_version(),
                         "envelope": _envelope_version()},
            "started_unix_s": self.started_unix_s,
            "ended_unix_s": time.time() if status != "running" else None,
            "argv": [a for a in sys.argv if "key" not in a.lower()],
        }
        atomic_write_json(path, info)
        if self.scenario_path and not (run_dir / "scenario.yaml").exists():
            (run_dir / "scenario.yaml").write_bytes(Path(self.scenario_path).read_bytes())

    # -- the server ------------------------------------------------------------------------------
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key.get()}"} if self.api_key else {}

    def probe_server(self, host: str) -> list[str]:
        """Learn the served model and max length, calibrate prompts; return one-line problems, if any."""
        import httpx

        base = host.rstrip("/")
        with httpx.Client(base_url=base, headers=self.auth_headers(), timeout=30.0) as client:
            try:
                resp = client.get("/v1/models")
            except httpx.HTTPError as exc:
                return [f"--host {base}: cannot reach the server ({type(exc).__name__}: {exc})"]
            if resp.status_code == 401:
                return [f"--host {base}: the server rejected the API key (HTTP 401)"]
            if resp.status_code != 200:
                return [f"--host {base}: GET /v1/models answered HTTP {resp.status_code}"]
            models = resp.json().get("data") or []
            names = [m.get("id") for m in models]
            if self.model is None:
                if not names:
                    return [f"--host {base}: the server lists no models"]
                self.model = names[0]
            elif self.model not in names:
                return [f"model {self.model!r} is not served by {base} (it serves: {', '.join(map(str, names))})"]
            for m in models:
                if m.get("id") == self.model and m.get("max_model_len"):
                    self.max_model_len = int(m["max_model_len"])

            def post(path: str, body: dict) -> dict:
                r = client.post(path, json=body)
                r.raise_for_status()
                return r.json()

            probe: TokenizerProbe | None = TokenizerProbe(post, self.model)
            try:
                self.factory = calibrate(probe)
            except (httpx.HTTPError, KeyError, ValueError):
                self.factory = calibrate(None)  # not vLLM: prompt lengths are estimates
        if self.max_model_len is not None:
            return check_against_server(self.scenario, max_model_len=self.max_model_len)
        return []


def _default_scenario() -> Scenario:
    """The workload used when no scenario is given (web-UI ramps): 300-token prompts, 128 output tokens."""
    from envelope.config import validate_data

    data = {
        "name": "manual",
        "passes": [{"name": "manual", "stages": [{"users": 1, "duration_s": 3600}]}],
    }
    return validate_data(data, Scenario, source="<built-in default scenario>")


def _sha256(path: str | None) -> str | None:
    if not path:
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _envelope_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llm-envelope")
    except PackageNotFoundError:
        return "unknown"
