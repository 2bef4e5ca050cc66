"""Open-loop stages: one dispatcher per load-generator process sends requests on a fixed schedule.

Locust's users are closed loop (the next request waits for the last). In a
``rate_per_s`` stage the shape asks for no users; instead each process that
sends (a worker, or the single local process) runs a dispatcher greenlet that
walks its share of the stage's arrival schedule (:mod:`envelope.arrivals`) and
spawns one greenlet per request at its intended time. Each record keeps the
intended time next to the actual send time, so a late send (a busy client, or a
``max_concurrency`` cap that is full) shows as send lag instead of silently
stretching the schedule.
"""

from __future__ import annotations

import logging
import random
import time
import traceback

import gevent
from gevent.lock import BoundedSemaphore
from gevent.pool import Group

from envelope.arrivals import arrival_offsets_s, process_share
from envelope.scenario import ClientRotation, ResolvedStage
from locustfiles.transports import openai_client, stream_fasthttp, stream_openai

__all__ = ["OpenLoop", "concurrency_share"]

perf_counter = time.perf_counter
log = logging.getLogger("envelope")
_MAX_CONNECTIONS = 100_000  # connections are opened on demand; this only removes the pool's own queue


# gevent's (libev's) timers fire up to about a millisecond late: epoll waits in whole milliseconds,
# rounded up. So every wait sleeps until this long before its time and then yields until it (other
# greenlets run meanwhile). Sleeping the whole gap when it was short, as before, sent requests 0.5 ms
# late at the median at 500 requests/s; the yields cost about a quarter of a core there.
_SPIN_S = 0.0012


def _wait_until(t: float) -> None:
    """Until ``perf_counter()`` reaches ``t``: send lag then measures the client, not the timer."""
    delay = t - perf_counter()
    if delay > _SPIN_S:
        gevent.sleep(delay - _SPIN_S)
    while perf_counter() < t:
        gevent.sleep(0)


def concurrency_share(cap: int | None, processes: int, index: int) -> int | None:
    """This process's part of a stage's ``max_concurrency`` (the parts add up to ``cap``)."""
    if cap is None:
        return None
    return cap // processes + (1 if index < cap % processes else 0)


