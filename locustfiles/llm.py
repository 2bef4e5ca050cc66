"""Envelope's locustfile: streaming LLM users driven by a YAML scenario.

    locust -f locustfiles/llm.py --headless --scenario scenarios/capstone.yaml \\
        --host http://127.0.0.1:8000 --csv runs/my-run/locust/locust

Without ``--scenario`` (or with ``--manual``) the web UI's user count drives
the load and the built-in default workload is used (300-token prompts, 128
output tokens). ``--processes N`` forks workers that each write their own
record file into the same run directory.
"""

from __future__ import annotations

import locust  # noqa: F401  - import Locust first: it monkey-patches the standard library with gevent

import csv
import logging
import signal
import sys
import time

import gevent
import greenlet
from locust import LoadTestShape, events

from envelope.config import ConfigError
from envelope.secrets import SecretError
from envelope.shape import stage_at
from envelope.stages import schedule_completed
from locustfiles import patches
from locustfiles import distributed
from locustfiles.context import ABORT_MESSAGE, STAGE_MESSAGE, EnvelopeRun, WorkerReport
from locustfiles.open_loop import OpenLoop
from locustfiles.users import LLMUser, send_one
from locustfiles import webui  # noqa: F401  - the web UI's LLM tab (registers its own listeners)

__all__ = ["LLMUser", "ScenarioShape"]

patches.apply()

log = logging.getLogger("envelope")
_RUNS: list[EnvelopeRun] = []
READY_TIMEOUT_S = 120.0  # how long the first stage waits for every worker to have probed the server


