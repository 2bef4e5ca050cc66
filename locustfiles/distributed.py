"""Locust wiring of a distributed run: workers ship records and sync clocks; the master receives and keeps the ledger.

The pure parts (batches, clock estimates, the ledger) are :mod:`locustfiles.cluster`;
this module registers the messages and runs the greenlets that move them, on
the worker side (:func:`install_worker`) and the master side (:func:`install_master`).
``locustfiles/llm.py`` calls these from its Locust event listeners.
"""

from __future__ import annotations

import logging
import sys
import time

import gevent
from locust import runners

from locustfiles.cluster import (
    CLOCK_PING_MESSAGE,
    CLOCK_PONG_MESSAGE,
    FINISH_MESSAGE,
    FINISHED_MESSAGE,
    RECORDS_MESSAGE,
    SHIP_INTERVAL_S,
    BatchError,
    ClockSync,
    WorkerLedger,
)
from locustfiles.context import READY_MESSAGE, EnvelopeRun

__all__ = ["install_worker", "install_master", "live_workers", "announce_ready", "add_to_report",
           "finish_workers", "close_master"]

log = logging.getLogger("envelope")
CLOCK_WAIT_S = 5.0  # how long a worker waits for its first clock offset before saying it is ready
CLOCK_RESYNC_S = 5.0  # a worker pings the master's clock this often (the best of the last 16 is used)


def install_worker(environment, ctx: EnvelopeRun) -> None:
    """Worker: answer the master's clock and finish messages; ship records and ping the clock in the background."""
    runner = environment.runner
    runner.register_message(CLOCK_PONG_MESSAGE, _on_clock_pong)
    runner.register_message(FINISH_MESSAGE, _on_finish, concurrent=True)
    gevent.spawn(_ship_loop, ctx)
    gevent.spawn(_clock_loop, ctx, runner)


def install_master(environment, ctx: EnvelopeRun) -> None:
    """Master: receive records, answer clock pings, keep the ledger of workers."""
    runner = environment.runner
    runner.register_message(READY_MESSAGE, _on_worker_ready)
    runner.register_message(RECORDS_MESSAGE, _on_records)
    runner.register_message(CLOCK_PING_MESSAGE, _on_clock_ping)
    runner.register_message(FINISHED_MESSAGE,
                            lambda environment, msg, **kw: environment.envelope.finishing.discard(msg.node_id))
    environment.events.heartbeat_sent.add_listener(
        lambda client_id, timestamp, **kw: ctx.ledger.heard(client_id, time.time()))
    gevent.spawn(_ledger_loop, ctx, runner)


def add_to_report(ctx: EnvelopeRun, data: dict) -> None:
    """Worker, before each stats report: ship every record made so far (the master reads this report
    after them), and say who this is, how many records it made, and its clock offset."""
    ctx.ship_records()
    data["envelope_worker_id"] = ctx.worker_id
    data["envelope_records_made"] = ctx.writer.count if ctx.writer is not None else 0
    estimate = ctx.clock.estimate if ctx.clock is not None else None
    if estimate is not None:
        data["envelope_clock_offset_s"] = estimate.offset_s
        data["envelope_clock_uncertainty_s"] = estimate.uncertainty_s


def close_master(ctx: EnvelopeRun) -> None:
    """Master, at exit: every worker still here finished with the run; write workers.json and close files."""
    ctx.ledger.close(time.time())
    ctx.write_workers_json()
    ctx.sink.close()


def live_workers(runner) -> list[str]:
    """The workers the master still hears from (Locust keeps a missing one listed for a while)."""
    clients = getattr(runner, "clients", {})
    return [node_id for node_id, node in clients.items() if node.state != runners.STATE_MISSING]




def _ship_loop(ctx: EnvelopeRun) -> None:
    """Worker: send records at least every SHIP_INTERVAL_S (what a worker that dies takes with it)."""
    while True:
        gevent.sleep(SHIP_INTERVAL_S)
        try:
            ctx.ship_records()
        except Exception as exc:  # the master is unreachable for now; the lines are kept for the next try
            log.warning("envelope: could not ship records to the master (%s); retrying", exc)


def _clock_loop(ctx: EnvelopeRun, runner) -> None:
    """Worker: a burst of pings to learn the offset to the master's wall clock, then one every few seconds."""
    for i in range(8):
        runner.send_message(CLOCK_PING_MESSAGE, ClockSync.ping(time.time(), time.perf_counter()))
        gevent.sleep(0.025)
    while True:
        gevent.sleep(CLOCK_RESYNC_S)
        try:
            runner.send_message(CLOCK_PING_MESSAGE, ClockSync.ping(time.time(), time.perf_counter()))
        except Exception as exc:
            log.warning("envelope: clock ping to the master failed (%s)", exc)


