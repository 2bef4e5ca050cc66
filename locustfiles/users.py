"""The streaming LLM user: sends one request at a time, writes its record, fires Locust events.

The hot path only takes ``perf_counter`` readings and hands bytes to the
stream observer; the record is built once at the end, written as one line,
and reported to Locust as up to three entries (E2E, TTFT, TPOT) so that
Locust's own stats, CSV and web UI show them. All metric arithmetic comes
from :mod:`envelope.metrics`, so Locust and our analysis agree by construction.
"""

from __future__ import annotations

import itertools
import random
import time

import gevent
from locust import FastHttpUser, constant, task

from envelope import metrics
from envelope.records import ErrorCategory, RequestRecord
from envelope.scenario import assign_client
from envelope.stream import StreamObserver
from locustfiles.context import EnvelopeRun
from locustfiles.open_loop import concurrency_share
from locustfiles.sources import ConversationState, RequestPlan, dataset_prompt
from locustfiles.transports import RequestSpec, openai_client, stream_fasthttp, stream_openai

__all__ = ["LLMUser", "LLMRequestError", "build_request", "send_one", "report"]

perf_counter = time.perf_counter
_user_seq = itertools.count()
UNREACHABLE = frozenset({ErrorCategory.CONNECT_ERROR, ErrorCategory.TIMEOUT_CONNECT})


class LLMRequestError(Exception):
    """A failed request as Locust sees it; ``str`` is ``category: detail`` (Locust groups failures by it)."""

    def __init__(self, category: str, detail: str | None) -> None:
        super().__init__(f"{category}: {detail}" if detail else category)
        self.category = category


class _RecordView:
    """Read a :class:`RequestRecord`'s fields through the Mapping interface ``envelope.metrics`` expects."""

    __slots__ = ("_rec",)

    def __init__(self, rec: RequestRecord) -> None:
        self._rec = rec

    def get(self, key: str, default=None):
        return getattr(self._rec, key, default)

    def __getitem__(self, key: str):
        return getattr(self._rec, key)


class LLMUser(FastHttpUser):
    """Streams chat (or text) completions back to back, closed loop: one request in flight per user."""

    wait_time = constant(0)
    # The first-token and total timeouts are enforced per request; the socket timeout is only a backstop.
    network_timeout = 3600.0
    connection_timeout = 10.0
    insecure = False

    def on_start(self) -> None:
        self.ctx: EnvelopeRun = self.environment.envelope
        seq = next(_user_seq)
        self.user_id = f"{self.ctx.worker_id}/{seq}"
        self.seq = seq
        self._clients: dict[int, str | None] = {}  # stage index -> this user's class there
        self.conversation: ConversationState | None = None
        self._conversations = itertools.count()
        worker_index = getattr(self.environment.runner, "worker_index", 0) or 0
        self.rng = random.Random(f"{self.ctx.scenario.seed}:{worker_index}:{seq}")
        self._req_seq = itertools.count()
        self._openai = None
        self._backoff_s = 0.0

    def on_stop(self) -> None:
        if self._openai is not None:
            self._openai.close()

    def _openai_client(self):
        if self._openai is None:
            key = self.ctx.api_key.get() if self.ctx.api_key else "EMPTY"
            self._openai = openai_client(self.host, key, self.connection_timeout)
        return self._openai

    @task
    def one_request(self) -> None:
        stage = self.ctx.stage
        if self.ctx.aborted or getattr(stage, "open_loop", False):
            # the run is stopping early, or an open-loop stage sends from the per-process
            # dispatcher: this user is about to be stopped and sends nothing more
            gevent.sleep(0.05)
            return
        client = self._client(stage)
        if client is None:  # every class of this stage is at its quota: this user has nothing to send
            gevent.sleep(0.25)
            return
        conv = client.workload.conversation
        plan = on_answer = None
        if conv is not None:
            plan, on_answer = self._next_turn(client, conv)
            if plan is None:
                return
        record = send_one(self.ctx, self.environment, stage=stage, client=client, rng=self.rng,
                          request_id=f"{self.ctx.worker_id}-{next(self._req_seq)}-{id(self) & 0xFFFF:x}",
                          transport=self._transport(client), user_id=self.user_id, plan=plan, on_answer=on_answer)
        if conv is not None and conv.think_time_s and self.conversation is not None and record.ok:
            gevent.sleep(conv.think_time_s)
        if record.error_category in UNREACHABLE:
            # Nothing is listening (the server died or restarts): retrying at once would write
            # thousands of identical records a second. Back off 50 ms, doubling to 1 s.
            self._backoff_s = min(1.0, max(0.05, self._backoff_s * 2))
            gevent.sleep(self._backoff_s)
        else:
            self._backoff_s = 0.0

    def _client(self, stage):
        """This user's client class in ``stage``: weighted among the classes that share users, below their
        ``max_concurrency`` quota (this process's share of it); None when all are full."""
        index = stage.index
        if index not in self._clients:
            loop = self.ctx.open_loop
            processes, rank = (loop.processes, loop.rank) if loop is not None else (1, 0)
            classes = [(c.name, c.weight, concurrency_share(c.max_concurrency, processes, rank))
                       for c in stage.clients if c.rate_per_s is None]
            self._clients[index] = assign_client(classes, self.seq)
        name = self._clients[index]
        return None if name is None else next(c for c in stage.clients if c.name == name)

    def _next_turn(self, client, conv):
        """The next turn of this user's conversation (a new conversation when the last one ended)."""
        ctx = self.ctx
        state = self.conversation
        if state is None or state.done or state.client != client.name:
            turns = conv.turns if isinstance(conv.turns, int) else conv.turns.sample(self.rng)
            state = self.conversation = ConversationState(
                conversation_id=f"{self.user_id}/c{next(self._conversations)}", turns=turns, client=client.name)
        plan = state.plan(client.workload, ctx.factory, self.rng, max_model_len=ctx.max_model_len,
                          seed=ctx.scenario.seed)
        if plan is None:  # the next turn would not fit the model's length: a new conversation starts
            self.conversation = None
            return None, None

        def on_answer(record, sent, answer_text):
            if record.ok:
                state.answered(sent, answer_text=answer_text, answer_tokens=record.output_tokens,
                               server_prompt_tokens=record.prompt_tokens, conv=conv, factory=ctx.factory, rng=self.rng)
            else:  # a failed turn ends its conversation: the history would be wrong
                self.conversation = None

        return plan, on_answer

    def _transport(self, client):
        if client.transport == "openai":
            openai_client = self._openai_client()
            return lambda spec, obs: stream_openai(openai_client, spec, obs)
        pool, host = self.client.client.clientpool, self.host
        return lambda spec, obs: stream_fasthttp(pool, host, spec, obs)