class ScenarioShape(LoadTestShape):
    """Runs the scenario's stages in order; ``tick`` asks :func:`envelope.shape.stage_at`.

    After the last stage it drains: users are asked to stop (each finishes its
    request in flight, see ``stop_timeout``) and the test ends only once none is
    left and Locust's stats have caught up, so Locust's counts and CSV include
    every request our records hold.
    """

    _drain_started_s: float | None = None
    _idle_ticks = 0
    _started_at_s: float | None = None  # run time at which stage 0 began

    def tick(self):
        ctx: EnvelopeRun | None = getattr(self.runner.environment, "envelope", None)
        if ctx is None:
            return None
        if self._started_at_s is None:
            # The schedule starts once every process that sends has learnt the server and
            # calibrated its prompts (test_start); asking for 0 users is what triggers that.
            waited = self.get_run_time()
            if not self._everyone_ready(ctx) and waited < READY_TIMEOUT_S:
                return 0, 1000
            if waited >= READY_TIMEOUT_S:
                log.warning("envelope: not every worker was ready after %.0f s; starting anyway", waited)
            self._started_at_s = waited
        self._sample_client_health(ctx)
        at = None if ctx.aborted else stage_at(ctx.stages, self.get_run_time() - self._started_at_s)
        if ctx.search is not None and not ctx.aborted and ctx.search.step(
                stage_index=None if at is None else at.index,
                stage_elapsed_s=None if at is None else at.stage_elapsed_s, now_unix_s=time.time()):
            # the search ended its probe here (and maybe inserted the next one)
            at = stage_at(ctx.stages, self.get_run_time() - self._started_at_s)
        if at is not None:
            if not ctx.stage_log or at.index != ctx.current_index:
                # Ticks come once a second, later on a busy machine: a stage entered late still
                # runs its whole duration from when it really began (the schedule moves with it).
                self._started_at_s += at.stage_elapsed_s
                at = stage_at(ctx.stages, self.get_run_time() - self._started_at_s)
                ctx.enter_stage(at.index)
            if at.stage.open_loop:  # the per-process dispatchers send; no Locust users
                return 0, 1000
            return at.stage.users, at.stage.spawn_rate
        ctx.end_stages()
        now = time.monotonic()
        if self._drain_started_s is None:
            self._drain_started_s = now
        proven = self._drained(ctx)
        if not proven and now - self._drain_started_s < self.runner.environment.stop_timeout + 10:
            return 0, 1000
        # Locust's CSV writer rewrites its files once a second and writes nothing at exit:
        # let it run once more after the last request reached the stats.
        self._idle_ticks += 1
        if self._idle_ticks <= 2:
            return 0, 1000
        ctx.drained = proven
        return None

    def _sample_client_health(self, ctx: EnvelopeRun) -> None:
        """Once a tick: the load generators' CPU use (Locust measures it per process) and, locally, loop lag."""
        runner = self.runner
        if ctx.is_master:
            usages = [c.cpu_usage for c in runner.clients.values()]
            ctx.note_client_health(cpu_percent=max(usages) if usages else None)
        else:
            ctx.note_client_health(cpu_percent=runner.current_cpu_usage, loop_lag_ms=ctx.take_loop_lag_ms())

    def _everyone_ready(self, ctx: EnvelopeRun) -> bool:
        if not ctx.ready:
            return False
        if ctx.is_master:
            clients = set(distributed.live_workers(self.runner))
            return bool(clients) and clients <= ctx.ready_workers
        return True

    def _drained(self, ctx: EnvelopeRun) -> bool:
        """No user left and no request in flight, as seen by the stats Locust will write.

        A worker's report carries its stats and, taken at the same instant, its running
        users, requests in flight and open-loop work (a live dispatcher, requests waiting). A report received after the drain began that says
        0 and 0 holds every request that worker will ever make, so once every worker has
        sent one the master's stats are complete. (Timing guesses are not enough: a
        worker's last report can come up to 3 s after its last request, later on a busy
        machine, and the master drops workers that have stopped.)
        """
        if not ctx.is_master:
            return ctx.in_flight == 0 and self.runner.user_count == 0 and _open_loop_busy(ctx) == 0
        clients = distributed.live_workers(self.runner)  # a lost worker will never report again: the ledger has it
        if not clients:
            return True
        for client_id in clients:
            seen = ctx.worker_reports.get(client_id)
            if (seen is None or seen.received_s < self._drain_started_s or seen.users or seen.in_flight
                    or seen.open_loop):
                return False
        return True


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    parser.add_argument("--scenario", default="", help="Scenario YAML (passes and stages).", include_in_web_ui=False)
    parser.add_argument("--run-dir", default="", help="Run directory (default: the --csv prefix's folder, or runs/<time>-<scenario>).",
                       include_in_web_ui=False)
    parser.add_argument("--quick", action="store_true", default=False, help="Shortened durations (the scenario's quick: section).",
                       include_in_web_ui=False)
    parser.add_argument("--duration-scale", type=float, default=None, help="Scale every stage duration by this factor.",
                       include_in_web_ui=False)
    parser.add_argument("--manual", action="store_true", default=False,
                       help="Ignore the scenario's stages; the web UI's user count drives the load.", include_in_web_ui=False)
    parser.add_argument("--model", default="", help="Served model name (default: the scenario's, else the first listed).",
                       include_in_web_ui=False)
    parser.add_argument("--api-key-env", default="", help="Environment variable holding the API key (default ENVELOPE_API_KEY).",
                       include_in_web_ui=False)
    parser.add_argument("--api-key-file", default="", help="File whose first line is the API key.", include_in_web_ui=False)
    parser.add_argument("--compress-records", action="store_true", default=False,
                       help="Workers compress the records they ship to the master (zlib): about half the bytes of a "
                            "long stream's record for about 6x the worker CPU (benchmarks/shipping.py); for slow "
                            "links between hosts.", include_in_web_ui=False)
    parser.add_argument("--record-text", action="store_true", default=False,
                       help="Store prompt and completion text in the records (off by default).", include_in_web_ui=False)
    parser.add_argument("--tokenizer", default="",
                       help="Directory of the served model's tokenizer, for a server without /tokenize or usage "
                            "(default: the model's own directory when the server names a local path).",
                       include_in_web_ui=False)
    parser.add_argument("--count-tokens", choices=("server", "tokenizer"), default="server",
                       help="server: tokens from the server's usage (the tokenizer only where it gives none); "
                            "tokenizer: every request counted with the local tokenizer, the server's usage kept "
                            "beside it, as client-side tools count.", include_in_web_ui=False)


def _fail(environment, message: str) -> None:
    """One clear line, non-zero exit, no load."""
    sys.stderr.write(f"envelope: {message}\n")
    environment.process_exit_code = 2
    runner = environment.runner
    if runner is not None:
        runner.quit()
    else:
        sys.exit(2)


