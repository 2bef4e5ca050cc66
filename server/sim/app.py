"""Routes of the simulated server: the OpenAI/vLLM endpoints plus ``/sim/*``.

``/v1/*`` needs ``Authorization: Bearer KEY`` when an API key is set (401
``{"error": "Unauthorized"}`` otherwise, like vLLM); ``/health``, ``/metrics``,
``/version``, ``/tokenize`` and ``/sim/*`` never do. ``GET /sim/truth?since=N``
returns the truth records from index N; ``GET /sim/faults`` the injected
fault counts. A completion request with the ``x-envelope-probe`` header (Envelope's
capability probe, before any load) is served as usual but gets no injected fault
and counts neither in ``/sim/faults`` nor in the truth: those describe the load.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid

import orjson

from server.sim.chunks import ChunkFormat, error_body
from server.sim.config import FaultSpec, SimConfig

PROBE_HEADER = "x-envelope-probe"  # envelope.capabilities.PROBE_HEADER
from server.sim.engine import Engine, SimRequest, TruthLog, completion_text
from server.sim.faults import FaultPlan
from server.sim.http import Connection, HttpRequest
from server.sim.tokenizer import chat_tokens, count_chat_tokens, count_text_tokens, split_tokens

__all__ = ["SimApp", "SIM_VERSION"]

SIM_VERSION = "0.32.0+envelope.sim"
_JSON = b"application/json"


class _BadRequest(Exception):
    def __init__(self, status: int, body: bytes, headers: tuple = ()) -> None:
        self.status = status
        self.body = body
        self.headers = headers


def _bad(message: str, param: str | None = None) -> _BadRequest:
    return _BadRequest(400, error_body(message, "BadRequestError", 400, param))


class SimApp:
    """Request handler bound to one event loop; owns the engine, faults and truth."""

    def __init__(self, config: SimConfig, *, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.truth = TruthLog(config.truth_file)
        self.engine = Engine(config, loop=loop, truth=self.truth)
        self.faults = FaultPlan(config.faults, seed=config.seed)
        self.connections: set[Connection] = set()
        self._counter = 0
        self._key = config.api_key.encode() if config.api_key else None
        self._created = int(time.time())

    def protocol(self) -> Connection:
        return Connection(self.handle, self._on_accept, self.connections)

    def _on_accept(self, conn: Connection) -> bool:
        return self.faults.on_accept() is None

    def close(self) -> None:
        self.engine.stop_all()
        for conn in list(self.connections):
            conn.abort()
        self.truth.close()

    # routing
    def handle(self, conn: Connection, req: HttpRequest) -> None:
        path = req.path
        try:
            if path.startswith("/v1/") and self._key is not None and not self._authorized(req):
                conn.send(401, b'{"error":"Unauthorized"}')
                return
            route = _ROUTES.get(path)
            if route is None:
                conn.send(404, b'{"detail":"Not Found"}')
                return
            method, fn = route
            if req.method != method:
                conn.send(405, b'{"detail":"Method Not Allowed"}')
                return
            fn(self, conn, req)
        except _BadRequest as exc:
            conn.send(exc.status, exc.body, headers=exc.headers)
        except Exception as exc:  # a bug in the sim: answer, do not hang the client
            conn.send(500, error_body(f"simulated server bug: {exc!r}", "InternalServerError", 500),
                      keep_alive=False)

    def _authorized(self, req: HttpRequest) -> bool:
        scheme, _, token = req.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), self._key)  # type: ignore[arg-type]

    # plain endpoints
    def _health(self, conn: Connection, req: HttpRequest) -> None:
        conn.send(200, b"")

    def _version(self, conn: Connection, req: HttpRequest) -> None:
        conn.send(200, orjson.dumps({"version": SIM_VERSION}))

    def _models(self, conn: Connection, req: HttpRequest) -> None:
        cfg = self.config
        card = {"id": cfg.model, "object": "model", "created": self._created, "owned_by": "vllm",
                "root": cfg.model, "parent": None, "max_model_len": cfg.max_model_len}
        conn.send(200, orjson.dumps({"object": "list", "data": [card]}))

    def _metrics(self, conn: Connection, req: HttpRequest) -> None:
        conn.send(200, self.engine.metrics.render(), content_type=b"text/plain; version=0.0.4; charset=utf-8")

    def _truth(self, conn: Connection, req: HttpRequest) -> None:
        try:
            since = int(req.query.get("since", "0"))
        except ValueError:
            raise _bad("since must be an integer") from None
        conn.send(200, orjson.dumps(self.truth.since(since)))

    def _faults(self, conn: Connection, req: HttpRequest) -> None:
        conn.send(200, orjson.dumps({"injected": self.faults.counts(), "requests": self._counter}))

    def _json(self, req: HttpRequest) -> dict:
        try:
            body = orjson.loads(req.body)
        except orjson.JSONDecodeError as exc:
            raise _bad(f"JSON decode error: {exc}") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        return body

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.config.model:
            raise _BadRequest(404, error_body(
                f"The model `{model}` does not exist. Valid aliases: {self.config.model}.",
                "NotFoundError", 404, "model"))

    def _tokenize(self, conn: Connection, req: HttpRequest) -> None:
        body = self._json(req)
        self._check_model(body)
        cfg = self.config
        if body.get("messages") is not None:
            tokens = chat_tokens(body["messages"], message_overhead_tokens=cfg.chat_message_overhead_tokens,
                                 generation_prompt_tokens=cfg.chat_generation_prompt_tokens,
                                 add_generation_prompt=bool(body.get("add_generation_prompt", True)))
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise _bad("either `prompt` (a string) or `messages` is required")
            tokens = split_tokens(prompt)
            if body.get("add_special_tokens", True):
                tokens = ["<|special|>"] * cfg.prompt_special_tokens + tokens
        out = {"count": len(tokens), "max_model_len": cfg.max_model_len,
               "tokens": [_token_id(t) for t in tokens],
               "token_strs": tokens if body.get("return_token_strs") else None}
        conn.send(200, orjson.dumps(out))

    # completions
    def _chat(self, conn: Connection, req: HttpRequest) -> None:
        self._completion(conn, req, chat=True)

    def _text(self, conn: Connection, req: HttpRequest) -> None:
        self._completion(conn, req, chat=False)

    def _completion(self, conn: Connection, req: HttpRequest, *, chat: bool) -> None:
        cfg = self.config
        body = self._json(req)
        self._check_model(body)
        stream = bool(body.get("stream", False))
        opts = body.get("stream_options") or {}
        if body.get("stream_options") is not None and not stream:
            raise _bad("Stream options can only be defined when `stream=True`.", "stream_options")
        include_usage = bool(opts.get("include_usage"))
        continuous = include_usage and bool(opts.get("continuous_usage_stats"))
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _bad("`messages` must be a non-empty list", "messages")
            prompt_tokens = count_chat_tokens(messages, message_overhead_tokens=cfg.chat_message_overhead_tokens,
                                              generation_prompt_tokens=cfg.chat_generation_prompt_tokens)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                prompt_tokens = len(prompt)
            elif isinstance(prompt, str):
                prompt_tokens = count_text_tokens(prompt) + cfg.prompt_special_tokens
            else:
                raise _bad("`prompt` must be a string or a list of token ids", "prompt")
        if prompt_tokens > cfg.max_model_len:
            raise _bad(f"Input length ({prompt_tokens}) exceeds model's maximum context length "
                       f"({cfg.max_model_len}).")
        if prompt_tokens == cfg.max_model_len:
            raise _bad(f"The decoder prompt (length {prompt_tokens}) plus the number of requested output "
                       f"tokens (at least 1) is longer than the maximum model length of {cfg.max_model_len}. "
                       "Make sure that `max_model_len` is no smaller than the number of text tokens "
                       "(prompt + requested output tokens).")
        room = cfg.max_model_len - prompt_tokens
        max_tokens = body.get("max_completion_tokens") if chat else None
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        if max_tokens is None:
            max_tokens = room if chat else cfg.default_max_tokens
        min_tokens = body.get("min_tokens") or 0
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise _bad("max_tokens must be at least 1", "max_tokens")
        if not isinstance(min_tokens, int) or min_tokens < 0 or min_tokens > max_tokens:
            raise _bad("min_tokens must be between 0 and max_tokens", "min_tokens")
        max_tokens = min(max_tokens, room)
        output_tokens = max_tokens
        if cfg.eos_after_tokens is not None and not body.get("ignore_eos"):
            output_tokens = max(min(max_tokens, cfg.eos_after_tokens), min(min_tokens, max_tokens), 1)
        finish_reason = "length" if output_tokens == max_tokens else "stop"

        # Envelope's capability probe (a few short requests before the load) is served like any other
        # request but is not part of the load: no injected fault, no count, no truth record
        probe = bool(req.headers.get(PROBE_HEADER))
        if not probe:
            self._counter += 1
        request_id = req.headers.get("x-request-id") or (f"probe-{uuid.uuid4().hex[:8]}" if probe
                                                         else f"sim-{self._counter}")
        endpoint = "chat" if chat else "completions"
        fault = None if probe else self.faults.on_request(stream=stream)
        id_header = ((b"x-request-id", request_id.encode("latin-1", "replace")),)
        if fault is not None and fault.kind.startswith("http_"):
            self._send_fault(conn, req, fault, request_id, endpoint, stream, prompt_tokens, output_tokens, id_header)
            return
        response_id = ("chatcmpl-" if chat else "cmpl-") + request_id
        fmt = ChunkFormat(chat=chat, response_id=response_id, model=cfg.model, created_unix_s=int(time.time()),
                          prompt_tokens=prompt_tokens, finish_reason=finish_reason) if stream else None
        sim = SimRequest(request_id=request_id, endpoint=endpoint, stream=stream, prompt_tokens=prompt_tokens,
                         output_tokens=output_tokens, finish_reason=finish_reason, fault=fault,
                         include_usage=include_usage, continuous_usage=continuous, fmt=fmt, conn=conn,
                         t_arrival_s=req.t_arrival_s)
        sim.in_truth = not probe
        engine = self.engine
        conn.on_close = lambda: engine.abort(sim, "client_disconnected")
        if stream:
            conn.start_stream(headers=id_header)
        else:
            sim.on_complete = lambda r: self._send_full(conn, r, chat=chat, response_id=response_id,
                                                        headers=id_header)
        engine.submit(sim)

    def _send_full(self, conn: Connection, r: SimRequest, *, chat: bool, response_id: str, headers: tuple) -> None:
        conn.on_close = None
        usage = {"prompt_tokens": r.prompt_tokens, "total_tokens": r.prompt_tokens + r.tokens_sent,
                 "completion_tokens": r.tokens_sent, "prompt_tokens_details": None}
        text = completion_text(r.tokens_sent)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None,
                                              "annotations": None, "audio": None, "function_call": None,
                                              "tool_calls": [], "reasoning": None},
                      "logprobs": None, "finish_reason": r.finish_reason, "stop_reason": None, "token_ids": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": r.finish_reason,
                      "stop_reason": None, "token_ids": None, "prompt_logprobs": None, "prompt_token_ids": None}
            obj = "text_completion"
        out = {"id": response_id, "object": obj, "created": int(time.time()), "model": self.config.model,
               "choices": [choice], "service_tier": None, "system_fingerprint": None, "usage": usage,
               "prompt_logprobs": None, "prompt_token_ids": None, "kv_transfer_params": None}
        conn.send(200, orjson.dumps(out), headers=headers)

    def _send_fault(self, conn: Connection, req: HttpRequest, fault: FaultSpec, request_id: str, endpoint: str,
                    stream: bool, prompt_tokens: int, output_tokens: int, id_header: tuple) -> None:
        kind = fault.kind
        headers = id_header
        if kind == "http_401":
            status, body = 401, b'{"error":"Unauthorized"}'
        elif kind == "http_404":
            status, body = 404, error_body(
                f"The model `{self.config.model}-missing` does not exist. Valid aliases: {self.config.model}.",
                "NotFoundError", 404, "model")
        elif kind == "http_429":
            status, body = 429, error_body("Too many requests (injected fault)", "RateLimitError", 429)
            if fault.retry_after_s is not None:
                headers = headers + ((b"retry-after", b"%d" % fault.retry_after_s),)
        elif kind == "http_503":
            status, body = 503, error_body("Service unavailable (injected fault)", "ServiceUnavailableError", 503)
        else:
            status, body = 500, error_body("Internal server error (injected fault)", "InternalServerError", 500)
        conn.send(status, body, headers=headers)
        now = time.perf_counter()
        sim = SimRequest(request_id=request_id, endpoint=endpoint, stream=stream, prompt_tokens=prompt_tokens,
                         output_tokens=output_tokens, finish_reason="", fault=fault, include_usage=False,
                         continuous_usage=False, fmt=None, conn=conn, t_arrival_s=req.t_arrival_s)
        sim.outcome = kind
        sim.t_done_s = now
        sim.state = "done"
        self.truth.add(sim.truth())


def _token_id(token: str) -> int:
    # a stable small id per token string (deterministic across processes, unlike hash())
    return uuid.uuid5(uuid.NAMESPACE_OID, token).int % 100_000


_ROUTES = {
    "/health": ("GET", SimApp._health),
    "/version": ("GET", SimApp._version),
    "/v1/models": ("GET", SimApp._models),
    "/metrics": ("GET", SimApp._metrics),
    "/tokenize": ("POST", SimApp._tokenize),
    "/v1/chat/completions": ("POST", SimApp._chat),
    "/v1/completions": ("POST", SimApp._text),
    "/sim/truth": ("GET", SimApp._truth),
    "/sim/faults": ("GET", SimApp._faults),
}
