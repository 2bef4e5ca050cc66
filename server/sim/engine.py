"""The simulated engine: admission, queueing, KV-cache accounting and token timing.

Every request gets its tokens on the event loop's monotonic clock with
``loop.call_at`` against an ideal schedule (each due time is the previous due
time plus the gap, never "now plus the gap"), so timer lateness does not
accumulate; when a timer fires late, every chunk already due is written in the
same ``write``. Server-side truth is taken with ``time.perf_counter()`` at the
moment bytes are handed to the transport.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import deque
from typing import Any, Callable

import orjson

from server.sim.chunks import TOKEN_TEXT, ChunkFormat
from server.sim.config import FaultSpec, SimConfig
from server.sim.metrics import SimMetrics

__all__ = ["Engine", "SimRequest", "TruthLog"]


class TruthLog:
    """Server-side truth records, in memory (indexed from 0) and optionally a JSON-lines file."""

    def __init__(self, path: str | None = None) -> None:
        self.records: list[dict] = []
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if path else None

    def add(self, record: dict) -> None:
        record["index"] = len(self.records)
        self.records.append(record)
        if self._fd is not None:
            os.write(self._fd, orjson.dumps(record) + b"\n")

    def since(self, index: int) -> list[dict]:
        return self.records[max(index, 0):]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SimRequest:
    """One completion request's plan, progress and truth."""

    __slots__ = (
        "request_id", "endpoint", "stream", "prompt_tokens", "output_tokens", "finish_reason", "fault",
        "fault_done", "include_usage", "continuous_usage", "fmt", "conn", "on_complete",
        "t_arrival_s", "t_admitted_s", "t_first_token_s", "t_last_token_s", "t_done_s",
        "next_due", "itl_s", "tokens_sent", "chunks_sent", "offsets_s", "chunk_tokens", "handle",
        "state", "outcome", "preemptions", "stall_s", "malformed_chunk", "kv_tokens", "in_truth",
    )

    def __init__(self, *, request_id: str, endpoint: str, stream: bool, prompt_tokens: int,
                 output_tokens: int, finish_reason: str, fault: FaultSpec | None, include_usage: bool,
                 continuous_usage: bool, fmt: ChunkFormat | None, conn: Any, t_arrival_s: float,
                 on_complete: Callable[["SimRequest"], None] | None = None) -> None:
        self.request_id = request_id
        self.endpoint = endpoint
        self.stream = stream
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.finish_reason = finish_reason
        self.fault = fault
        self.fault_done = False
        self.include_usage = include_usage
        self.continuous_usage = continuous_usage
        self.fmt = fmt
        self.conn = conn
        self.on_complete = on_complete  # non-streamed: sends the whole response
        self.in_truth = True  # False: Envelope's capability probe (served, but not part of the load's truth)
        self.t_arrival_s = t_arrival_s
        self.t_admitted_s: float | None = None
        self.t_first_token_s: float | None = None
        self.t_last_token_s: float | None = None
        self.t_done_s: float | None = None
        self.next_due = 0.0
        self.itl_s = 0.0
        self.tokens_sent = 0
        self.chunks_sent = 0
        self.offsets_s: list[float] = []
        self.chunk_tokens: list[int] = []
        self.handle: asyncio.TimerHandle | None = None
        self.state = "new"
        self.outcome = "ok"
        self.preemptions = 0
        self.stall_s = 0.0
        self.malformed_chunk: int | None = None
        self.kv_tokens = 0

    def truth(self) -> dict:
        """The JSON-ready truth record."""
        a = self.t_arrival_s

        def rel(t: float | None) -> float | None:
            return None if t is None else t - a

        return {
            "request_id": self.request_id,
            "endpoint": self.endpoint,
            "stream": self.stream,
            "outcome": self.outcome,
            "fault": self.fault.kind if self.fault is not None else None,
            "prompt_tokens": self.prompt_tokens,
            "planned_output_tokens": self.output_tokens,
            "tokens_sent": self.tokens_sent,
            "chunks_sent": self.chunks_sent,
            "finish_reason": self.finish_reason if self.outcome == "ok" else None,
            "t_arrival_s": a,
            "t_admitted_s": self.t_admitted_s,
            "t_first_token_s": self.t_first_token_s,
            "t_last_token_s": self.t_last_token_s,
            "t_done_s": self.t_done_s,
            "queue_s": rel(self.t_admitted_s),
            "ttft_s": rel(self.t_first_token_s),
            "e2e_s": rel(self.t_last_token_s),
            "chunk_offsets_s": self.offsets_s,
            "chunk_tokens": self.chunk_tokens,
            "preemptions": self.preemptions,
            "stall_s": self.stall_s,
            "malformed_chunk": self.malformed_chunk,
        }