@events.init.add_listener
def _on_init(environment, **_kw) -> None:
    options = environment.parsed_options
    if options is None:  # Locust used as a library without our options
        return
    try:
        ctx = EnvelopeRun(environment, options)
    except (ConfigError, SecretError) as exc:
        sys.stderr.write(f"envelope: {exc}\n")
        sys.exit(2)
    environment.envelope = ctx
    _RUNS.append(ctx)
    if not ctx.is_worker:
        # Locust installs its SIGTERM handler only after a headless shape run ends; until then
        # SIGTERM killed the process outright (no CSVs, run.json left "running"). Treat it as Ctrl-C,
        # and deliver both to the main greenlet, where Locust catches KeyboardInterrupt and shuts
        # down: Python's own handler raises it in whichever greenlet runs, and when that was a user
        # the interrupt went through gevent's error report (a traceback in the log) to get there.
        main = greenlet.getcurrent()
        for sig in (signal.SIGINT, signal.SIGTERM):
            gevent.signal_handler(sig, _interrupt, main)
    if ctx.manual:
        environment.shape_class = None
    _apply_stage_settings(environment, ctx)
    runner = environment.runner
    if runner is not None and not ctx.is_master:  # this process sends requests
        ctx.open_loop = OpenLoop(ctx, environment, send_one)
        gevent.spawn(ctx.watch_event_loop)
    if runner is not None and ctx.is_worker:
        distributed.install_worker(environment, ctx)
        runner.register_message(STAGE_MESSAGE, lambda environment, msg, **kw: environment.envelope.on_stage_message(msg.data))
        ctx.on_abort = lambda message: _abort_worker(environment, message)
        runner.register_message(ABORT_MESSAGE, lambda environment, msg, **kw: _abort_worker(environment, None))
    elif runner is not None:
        ctx.on_abort = lambda message: _abort(environment, message)
        if ctx.is_master:
            runner.register_message(ABORT_MESSAGE, lambda environment, msg, **kw: _abort_once(environment, msg.data))
            distributed.install_master(environment, ctx)
    if runner is not None and not ctx.is_worker:
        ctx.ensure_run_dir()
        ctx.write_run_json("running")


def _interrupt(main) -> None:
    """A SIGINT or SIGTERM: Ctrl-C in the main greenlet (this runs in a greenlet of its own)."""
    if not main.dead:
        main.throw(KeyboardInterrupt)


def _apply_stage_settings(environment, ctx: EnvelopeRun) -> None:
    # Let users that ramp-downs stop finish their current request, so nothing measured is cut off.
    if not environment.stop_timeout or getattr(environment, "_envelope_stop_timeout", None) == environment.stop_timeout:
        longest = max(s.timeouts.total_s for s in ctx.stages)
        environment.stop_timeout = environment._envelope_stop_timeout = min(longest, 120.0)
    LLMUser.connection_timeout = ctx.stages[0].timeouts.connect_s


@events.test_start.add_listener
def _on_test_start(environment, **_kw) -> None:
    ctx: EnvelopeRun | None = getattr(environment, "envelope", None)
    if ctx is None:
        return
    if ctx.is_worker and environment.parsed_options is not None:
        try:
            ctx.adopt_master_options(environment.parsed_options)
        except ConfigError as exc:
            _fail(environment, f"the master's scenario: {exc}")
            return
        _apply_stage_settings(environment, ctx)
    host = environment.host
    if not host:
        _fail(environment, "no --host given: the URL of the OpenAI-compatible server")
        return
    problems = ctx.probe_server(host)
    if problems:
        for line in problems:
            sys.stderr.write(f"envelope: {line}\n")
        _fail(environment, f"{len(problems)} problem(s) with the scenario against {host}; no load was sent")
        return
    ctx.mark_ready()
    if ctx.is_worker and environment.runner is not None:
        # after its clock offset is known (test_start runs in the greenlet that receives the pongs)
        gevent.spawn(distributed.announce_ready, ctx, environment.runner)
    if ctx.ledger is not None:
        ctx.ledger.reopen(set(distributed.live_workers(environment.runner)))
    if ctx.manual and not ctx.is_worker:
        ctx.enter_manual()
    log.info("envelope: model %s, max_model_len %s, prompts %r", ctx.model, ctx.max_model_len, ctx.factory)


@events.report_to_master.add_listener
def _report_in_flight(client_id, data, **_kw) -> None:
    for ctx in _contexts():
        distributed.add_to_report(ctx, data)  # first: it ships every record this report covers
        data["envelope_in_flight"] = ctx.in_flight
        runner = ctx.environment.runner
        data["envelope_users"] = runner.user_count if runner is not None else 0
        data["envelope_open_loop"] = _open_loop_busy(ctx)
        data["envelope_loop_lag_max_ms"] = ctx.take_loop_lag_ms()


@events.worker_report.add_listener
def _collect_in_flight(client_id, data, **_kw) -> None:
    if "envelope_in_flight" in data:
        for ctx in _contexts():
            ctx.worker_reports[client_id] = WorkerReport(
                in_flight=int(data["envelope_in_flight"]), users=int(data.get("envelope_users", 0)),
                open_loop=int(data.get("envelope_open_loop", 0)), received_s=time.monotonic())
            ctx.note_client_health(loop_lag_ms=data.get("envelope_loop_lag_max_ms"))
            if ctx.ledger is not None:
                ctx.ledger.on_report(client_id, data, time.time())


def _open_loop_busy(ctx: EnvelopeRun) -> int:
    """Open-loop work left in this process: requests spawned and not done, plus a live dispatcher."""
    loop = ctx.open_loop
    if loop is None:
        return 0
    return loop.pending + (1 if loop.dispatching else 0)