class OpenLoop:
    """The dispatcher of one process, and the requests it has in flight or waiting for a slot."""

    def __init__(self, ctx, environment, send_one) -> None:
        self.ctx = ctx
        self.environment = environment
        self._send_one = send_one  # locustfiles.users.send_one (passed in to keep imports one-way)
        self.requests = Group()
        self.dispatchers: list[gevent.Greenlet] = []
        self.stage_index: int | None = None
        self.processes, self.rank = 1, 0  # how many processes send, and which one this is (this stage)
        self._pool = None
        self._openai = None

    # -- what the drain and the reports need ------------------------------------------------------
    @property
    def pending(self) -> int:
        """Requests spawned and not finished (sending, or waiting for a ``max_concurrency`` slot)."""
        return len(self.requests)

    @property
    def dispatching(self) -> bool:
        return any(not d.dead for d in self.dispatchers)

    # -- stages ----------------------------------------------------------------------------------------
    def enter(self, stage: ResolvedStage, *, processes: int = 1, index: int = 0) -> None:
        """A stage began: stop the previous schedule; start this one if it is open loop.

        Requests already sent keep going (they belong to the stage they were sent in).
        """
        t0 = perf_counter()
        self.stop_dispatching()
        self.stage_index = stage.index
        processes = max(int(processes), 1)
        index = int(index) % processes
        self.processes, self.rank = processes, index
        shared = [c for c in stage.clients if c.rate_per_s is None]
        if stage.trace is not None:
            self.dispatchers.append(gevent.spawn(self._dispatch_trace, stage, shared, processes, index, t0))
        elif stage.rate_per_s is not None and shared:
            self.dispatchers.append(gevent.spawn(self._dispatch, stage, stage.rate_per_s, stage.arrival, shared,
                                                 processes, index, t0, "o"))
        for c in stage.clients:  # classes with a rate quota send at their own rate, in any stage
            if c.rate_per_s is not None:
                self.dispatchers.append(gevent.spawn(self._dispatch, stage, c.rate_per_s, "poisson", [c],
                                                     processes, index, t0, f"q{c.name}-"))

    def stop_dispatching(self) -> None:
        for dispatcher in self.dispatchers:
            dispatcher.kill(block=False)
        self.dispatchers = []

    def cancel_all(self, timeout_s: float = 5.0) -> None:
        """The run is stopping: no more sends; requests in flight are recorded as cancelled."""
        self.stop_dispatching()
        self.requests.kill(block=True, timeout=timeout_s)
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._openai is not None:
            self._openai.close()
            self._openai = None

    # -- the schedule -------------------------------------------------------------------------------
    def _wait_ready(self, t0: float) -> float:
        if not self.ctx.ready:  # prompts not calibrated yet: the schedule starts when they are
            self.ctx.ready_event.wait()
            return perf_counter()
        return t0

    def _dispatch(self, stage: ResolvedStage, rate_per_s: float, arrival: str, clients, processes: int,
                  index: int, t0: float, tag: str) -> None:
        t0 = self._wait_ready(t0)
        seed = self.ctx.scenario.seed
        share = process_share(rate_per_s, arrival, processes, index)
        schedule = arrival_offsets_s(share.rate_per_s, arrival, stage.duration_s,
                                     random.Random(f"{seed}:arrivals:{stage.index}:{index}" + (tag if tag != "o" else "")),
                                     burstiness=stage.burstiness, phase_s=share.phase_s)
        cap = concurrency_share(stage.max_concurrency, processes, index)
        slots = BoundedSemaphore(cap) if cap else None
        rotation = ClientRotation([(c.name, c.weight) for c in clients])
        by_name = {c.name: c for c in reversed(clients)}  # the first of a name, as before
        spawn = self.requests.spawn
        for n, offset in enumerate(schedule):
            t_intended = t0 + offset
            _wait_until(t_intended)
            if self.ctx.aborted:
                return
            client = by_name[rotation.at(n)]
            spawn(self._one, stage, client, n, index, t_intended, slots, tag)

    def _dispatch_trace(self, stage: ResolvedStage, clients, processes: int, index: int, t0: float) -> None:
        """Replay the trace: this process sends every ``processes``-th entry, each at its own offset."""
        from envelope.sources import trace_plan
        from locustfiles.sources import RequestPlan, trace_prompt

        t0 = self._wait_ready(t0)
        replay = trace_plan(stage.trace)
        rotation = ClientRotation([(c.name, c.weight) for c in clients])
        by_name = {c.name: c for c in reversed(clients)}  # the first of a name, as before
        spawn = self.requests.spawn
        seed = self.ctx.scenario.seed
        for n in range(index, len(replay.entries), processes):
            entry, t_intended = replay.entries[n], t0 + replay.offsets_s[n]
            limit = self.ctx.max_model_len
            if limit is not None and entry.prompt_tokens + entry.output_tokens > limit:
                continue  # longer than the server takes: never sent, counted in sources.json
            client = by_name[rotation.at(n)]
            # built before its time: a prompt of a thousand words takes about a millisecond to make,
            # which would otherwise show as send lag
            plan = RequestPlan(built=trace_prompt(entry, self.ctx.factory, endpoint=client.endpoint,
                                                 seed=f"{seed}:{stage.index}"),
                               prompt_tokens=entry.prompt_tokens, output_tokens=entry.output_tokens,
                               source_index=entry.index, conversation_id=entry.session_id)
            _wait_until(t_intended)
            if self.ctx.aborted:
                return
            spawn(self._one, stage, client, n, index, t_intended, None, "t", plan)

    def _one(self, stage, client, n: int, index: int, t_intended: float, slots, tag: str = "o", plan=None) -> None:
        if slots is not None:
            slots.acquire()
        try:
            rng = random.Random(f"{self.ctx.scenario.seed}:request:{stage.index}:{index}:{n}"
                                + ("" if tag == "o" else f":{tag}"))
            self._send_one(self.ctx, self.environment, stage=stage, client=client, rng=rng,
                           request_id=f"{self.ctx.worker_id}-{tag}{stage.index}-{n}",
                           transport=self._transport(client, stage), t_intended_s=t_intended, plan=plan)
        except gevent.GreenletExit:
            raise
        except Exception:  # a bug on our side: loud, and counted by Locust like a user's exception
            log.exception("envelope: open-loop request %s of stage %r failed in the client", n, stage.name)
            runner = self.environment.runner
            if runner is not None:
                runner.log_exception(self.ctx.worker_id, "open-loop request failed in the client",
                                     traceback.format_exc())
        finally:
            if slots is not None:
                slots.release()

    # -- connections ----------------------------------------------------------------------------------
    def _transport(self, client, stage: ResolvedStage):
        host = self.environment.host
        if client.transport == "openai":
            sdk = self._openai_client(stage)
            return lambda spec, obs: stream_openai(sdk, spec, obs)
        pool = self._fasthttp_pool(stage)
        return lambda spec, obs: stream_fasthttp(pool, host, spec, obs)

    def _fasthttp_pool(self, stage: ResolvedStage):
        if self._pool is None:
            from geventhttpclient.client import HTTPClientPool

            # As many connections as requests can be in flight: a request must never queue
            # for a connection inside the client, where its wait would not be measured.
            self._pool = HTTPClientPool(concurrency=_MAX_CONNECTIONS, network_timeout=3600.0,
                                        connection_timeout=stage.timeouts.connect_s,
                                        ssl_context_factory=gevent.ssl.create_default_context)
        return self._pool

    def _openai_client(self, stage: ResolvedStage):
        if self._openai is None:
            key = self.ctx.api_key.get() if self.ctx.api_key else "EMPTY"
            self._openai = openai_client(self.environment.host, key, stage.timeouts.connect_s,
                                         max_connections=_MAX_CONNECTIONS)
        return self._openai