def build_request(ctx: EnvelopeRun, stage, client, rng: random.Random, plan: RequestPlan | None = None):
    """The request for one request of ``client`` in ``stage``: (spec, plan). Without a ``plan`` (a trace
    entry or a conversation's turn), the workload's own: a dataset entry or a synthetic prompt."""
    workload = client.workload
    factory = ctx.factory
    if factory is None:
        raise RuntimeError("prompts were not calibrated: test_start did not run")
    if plan is None:
        plan = _workload_plan(ctx, client, rng)
    path = "/v1/chat/completions" if client.endpoint == "chat" else "/v1/completions"
    # what the probe found this server does with vLLM's extensions: refused fields are not sent
    caps = ctx.capabilities.endpoint(path) if ctx.capabilities is not None else None
    body: dict = {"model": ctx.model, "stream": True}
    if caps is None or caps.stream_options:
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    body["temperature"] = workload.temperature
    built = plan.built
    if client.endpoint == "chat":
        body["messages"] = built.messages if built.messages is not None else [{"role": "user", "content": built.text}]
    else:
        body["prompt"] = built.text if built.text is not None else "\n".join(m["content"] for m in built.messages or ())
    output_tokens = plan.output_tokens
    if output_tokens is not None:
        body["max_tokens"] = output_tokens
        if workload.fixed_output and (caps is None or caps.sends_forced_fields):
            body["min_tokens"] = output_tokens
            body["ignore_eos"] = True
    timeouts = stage.timeouts
    spec = RequestSpec(path=path, body=body, headers=ctx.auth_headers(),
                       connect_timeout_s=timeouts.connect_s, first_token_timeout_s=timeouts.first_token_s,
                       total_timeout_s=timeouts.total_s)
    return spec, plan


