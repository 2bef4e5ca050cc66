"""What an OpenAI-compatible server really does, probed before any load, and how a run adapts to it.

Every workload Envelope sends was written against vLLM: it asks for ``min_tokens``
and ``ignore_eos`` (a fixed output length), for usage in the stream (and per chunk:
``continuous_usage_stats``), sizes prompts with ``/tokenize`` and reads ``/metrics``.
Another server may refuse those fields (``transformers serve`` answers 422
"Unexpected fields"), ignore them (no usage, output lengths of its own choosing),
end its streams without ``data: [DONE]``, or answer a streaming request with one
plain JSON body. Each of these would give silently different numbers, so the
server is asked, with a few small requests, before the first stage:

- ``GET /v1/models``: does it list the model (else the name comes from the launcher or ``--model``);
- ``POST /tokenize``: can it size prompts (else the model's tokenizer, when it is on this machine);
- ``GET /metrics``: which of the telemetry Envelope reads it exposes (queue, KV cache, latency histograms);
- one short streamed request per endpoint the scenario uses, as the workload would send it: are the
  fields accepted, is the forced length honoured, does usage come (per chunk, at the end, or never),
  does the stream end with ``[DONE]``, is it a stream at all.

:class:`ServerCapabilities` is the answer; the sending processes adapt their requests
and their token counting to it, and the run directory keeps it (``capabilities.json``)
for the report's "Server capabilities" section. No Locust, no gevent: plain ``httpx``,
tested against recorded responses.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import orjson

from envelope.sse import SSEDecoder, event_data

__all__ = [
    "CAPABILITIES_FILE",
    "PROBE_HEADER",
    "EndpointCapabilities",
    "ServerCapabilities",
    "TELEMETRY_GROUPS",
    "probe_capabilities",
    "probe_endpoint",
    "read_capabilities",
    "with_local_tokenizer",
    "write_capabilities",
]

CAPABILITIES_FILE = "capabilities.json"
# marks the probe's requests: a server ignores it; the simulator keeps them out of its faults and truth
PROBE_HEADER = "x-envelope-probe"
SCHEMA_VERSION = 1

Usage = Literal["continuous", "final", "none"]
Forced = Literal["honoured", "ignored", "rejected"]
TokenSource = Literal["server", "tokenizer", "chunks"]
PromptSizing = Literal["server", "tokenizer", "estimate"]

# The extensions a vLLM workload sends that another server may refuse
FORCED_FIELDS = ("min_tokens", "ignore_eos")
# Telemetry fields (envelope.telemetry.parse_vllm_metrics) by what they let the analysis see
TELEMETRY_GROUPS: dict[str, tuple[str, ...]] = {
    "batch slots and queue (running, waiting)": ("requests_running", "requests_waiting"),
    "KV-cache usage": ("kv_cache_usage_ratio",),
    "preemptions": ("preemptions_total",),
    "token counters": ("generation_tokens_total", "prompt_tokens_total"),
    "server-side latency (queue, prefill, decode)": ("queue_s", "prefill_s", "decode_s", "ttft_s"),
    "prefix cache": ("prefix_cache_queries_total",),
}
_PROBE_TOKENS = 8
_DETAIL_CHARS = 160


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointCapabilities:
    """What one endpoint (chat or completions) did with a short streamed request sent as the workload sends it."""

    path: str  # /v1/chat/completions or /v1/completions
    streams: bool  # answered with server-sent events
    usage: Usage  # usage per chunk (continuous_usage_stats), only at the end, or never
    done_marker: bool  # the stream ended with data: [DONE]
    forced_output: Forced  # min_tokens + ignore_eos: the length asked was given / not given / the fields refused
    stream_options: bool  # stream_options accepted (False: refused, so requests go without it)
    probe_output_tokens: int | None = None  # tokens the probe's request got (asked: _PROBE_TOKENS)
    probe_prompt_tokens: int | None = None  # its prompt's tokens, as the server counted them (None: no usage)
    refused: str | None = None  # the server's answer to the fields it refused, one line

    @property
    def sends_forced_fields(self) -> bool:
        """Whether requests should carry ``min_tokens``/``ignore_eos`` (not where they are refused)."""
        return self.forced_output != "rejected"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerCapabilities:
    """The probe's answer for one server, and how this run obtains each number in its place."""

    models_listed: bool  # GET /v1/models listed the model
    tokenize: bool  # POST /tokenize answered (prompt sizing with the server's tokenizer)
    metrics: bool  # GET /metrics answered Prometheus text
    telemetry_fields: tuple[str, ...] = ()  # envelope.telemetry fields that /metrics exposes
    endpoints: tuple[EndpointCapabilities, ...] = ()
    tokenizer_path: str | None = None  # the local tokenizer used in the server's place, if any
    prompt_sizing: PromptSizing = "server"
    # how output/prompt tokens are counted where the server gives no usage (or --count-tokens tokenizer)
    token_counting: TokenSource = "server"
    problems: tuple[str, ...] = ()  # one line each; any problem means no load is sent
    probed_unix_s: float | None = None
    schema_version: int = SCHEMA_VERSION

    def endpoint(self, path: str) -> EndpointCapabilities | None:
        return next((e for e in self.endpoints if e.path == path), None)

    @property
    def probe_output_tokens(self) -> int:
        """Output tokens the probe's answered requests made the server generate, before any load (a refused
        request generates none): the server's token counter includes them, the records do not."""
        return sum(e.probe_output_tokens or 0 for e in self.endpoints)

    @property
    def probe_prompt_tokens(self) -> int:
        """Prompt tokens of the probe's answered requests, as the server counted them (0 where it did not say)."""
        return sum(e.probe_prompt_tokens or 0 for e in self.endpoints)

    @property
    def telemetry_groups(self) -> dict[str, bool]:
        """Each kind of server telemetry the analysis reads, and whether this server exposes it."""
        have = set(self.telemetry_fields)
        return {name: any(f in have for f in fields) for name, fields in TELEMETRY_GROUPS.items()}

    @property
    def gaps(self) -> tuple[str, ...]:
        """What differs from a vLLM server, one short phrase each (empty for vLLM)."""
        out = []
        if not self.models_listed:
            out.append("no model list")
        if not self.tokenize:
            out.append("no /tokenize")
        if not self.metrics:
            out.append("no /metrics")
        for e in self.endpoints:
            if e.usage != "continuous":
                out.append(f"{e.path}: usage {'only at the end' if e.usage == 'final' else 'never given'}")
            if not e.done_marker:
                out.append(f"{e.path}: no [DONE]")
            if e.forced_output != "honoured":
                out.append(f"{e.path}: fixed output length {e.forced_output}")
            if not e.stream_options:
                out.append(f"{e.path}: stream_options refused")
        return tuple(out)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["telemetry_fields"] = list(self.telemetry_fields)
        data["problems"] = list(self.problems)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ServerCapabilities":
        endpoints = tuple(EndpointCapabilities(**e) for e in data.get("endpoints") or ())
        known = {f for f in cls.__dataclass_fields__} - {"endpoints"}
        rest = {k: v for k, v in data.items() if k in known}
        for key in ("telemetry_fields", "problems"):
            rest[key] = tuple(rest.get(key) or ())
        return cls(endpoints=endpoints, **rest)