def _on_clock_pong(environment, msg, **_kw) -> None:
    mono_now = time.perf_counter()
    ctx: EnvelopeRun = environment.envelope
    estimate = ctx.clock.on_pong(msg.data, mono_now)
    if estimate is not None:
        ctx.set_clock(estimate)


def _on_clock_ping(environment, msg, **_kw) -> None:
    environment.runner.send_message(CLOCK_PONG_MESSAGE, ClockSync.pong(msg.data, time.time()), client_id=msg.node_id)


def announce_ready(ctx: EnvelopeRun, runner) -> None:
    deadline = time.monotonic() + CLOCK_WAIT_S
    while ctx.clock is not None and ctx.clock.estimate is None and time.monotonic() < deadline:
        gevent.sleep(0.02)
    if ctx.clock is not None and ctx.clock.estimate is None:
        log.warning("envelope: no clock offset from the master after %.0f s; record start times use this "
                    "host's clock", CLOCK_WAIT_S)
    runner.send_message(READY_MESSAGE, None)


def _on_worker_ready(environment, msg, **_kw) -> None:
    ctx: EnvelopeRun = environment.envelope
    ctx.ready_workers.add(msg.node_id)
    ctx.ledger.heard(msg.node_id, time.time())


def _on_records(environment, msg, **_kw) -> None:
    """Master: a worker's batch of records goes to its file in the run directory at once."""
    ctx: EnvelopeRun = environment.envelope
    try:
        received = ctx.sink.receive(msg.data)
    except BatchError as exc:
        log.error("envelope: %s (from worker %s)", exc, msg.node_id)
        return
    ctx.ledger.on_records(msg.node_id, received, time.time())
    if received.gap:
        log.error("envelope: %d records from %s never arrived", received.gap, received.worker_id)


def _ledger_loop(ctx: EnvelopeRun, runner) -> None:
    while True:
        gevent.sleep(1.0)
        _sync_ledger(ctx, runner)


def _sync_ledger(ctx: EnvelopeRun, runner) -> None:
    """Master: notice workers lost or gone mid-run (say so now; workers.json keeps it for the report)."""
    states = {node_id: node.state for node_id, node in runner.clients.items()}
    stage = ctx.current_index if ctx.stage_log else None
    for entry in ctx.ledger.sync(states, now_unix_s=time.time(), stage_index=stage):
        sys.stderr.write(f"envelope: {WorkerLedger.describe_end(entry)}\n")
    if ctx.ledger.changed:
        ctx.write_workers_json()




def finish_workers(environment, ctx: EnvelopeRun) -> None:
    """Master, interrupted mid-run: let every worker stop its users and ship its last records first.

    Locust's own quit gives workers half a second before the master stops listening, while a
    worker lets its users finish the request in hand (up to ``stop_timeout``): their records
    would arrive too late. Each worker answers once it has stopped and shipped everything.
    """
    runner = environment.runner
    if runner is None or ctx.drained or runner.state in (runners.STATE_INIT, runners.STATE_STOPPED):
        return  # nothing running, or the drain already proved every record arrived
    ctx.finishing = set(live_workers(runner))
    if not ctx.finishing:
        return
    shape = getattr(runner, "shape_greenlet", None)
    if shape is not None and shape is not gevent.getcurrent():
        shape.kill(block=True)  # no new stage or spawn while the workers finish (Locust kills it next anyway)
    runner.send_message(FINISH_MESSAGE, None)
    deadline = time.monotonic() + environment.stop_timeout + 10.0
    while ctx.finishing and time.monotonic() < deadline:
        ctx.finishing &= set(live_workers(runner))  # a worker that died will not answer
        gevent.sleep(0.05)
    if ctx.finishing:
        log.warning("envelope: %d worker(s) did not confirm their last records before the master quit",
                    len(ctx.finishing))


def _on_finish(environment, msg, **_kw) -> None:
    """Worker: the master is quitting; stop the users (each finishes its request), ship, confirm."""
    ctx: EnvelopeRun = environment.envelope
    runner = environment.runner
    if ctx.open_loop is not None:
        ctx.open_loop.stop_dispatching()
    runner.stop()  # test_stop ships the records made meanwhile
    ctx.ship_records()
    runner.send_message(FINISHED_MESSAGE, {"records": ctx.writer.count if ctx.writer is not None else 0})