def _workload_plan(ctx: EnvelopeRun, client, rng: random.Random) -> RequestPlan:
    workload = client.workload
    factory = ctx.factory
    if workload.dataset is not None:
        measured = ctx.dataset_sampler(workload.dataset, client.endpoint).next()
        output = measured.output_tokens if measured.output_tokens is not None else workload.sample_output_tokens(rng)
        return RequestPlan(built=dataset_prompt(measured, endpoint=client.endpoint), prompt_tokens=measured.prompt_tokens,
                           output_tokens=output, source_index=measured.entry.index)
    output_tokens = workload.sample_output_tokens(rng)
    prompt_tokens = workload.sample_prompt_tokens(rng, max_model_len=ctx.max_model_len)
    sys_prefix = None
    if workload.system_prefix_tokens:
        sys_prefix = factory.system_prefix(workload.system_prefix_tokens, ctx.scenario.seed)
    build = factory.chat if client.endpoint == "chat" else factory.completion
    built = build(prompt_tokens, rng, system_prefix=sys_prefix, system_prefix_tokens=workload.system_prefix_tokens)
    return RequestPlan(built=built, prompt_tokens=prompt_tokens, output_tokens=output_tokens)


def send_one(ctx: EnvelopeRun, environment, *, stage, client, rng: random.Random, request_id: str,
             transport, t_intended_s: float | None = None, user_id: str | None = None,
             plan: RequestPlan | None = None, on_answer=None) -> RequestRecord:
    """Send one streamed request, write its record, report it to Locust; returns the record.

    ``transport(spec, observer) -> Outcome`` does the network part. ``t_intended_s``
    (open loop) is when the schedule meant it to go; the record keeps both times.
    If Locust kills the greenlet mid-request, what was measured is recorded as
    cancelled and the kill goes on. So does a Ctrl-C or SIGTERM whose
    ``KeyboardInterrupt``/``SystemExit`` lands in this greenlet (a signal is
    raised in whichever greenlet is running): the server has the request, so
    the record must exist before the interrupt goes on to stop the process.

    A stream that ended properly without any ``usage`` from a server that the
    probe saw giving usage (:mod:`envelope.capabilities`) fails as
    ``missing_usage``; a server that never gives usage is not failed request by
    request: its records are counted with the model's tokenizer where it is on
    this machine, else they keep the client's chunk count (``token_source``).
    Without a probe (a context built by hand), the process learns it from the
    first stream that carried usage (``ctx.server_gave_usage``).
    """
    spec, plan = build_request(ctx, stage, client, rng, plan)
    caps = ctx.capabilities.endpoint(spec.path) if ctx.capabilities is not None else None
    counter = ctx.local_tokenizer if ctx.capabilities is not None and \
        ctx.capabilities.token_counting == "tokenizer" else None
    wall_start = time.time() + ctx.clock_offset_s  # on the master's clock (0 unless a worker)
    t_start = perf_counter()
    # a conversation keeps the server's answer for its history (recorded only with --record-text), and
    # counting with the local tokenizer needs the answer's text
    obs = StreamObserver(t_start, keep_text=ctx.record_text or on_answer is not None or counter is not None)
    interrupt: BaseException | None = None
    ctx.in_flight += 1
    try:
        outcome = transport(spec, obs)
    except (gevent.GreenletExit, KeyboardInterrupt, SystemExit) as exc:
        # Locust is stopping this user (or the process) mid-request: keep what was measured, then let it stop.
        interrupt = exc
        outcome = None
    finally:
        ctx.in_flight -= 1
    t_done = perf_counter()
    t_start = obs.t_start_s  # the transport may have stamped closer to the send (StreamObserver.sent)
    cancelled = interrupt is not None
    fields = obs.finish(
        t_done,
        error_category=ErrorCategory.CANCELLED if cancelled else outcome.error_category,
        error_detail=_cancel_detail(interrupt) if cancelled else outcome.error_detail,
        http_status=None if cancelled else outcome.http_status,
        # probed: a server that gives usage must give it to every stream (else missing_usage); one that
        # never does is noted once in capabilities.json, not failed request by request
        usage_expected=(caps.usage != "none") if caps is not None else (
            ctx.server_gave_usage and _asks_for_usage(spec.body)),
        done_expected=caps.done_marker if caps is not None else True,
    )
    if obs.usage_seen:
        ctx.server_gave_usage = True
    fields.update(_token_counts(fields, spec.body, counter, ctx.capabilities))
    answer_text = fields.pop("completion_text", None)
    record = RequestRecord(
        run_id=ctx.run_id,
        request_id=request_id,
        worker_id=ctx.worker_id,
        client=client.name,
        endpoint=client.endpoint,
        pass_name=stage.pass_name,
        stage_index=stage.index,
        stage_name=stage.name,
        wall_start_unix_s=wall_start,
        user_id=user_id,
        client_stall_max_ms=_stall_ms(ctx, t_start, t_done),
        t_intended_s=t_intended_s,
        t_start_s=t_start,
        t_first_byte_s=None if outcome is None else outcome.t_first_byte_s,
        source_index=plan.source_index,
        conversation_id=plan.conversation_id,
        turn_index=plan.turn_index,
        requested_prompt_tokens=plan.prompt_tokens,
        requested_output_tokens=plan.output_tokens,
        prompt_text=_prompt_text(plan.built) if ctx.record_text else None,
        completion_text=answer_text if ctx.record_text else None,
        **fields,
    )
    ctx.record_writer().write(record)
    report(environment, record)
    ctx.note_result(record)
    if on_answer is not None and interrupt is None:
        on_answer(record, plan, answer_text)
    if interrupt is not None:
        raise interrupt
    return record