def write_capabilities(run_dir: str | os.PathLike[str], caps: ServerCapabilities) -> Path:
    """``run_dir/capabilities.json`` (written whole, then renamed into place)."""
    path = Path(run_dir) / CAPABILITIES_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(caps.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_capabilities(run_dir: str | os.PathLike[str]) -> ServerCapabilities | None:
    """The run's probed capabilities, or None (a run from before the probe, or the file is unreadable)."""
    try:
        data = json.loads((Path(run_dir) / CAPABILITIES_FILE).read_text(encoding="utf-8"))
        return ServerCapabilities.from_json(data)
    except (OSError, ValueError, TypeError):
        return None


# --------------------------------------------------------------------------- probing


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def _probe_body(path: str, model: str | None, *, forced: bool, stream_options: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"stream": True, "max_tokens": _PROBE_TOKENS, "temperature": 0}
    if model is not None:
        body["model"] = model
    if path.endswith("/chat/completions"):
        body["messages"] = [{"role": "user", "content": "Count from one to twenty."}]
    else:
        body["prompt"] = "Count from one to twenty:"
    if stream_options:
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    if forced:
        body["min_tokens"] = _PROBE_TOKENS
        body["ignore_eos"] = True
    return body


class _StreamReading:
    """What one probe stream contained (parsed in full: the probe is a handful of chunks)."""

    def __init__(self) -> None:
        self.content_chunks = 0
        self.chunks_with_usage = 0  # content chunks that carried usage
        self.completion_tokens: int | None = None
        self.prompt_tokens: int | None = None
        self.done = False
        self.finished = False
        self.malformed: str | None = None
        self.error: str | None = None

    def feed(self, data: bytes, decoder: SSEDecoder) -> None:
        for block in decoder.feed_blocks(data):
            payload = event_data(block)
            if payload:
                self._event(payload)

    def _event(self, payload: bytes) -> None:
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            self.malformed = self.malformed or _one_line(payload.decode("utf-8", "replace"))
            return
        if obj.get("error") or obj.get("object") == "error":
            self.error = self.error or _one_line(str(obj.get("error") or obj.get("message")))
            return
        usage = obj.get("usage") or {}
        choices = obj.get("choices") or ()
        content = any((c.get("delta") or {}).get("content") or c.get("text") for c in choices)
        if any(c.get("finish_reason") for c in choices):
            self.finished = True
        if content:
            self.content_chunks += 1
            if usage.get("completion_tokens") is not None:
                self.chunks_with_usage += 1
        if usage.get("completion_tokens") is not None:
            self.completion_tokens = int(usage["completion_tokens"])
        if usage.get("prompt_tokens") is not None:
            self.prompt_tokens = int(usage["prompt_tokens"])


def probe_endpoint(client: Any, path: str, model: str | None) -> tuple[EndpointCapabilities | None, str | None]:
    """Send one short streamed request to ``path`` as the workload would, then with fewer extensions
    while the server refuses them; return (what it does, None) or (None, the one-line problem)."""
    import httpx

    refused: str | None = None
    attempts = ((True, True), (False, True), (False, False))  # (forced fields, stream_options)
    for forced, stream_options in attempts:
        body = _probe_body(path, model, forced=forced, stream_options=stream_options)
        try:
            with client.stream("POST", path, json=body, headers={PROBE_HEADER: "capabilities"}) as resp:
                status = resp.status_code
                ctype = resp.headers.get("content-type", "")
                if status != 200:
                    text = _one_line(resp.read().decode("utf-8", "replace"))
                    if status in (400, 422) and (forced or stream_options):
                        refused = refused or f"HTTP {status}: {text}"
                        continue  # try again without the extensions
                    if refused is not None:
                        return None, f"POST {path} refused a plain streamed request too (HTTP {status}: {text})"
                    return None, f"POST {path} answered HTTP {status}: {text}"
                if "text/event-stream" not in ctype:
                    raw = resp.read()
                    try:
                        parsed = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        parsed = None
                    what = "one plain JSON body" if isinstance(parsed, dict) else f"content-type {ctype or 'none'}"
                    return None, (f"POST {path} answered a streaming request (stream: true) with {what}, "
                                  f"not server-sent events: Envelope cannot time its tokens; no load was sent")
                reading, decoder = _StreamReading(), SSEDecoder()
                for data in resp.iter_bytes():
                    reading.feed(data, decoder)
                for block in decoder.flush():
                    reading._event(block)
        except httpx.HTTPError as exc:
            return None, f"POST {path}: {type(exc).__name__}: {_one_line(str(exc))}"
        if reading.error or reading.malformed:
            return None, f"POST {path}: the probe's stream was not usable ({reading.error or reading.malformed})"
        if reading.content_chunks == 0:
            return None, f"POST {path}: the probe's stream carried no output token"
        if reading.completion_tokens is None:
            usage: Usage = "none"
        elif reading.chunks_with_usage == reading.content_chunks and stream_options:
            usage = "continuous"
        else:
            usage = "final"
        got = reading.completion_tokens if reading.completion_tokens is not None else reading.content_chunks
        if not forced:
            forced_output: Forced = "rejected"
        else:
            forced_output = "honoured" if got >= _PROBE_TOKENS else "ignored"
        return EndpointCapabilities(path=path, streams=True, usage=usage, done_marker=reading.done,
                                    forced_output=forced_output, stream_options=stream_options,
                                    probe_output_tokens=got, probe_prompt_tokens=reading.prompt_tokens,
                                    refused=refused), None
    raise AssertionError("unreachable: the last attempt returns")


def probe_capabilities(client: Any, *, model: str | None, paths: tuple[str, ...], models_listed: bool,
                       tokenize: bool) -> ServerCapabilities:
    """Ask ``/metrics`` and each endpoint in ``paths``; ``models_listed`` and ``tokenize`` are what the
    caller already learned (it asked ``/v1/models`` and calibrated prompts). ``client`` is an
    ``httpx.Client`` with the server as its base URL and the auth headers set."""
    import time

    import httpx

    from envelope.telemetry import parse_vllm_metrics

    metrics, fields = False, ()
    try:
        resp = client.get("/metrics")
        if resp.status_code == 200:
            parsed = parse_vllm_metrics(resp.text)
            metrics = True
            histograms = parsed.pop("histograms", None) or {}
            fields = tuple(sorted([k for k, v in parsed.items() if v is not None]
                                  + [k for k, v in histograms.items() if v is not None]))
    except (httpx.HTTPError, ValueError):
        pass
    endpoints, problems = [], []
    for path in paths:
        caps, problem = probe_endpoint(client, path, model)
        if caps is not None:
            endpoints.append(caps)
        if problem is not None:
            problems.append(problem)
    return ServerCapabilities(models_listed=models_listed, tokenize=tokenize, metrics=metrics,
                              telemetry_fields=fields, endpoints=tuple(endpoints), problems=tuple(problems),
                              prompt_sizing="server" if tokenize else "estimate", probed_unix_s=time.time())


def with_local_tokenizer(caps: ServerCapabilities, tokenizer_path: str | None, *,
                         count_with_tokenizer: bool = False) -> ServerCapabilities:
    """``caps`` with how this run fills the gaps: the local tokenizer (when there is one) sizes prompts
    where the server has no ``/tokenize`` and counts tokens where it gives no usage (or always, with
    ``count_with_tokenizer``); without one, token counts are the number of token chunks (an estimate)."""
    no_usage = any(e.usage == "none" for e in caps.endpoints)
    counting: TokenSource = "server"
    if count_with_tokenizer or no_usage:
        counting = "tokenizer" if tokenizer_path else "chunks"
    sizing: PromptSizing = "server" if caps.tokenize else ("tokenizer" if tokenizer_path else "estimate")
    used = tokenizer_path if (counting == "tokenizer" or sizing == "tokenizer") else None
    return replace(caps, tokenizer_path=used, token_counting=counting, prompt_sizing=sizing)