@events.test_stop.add_listener
def _on_test_stop(environment, **_kw) -> None:
    ctx: EnvelopeRun | None = getattr(environment, "envelope", None)
    if ctx is None:
        return
    if ctx.open_loop is not None:  # interrupted or ended: open-loop requests still running are cancelled
        ctx.open_loop.cancel_all()
    if not ctx.is_worker:
        ctx.end_stages()
    else:
        ctx.ship_records()


def _abort_once(environment, message: str) -> None:
    """Master: a worker saw the first requests rejected; the first such report stops the run."""
    if not environment.envelope.aborted:
        _abort(environment, message)


def _abort(environment, message: str) -> None:
    """Stop a run that has started: one line, exit status 2; the shape drains what is in flight and ends."""
    ctx: EnvelopeRun = environment.envelope
    ctx.aborted = True
    sys.stderr.write(f"envelope: {message}\n")
    environment.process_exit_code = 2
    runner = environment.runner
    if ctx.is_master and runner is not None:  # the other workers stop sending now, not at the next tick
        runner.send_message(ABORT_MESSAGE, None)
    if environment.shape_class is None and runner is not None:  # web UI: no shape to end it
        gevent.spawn(runner.stop)


def _abort_worker(environment, message: str | None) -> None:
    """Worker: stop sending; with a message (this worker saw it), ask the master to stop the run."""
    ctx: EnvelopeRun = environment.envelope
    ctx.aborted = True
    if ctx.open_loop is not None:
        ctx.open_loop.stop_dispatching()
    if message is not None:
        environment.runner.send_message(ABORT_MESSAGE, message)


@events.test_stopping.add_listener
def _on_test_stopping(environment, **_kw) -> None:
    # A headless run interrupted by Ctrl-C goes straight to the runner's quit, which stops the test
    # (this event) and gives the workers half a second: finish them properly here, first.
    ctx: EnvelopeRun | None = getattr(environment, "envelope", None)
    if ctx is not None and ctx.is_master:
        distributed.finish_workers(environment, ctx)


@events.quitting.add_listener
def _on_quitting(environment, **_kw) -> None:
    ctx: EnvelopeRun | None = getattr(environment, "envelope", None)
    if ctx is None:
        return
    if ctx.is_worker:  # before Locust tells the master this worker quits
        ctx.ship_records()
    elif ctx.ledger is not None:  # the master is stopping: workers that go now go with the run
        ctx.ledger.closing = True
        distributed.finish_workers(environment, ctx)


@events.quit.add_listener
def _on_quit(exit_code, **_kw) -> None:
    # ``quit`` carries no environment; finish every run context this process made.
    for ctx in _contexts():
        if ctx.writer is not None:
            try:
                ctx.writer.close()  # a worker's: the last records go to the master
            except Exception as exc:
                log.warning("envelope: could not ship the last records to the master (%s)", exc)
        if ctx.ledger is not None:
            distributed.close_master(ctx)
        if not ctx.is_worker:
            _write_final_csvs(ctx)
        if not ctx.is_worker and ctx.run_dir is not None:
            ctx.end_stages()
            finished = _schedule_completed(ctx)
            # Locust exits 1 when any request failed: failed requests are measurements, and a run
            # that ran its whole schedule is complete; 2 is ours (bad input, early stop)
            status = "failed" if exit_code == 2 else ("complete" if finished else "partial")
            ctx.write_run_json(status)


def _write_final_csvs(ctx: EnvelopeRun) -> None:
    """Rewrite Locust's stats, failures and exceptions CSVs with the final stats.

    Locust rewrites them once a second and never at exit, so requests that end while
    it stops (after Ctrl-C, say) were missing from them though our records hold them.
    ``quit`` fires after the stats are final and before Locust closes its files (whose
    buffers are empty: each rewrite ends with a truncate, which flushes).
    """
    prefix = getattr(ctx.options, "csv_prefix", None)
    if not prefix:
        return
    from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

    writer = StatsCSV(ctx.environment, PERCENTILES_TO_REPORT)
    for suffix, write in (("_stats.csv", writer.requests_csv), ("_failures.csv", writer.failures_csv),
                          ("_exceptions.csv", writer.exceptions_csv)):
        with open(f"{prefix}{suffix}", "w", newline="") as fh:
            write(csv.writer(fh))


def _contexts() -> list[EnvelopeRun]:
    """The run contexts made by this process's ``init`` (events like ``quit`` carry no environment)."""
    return list(_RUNS)


def _schedule_completed(ctx: EnvelopeRun) -> bool:
    return ctx.manual or schedule_completed(ctx.stage_log, ctx.stages)