def _cancel_detail(interrupt: BaseException) -> str:
    if isinstance(interrupt, gevent.GreenletExit):
        return "stopped by Locust mid-request"
    return f"interrupted mid-request ({type(interrupt).__name__})"


def _stall_ms(ctx: EnvelopeRun, t_start: float, t_done: float) -> float | None:
    """The worst stall of this process's event loop during the request (None where nothing watches)."""
    watcher = getattr(ctx, "loop_lag", None)
    return None if watcher is None else round(watcher.worst_overlapping_ms(t_start, t_done), 3)


def report(environment, rec: RequestRecord) -> None:
    """Fire Locust's request events for one record: E2E (or a failure, or CANCELLED), TTFT, TPOT."""
    fire = environment.events.request.fire
    view = _RecordView(rec)
    name = rec.client
    if rec.error_category == ErrorCategory.CANCELLED:
        # Stopped by the load generator itself (the run ended or was interrupted): not a server
        # failure, so not a Locust failure, but counted, so Locust's totals still equal the records.
        end = rec.t_done_s if rec.t_done_s is not None else rec.t_start_s
        fire(request_type="CANCELLED", name=name, response_time=(end - rec.t_start_s) * 1000.0,
             response_length=rec.output_tokens or 0, exception=None, context={})
        return
    if rec.error_category is not None:
        end = rec.t_done_s if rec.t_done_s is not None else rec.t_start_s
        fire(request_type="E2E", name=name, response_time=(end - rec.t_start_s) * 1000.0,
             response_length=rec.output_tokens or 0,
             exception=LLMRequestError(rec.error_category, rec.error_detail), context={})
        return
    e2e = metrics.e2e_s(view)
    if e2e is None:  # succeeded without a token chunk: time until the stream ended
        e2e = (rec.t_done_s or rec.t_start_s) - rec.t_start_s
    fire(request_type="E2E", name=name, response_time=e2e * 1000.0,
         response_length=rec.output_tokens or 0, exception=None, context={})
    ttft = metrics.ttft_s(view)
    if ttft is not None:
        fire(request_type="TTFT", name=name, response_time=ttft * 1000.0, response_length=0,
             exception=None, context={})
    tpot = metrics.tpot_s(view)
    if tpot is not None:
        fire(request_type="TPOT", name=name, response_time=tpot * 1000.0, response_length=0,
             exception=None, context={})


def _token_counts(fields: dict, body: dict, counter, capabilities) -> dict:
    """Where the record's token counts come from (``token_source``) and, when counting with the local
    tokenizer (a server without usage, or ``--count-tokens tokenizer``), the counts themselves: the answer's
    text and the prompt as the server renders it, the server's own usage kept beside them."""
    server_said = not fields["output_tokens_estimated"]
    if counter is None:
        return {"token_source": "server" if server_said else "chunks"}
    text = fields.get("completion_text") or ""
    if "messages" in body:
        prompt = counter.count_messages(body["messages"])
    else:
        prompt = counter.count_prompt(body.get("prompt") or "")
    output = counter.count_text(text) if text else 0
    chunk_tokens = fields.get("chunk_tokens")
    return {"token_source": "tokenizer",
            "output_tokens": output,
            # the server's per-chunk counts sum to its own total: kept only where the tokenizer agrees with it
            "chunk_tokens": chunk_tokens if chunk_tokens is not None and sum(chunk_tokens) == output else None,
            "output_tokens_estimated": False,
            "prompt_tokens": prompt,
            "output_tokens_server": fields["output_tokens"] if server_said else None,
            "prompt_tokens_server": fields.get("prompt_tokens")}


def _asks_for_usage(body: dict) -> bool:
    """Whether a request body asks for usage in its stream (``stream_options.include_usage``)."""
    options = body.get("stream_options")
    return bool(body.get("stream") and isinstance(options, dict) and options.get("include_usage"))


def _prompt_text(built) -> str:
    if built.messages is not None:
        return "\n".join(m["content"] for m in built.messages)
    return built.text or ""