class Engine:
    """Admits, schedules and streams :class:`SimRequest` objects on one event loop."""

    def __init__(self, config: SimConfig, *, loop: asyncio.AbstractEventLoop, truth: TruthLog) -> None:
        self.config = config
        self.loop = loop
        self.truth = truth
        self.rng = random.Random(config.seed)
        self.running: dict[SimRequest, None] = {}  # insertion-ordered: newest last
        self.waiting: deque[SimRequest] = deque()
        self.kv_used_tokens = 0
        self.metrics = SimMetrics(model=config.model, gauges=self.gauges)
        self._ttft = config.ttft_s
        self._itl = config.itl_s
        self._itl_per_request = config.itl_per_request

    def gauges(self) -> tuple[int, int, float]:
        cap = self.config.kv_cache_capacity_tokens
        ratio = min(self.kv_used_tokens / cap, 1.0) if cap else 0.0
        return len(self.running), len(self.waiting), ratio

    # admission
    def submit(self, req: SimRequest) -> None:
        """Queue or admit a validated request (its stream head, if any, is already sent)."""
        req.state = "waiting"
        if not self.waiting and self._fits(req):
            self._admit(req)
        else:
            self.waiting.append(req)

    def _fits(self, req: SimRequest) -> bool:
        cfg = self.config
        if cfg.batch_limit is not None and len(self.running) >= cfg.batch_limit:
            return False
        cap = cfg.kv_cache_capacity_tokens
        if cap is not None and self.running and self.kv_used_tokens + req.prompt_tokens + req.tokens_sent > cap:
            return False
        return True

    def _admit(self, req: SimRequest) -> None:
        cfg = self.config
        now = self.loop.time()
        self.running[req] = None
        req.state = "running"
        req.kv_tokens = req.prompt_tokens + req.tokens_sent
        self.kv_used_tokens += req.kv_tokens
        if req.t_admitted_s is None:  # first admission (not after a preemption)
            req.t_admitted_s = time.perf_counter()
            self.metrics.queue.observe(req.t_admitted_s - req.t_arrival_s)
            self.metrics.prompt_tokens += req.prompt_tokens
            req.itl_s = self._itl.sample_s(self.rng)
            delay = self._ttft.sample_s(self.rng) + cfg.prefill_s_per_token * req.prompt_tokens
        else:  # recompute the KV cache of prompt and output so far
            delay = cfg.prefill_s_per_token * (req.prompt_tokens + req.tokens_sent) + req.itl_s
        req.next_due = now + delay
        req.handle = self.loop.call_at(req.next_due, self._tick, req)

    def _release(self, req: SimRequest) -> None:
        if req in self.running:
            del self.running[req]
            self.kv_used_tokens -= req.kv_tokens
            req.kv_tokens = 0
        elif req.state == "waiting":
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        while self.waiting and self._fits(self.waiting[0]):
            self._admit(self.waiting.popleft())

    def _preempt_if_full(self) -> None:
        cap = self.config.kv_cache_capacity_tokens
        while cap is not None and self.kv_used_tokens > cap and len(self.running) > 1:
            victim = next(reversed(self.running))
            if victim.handle is not None:
                victim.handle.cancel()
                victim.handle = None
            del self.running[victim]
            self.kv_used_tokens -= victim.kv_tokens
            victim.kv_tokens = 0
            victim.state = "waiting"
            victim.preemptions += 1
            self.metrics.preemptions += 1
            self.waiting.appendleft(victim)

    def abort(self, req: SimRequest, outcome: str) -> None:
        """Stop a request that will not complete (client gone, reset fault, shutdown)."""
        if req.state == "done":
            return
        if req.handle is not None:
            req.handle.cancel()
            req.handle = None
        req.outcome = outcome
        self.metrics.success["abort"] += 1
        self._finish(req)

    def _finish(self, req: SimRequest) -> None:
        self._release(req)
        req.state = "done"
        req.t_done_s = time.perf_counter()
        if req.in_truth:
            self.truth.add(req.truth())

    # token timing
    def _chunk_size(self, remaining: int) -> int:
        cfg = self.config
        k = cfg.tokens_per_chunk
        if cfg.multi_token_chunk_probability and self.rng.random() < cfg.multi_token_chunk_probability:
            k = cfg.multi_token_chunk_tokens
        return k if k < remaining else remaining

    def _gap_s(self, req: SimRequest, tokens: int) -> float:
        cfg = self.config
        itl = req.itl_s if self._itl_per_request else self._itl.sample_s(self.rng)
        if cfg.itl_batch_alpha:
            itl *= 1.0 + cfg.itl_batch_alpha * (len(self.running) - 1)
        return itl * tokens

    def _tick(self, req: SimRequest) -> None:
        req.handle = None
        conn = req.conn
        if conn.closed:
            self.abort(req, "client_disconnected")
            return
        now = self.loop.time()
        t = time.perf_counter()
        fault = req.fault
        fmt = req.fmt
        stream = req.stream
        usage = req.continuous_usage and not (fault is not None and fault.kind == "no_usage")
        metrics = self.metrics
        parts: list[bytes] = []
        last = False
        while True:
            if fault is not None and not req.fault_done and req.chunks_sent == fault.after_chunks:
                kind = fault.kind
                if kind == "stall":
                    req.fault_done = True
                    req.stall_s = fault.stall_s
                    if parts:
                        conn.write(b"".join(parts))
                    req.next_due = now + fault.stall_s
                    req.handle = self.loop.call_at(req.next_due, self._tick, req)
                    return
                if kind == "reset":
                    req.fault_done = True
                    if parts:
                        conn.write(b"".join(parts))
                    conn.abort()
                    self.abort(req, "reset")
                    return
                if kind == "error_event" and stream:
                    req.fault_done = True
                    parts.append(fmt.error_event("simulated engine failure (injected fault)"))
                    parts.append(fmt.done)
                    conn.end_stream(b"".join(parts))
                    req.outcome = "error_event"
                    metrics.success["error"] += 1
                    self._finish(req)
                    return
            k = self._chunk_size(req.output_tokens - req.tokens_sent)
            req.tokens_sent += k
            req.chunks_sent += 1
            metrics.generation_tokens += k
            req.kv_tokens += k
            self.kv_used_tokens += k
            last = req.tokens_sent >= req.output_tokens
            if req.t_first_token_s is None:
                req.t_first_token_s = t
                metrics.ttft.observe(t - req.t_arrival_s)
                if stream and fmt.chat:
                    parts.append(fmt.role(usage=usage))
            else:
                metrics.itl.observe(t - req.t_last_token_s)
            req.t_last_token_s = t
            if stream:
                req.offsets_s.append(t - req.t_arrival_s)
                req.chunk_tokens.append(k)
                if fault is not None and fault.kind == "malformed" and not req.fault_done \
                        and req.chunks_sent == fault.after_chunks + 1:
                    req.fault_done = True
                    req.malformed_chunk = req.chunks_sent - 1
                    parts.append(fmt.malformed(k))
                else:
                    parts.append(fmt.content(k, req.tokens_sent, usage=usage, final=last))
            if last:
                break
            req.next_due += self._gap_s(req, k)
            if req.next_due > now:
                break
        if not last:
            if parts:
                conn.write(b"".join(parts))
            self._preempt_if_full()
            if req.state == "running":
                req.handle = self.loop.call_at(req.next_due, self._tick, req)
            return
        # the request is complete
        metrics.e2e.observe(t - req.t_arrival_s)
        metrics.success[req.finish_reason] += 1
        if stream:
            if fault is not None and fault.kind in ("no_done", "no_usage"):
                req.fault_done = True
            if req.include_usage and not (fault is not None and fault.kind == "no_usage"):
                parts.append(fmt.usage_only(req.tokens_sent))
            if not (fault is not None and fault.kind == "no_done"):
                parts.append(fmt.done)
            conn.end_stream(b"".join(parts))
        elif req.on_complete is not None:
            req.on_complete(req)
        self._finish(req)

    def stop_all(self) -> None:
        """Abort every request (server shutdown)."""
        for req in list(self.running) + list(self.waiting):
            self.abort(req, "server_stopped")


def completion_text(tokens: int) -> str:
    """The text a non-streamed response carries for ``tokens`` tokens."""
    return TOKEN_TEXT * tokens
