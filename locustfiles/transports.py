"""The two ways a user sends one streamed request: geventhttpclient (FastHttpUser's pool) or the openai SDK.

Both feed an :class:`envelope.stream.StreamObserver` with what arrives and
when, and return an :class:`Outcome`; neither computes a metric. Locust's
gevent has already patched the standard library when this module runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import gevent
import orjson
from geventhttpclient import URL

from envelope.records import ErrorCategory
from envelope.stream import StreamObserver
from locustfiles.errors import category_for_exception

__all__ = ["JUST_CHECKED", "Outcome", "RequestSpec", "openai_client", "stream_fasthttp", "stream_openai"]

perf_counter = time.perf_counter
# The pool attribute naming the connection whose liveness was settled a moment ago, for the pool's
# very next check only (_connect_ahead sets it; the check in patches.py takes it).
JUST_CHECKED = "_envelope_just_checked"
_yield = gevent.sleep  # gevent.sleep() with no delay: a turn for every other ready greenlet


@dataclass(slots=True)
class RequestSpec:
    """One request to send: endpoint path, JSON body, headers, and the three timeouts."""

    path: str
    body: dict
    headers: dict
    connect_timeout_s: float
    first_token_timeout_s: float
    total_timeout_s: float


@dataclass(slots=True)
class Outcome:
    """How the request ended, beyond what the observer saw in the stream."""

    http_status: int | None = None
    error_category: str | None = None
    error_detail: str | None = None
    t_first_byte_s: float | None = None


class _RequestTimeout(Exception):
    """Raised into the request's greenlet by a ``gevent.Timeout``; carries its record category."""

    def __init__(self, category: str, detail: str) -> None:
        super().__init__(detail)
        self.category = category
        self.detail = detail


_URLS: dict[tuple[str, str], URL] = {}


def _url(base_url: str, path: str) -> URL:
    """The parsed URL of ``base_url`` + ``path``, parsed once (a user sends thousands of requests)."""
    url = _URLS.get((base_url, path))
    if url is None:
        if len(_URLS) > 64:
            _URLS.clear()
        url = _URLS[(base_url, path)] = URL(base_url.rstrip("/") + path)
    return url


def _timers(spec: RequestSpec) -> tuple[gevent.Timeout, gevent.Timeout]:
    """The first-token and total timers of one request (not started)."""
    first = _RequestTimeout(ErrorCategory.TIMEOUT_FIRST_TOKEN, f"no token within {spec.first_token_timeout_s:g} s")
    total = _RequestTimeout(ErrorCategory.TIMEOUT_TOTAL, f"not finished within {spec.total_timeout_s:g} s")
    return gevent.Timeout(spec.first_token_timeout_s, first), gevent.Timeout(spec.total_timeout_s, total)


def _error_body_detail(body: bytes) -> str:
    """The server's error message from a JSON error body, short."""
    try:
        data = orjson.loads(body)
        err = data.get("error", data) if isinstance(data, dict) else data
        msg = err.get("message") if isinstance(err, dict) else None
        text = str(msg if msg else data)
    except (orjson.JSONDecodeError, AttributeError):
        text = body[:200].decode("utf-8", "replace")
    return text[:200]


# Bytes asked of each recv. Larger reads cost less per chunk when data piles up; how long one
# stream may keep the process before others get a turn is bounded by the yield in stream_fasthttp.
_RECV_BYTES = 16384


class _BodyReader:
    """Reads a streamed body one ``recv`` at a time (see :meth:`read`)."""

    __slots__ = ("resp", "recv_bytes", "backlog", "drained", "_wait")

    def __init__(self, resp, recv_bytes: int | None = None) -> None:
        self.resp = resp
        self.recv_bytes = recv_bytes or _RECV_BYTES
        self.backlog = False  # the last recv filled its buffer: more is probably waiting
        self.drained = False  # the last recv emptied the socket
        # gevent's wait for readability, when the socket is a gevent socket
        self._wait = getattr(resp._sock, "_wait", None)

    def read(self) -> bytes:
        """Whatever body bytes one ``recv`` delivers (b"" at the end of the message).

        geventhttpclient's ``read(n)`` waits until n bytes have accumulated, which
        would bunch chunk arrivals together and corrupt inter-token latency; this
        returns as soon as any body bytes are parsed.
        """
        resp = self.resp
        buf = resp._body_buffer
        while True:
            if buf:
                data = bytes(buf)
                del buf[:]
                return data
            sock = resp._sock
            if resp.message_complete or sock is None:
                return b""
            if self.drained and self._wait is not None:
                # The last recv emptied the socket, so a recv now would almost surely fail (an
                # EAGAIN, an exception in gevent, then the same wait): wait for data first.
                self._wait(sock._read_event)
            data = sock.recv(self.recv_bytes)
            if not data:
                if _close_delimited(resp):
                    return b""  # a body without length or chunking ends when the server closes
                raise ConnectionResetError("connection closed by the server mid-stream")
            self.backlog = backlog = len(data) == self.recv_bytes
            self.drained = not backlog
            resp.feed(data)


def _read_some(resp, recv_bytes: int | None = None) -> bytes:
    """One :meth:`_BodyReader.read` of ``resp``."""
    return _BodyReader(resp, recv_bytes).read()


def _close_delimited(resp) -> bool:
    """Whether the body's end is the connection's end (no Content-Length, not chunked)."""
    return resp.get("content-length") is None and "chunked" not in str(resp.get("transfer-encoding", "")).lower()


def _connect_ahead(client) -> None:
    """Have ``client`` hold a live idle connection now (opening one if it has none).

    ``HTTPClient.request`` takes an idle connection from its pool, or opens one:
    resolving the host (in a thread) and connecting yield to the hub, and other
    greenlets run meanwhile. Done here, before the start stamp, the request then
    finds this connection on top of its pool (a LIFO queue; no other greenlet
    runs in between) and goes from the stamp to the socket without a yield.

    The pool checks an idle connection before handing it out (a stale keep-alive
    connection is replaced, as every client does); the request's own take is told
    that this one was settled just now (:data:`JUST_CHECKED`, read in ``patches.py``) and does not ask
    again. A connection opened here goes to the request unchecked, as one opened
    inside ``request`` would: a server that resets it at accept fails this request
    (``connection_closed``) instead of being replaced by a silent reconnect.
    """
    cp = getattr(client, "_connection_pool", None)
    if cp is None or not hasattr(cp, "get_socket"):
        return
    sock = cp.get_socket()
    cp.return_socket(sock)
    setattr(cp, JUST_CHECKED, sock)


def stream_fasthttp(pool, base_url: str, spec: RequestSpec, obs: StreamObserver) -> Outcome:
    """POST ``spec`` through geventhttpclient's pool and feed the body to ``obs`` as it arrives.

    The start stamp (:meth:`StreamObserver.sent`) is taken once the body is
    serialised and a connection is open: from it to the bytes handed to the
    socket only the request head is formatted, with no turn for other greenlets
    (a connection's setup is the client's, and in open loop it shows as send lag).
    """
    out = Outcome()
    url = _url(base_url, spec.path)
    payload = orjson.dumps(spec.body)
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **spec.headers}
    first_token, total = _timers(spec)
    resp = None
    total.start()
    first_token.start()
    try:
        client = pool.get_client(url)
        _connect_ahead(client)
        obs.sent(perf_counter())
        resp = client.request("POST", url.request_uri, body=payload, headers=headers)
        out.t_first_byte_s = perf_counter()
        out.http_status = status = resp.status_code
        if status != 200:
            body = resp.read()
            out.error_category = ErrorCategory.for_status(status)
            out.error_detail = _error_body_detail(body)
            return out
        on_bytes = obs.on_bytes
        reader = _BodyReader(resp)
        read = reader.read
        # The first-token and total timers bound this request; the socket's own timeout (a
        # backstop) would add a timer start and stop to every recv that waits.
        sock = resp._sock
        network_timeout = sock.timeout if sock is not None else None
        if sock is not None:
            sock.settimeout(None)
        try:
            before_first_token = True
            while True:
                data = read()
                if not data:
                    break
                now = perf_counter()
                on_bytes(data, now)
                if before_first_token and obs.t_first_token_s is not None:
                    first_token.cancel()
                    before_first_token = False
                if reader.backlog:
                    # A gevent socket's recv returns at once while data is waiting, without
                    # passing through the hub: a stream with a backlog would keep the process to
                    # itself until it is drained, while every other stream's chunks wait unread
                    # (and are timestamped late). Let the others have their turn first.
                    reader.backlog = False
                    _yield()
        finally:
            if sock is not None:
                sock.settimeout(network_timeout)  # the socket goes back to the pool
    except _RequestTimeout as timeout:
        out.error_category, out.error_detail = timeout.category, timeout.detail
    except Exception as exc:  # noqa: BLE001 - every failure becomes a categorised record
        out.error_category = category_for_exception(exc)
        if out.error_category == ErrorCategory.TIMEOUT_TOTAL and out.t_first_byte_s is None:
            out.error_category = ErrorCategory.TIMEOUT_CONNECT
        if out.error_category == ErrorCategory.CONNECTION_RESET and out.t_first_byte_s is None:
            # the request went out but the server closed the connection without answering (for
            # example uvicorn's keep-alive timer firing on a reused connection under overload)
            out.error_category = ErrorCategory.CONNECTION_CLOSED
        out.error_detail = f"{type(exc).__name__}: {str(exc)[:160]}"
    finally:
        first_token.close()
        total.close()
        if resp is not None:
            resp.release()
    return out


class _DoneWatch:
    """Stands in for an ``openai.Stream``'s SSE decoder and notes whether ``[DONE]`` passed through it."""

    __slots__ = ("_decoder", "done")

    def __init__(self, decoder) -> None:
        self._decoder = decoder
        self.done = False

    @classmethod
    def install(cls, stream) -> "_DoneWatch | None":
        """Watch ``stream``'s decoder (the SDK reads ``stream._decoder`` when iteration starts), if it has one."""
        decoder = getattr(stream, "_decoder", None)
        if decoder is None or not callable(getattr(decoder, "iter_bytes", None)):
            return None
        watch = stream._decoder = cls(decoder)
        return watch

    def iter_bytes(self, iterator):
        for sse in self._decoder.iter_bytes(iterator):
            if sse.data.startswith("[DONE]"):  # the SDK's own test
                self.done = True
            yield sse

    def __getattr__(self, name: str):
        return getattr(self._decoder, name)


def preload_openai() -> None:
    """Import the ``openai`` SDK now, before the load: 1.7 s of CPU on a slow 2-core box. Imported on its
    first request instead, in the gevent loop, it stalls every request then in flight (a client mix whose
    openai users start while fasthttp users stream), and they measure the stall as server latency."""
    import openai  # noqa: F401


def openai_client(base_url: str, api_key: str, connect_timeout_s: float, max_connections: int | None = None):
    """An ``openai.OpenAI`` client for ``base_url`` (the server root): no retries, no read timeout (our
    own timers keep time), ``connect_timeout_s`` to connect, and ``max_connections`` if given.

    The timeout and the connection pool are built with the SDK's own types, never ``httpx``'s by name:
    from openai 3.6x the SDK runs on ``httpx2`` and refuses an ``httpx.Timeout`` with a TypeError when
    the client is made."""
    import openai

    extra = {}
    if max_connections is not None:
        limits_type = type(openai.DEFAULT_CONNECTION_LIMITS)  # httpx.Limits or httpx2.Limits
        limits = limits_type(max_connections=max_connections, max_keepalive_connections=max_connections)
        extra["http_client"] = openai.DefaultHttpxClient(limits=limits)
    return openai.OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=api_key, max_retries=0,
                         timeout=openai.Timeout(None, connect=connect_timeout_s), **extra)


def stream_openai(client, spec: RequestSpec, obs: StreamObserver) -> Outcome:
    """Send ``spec`` with the official ``openai`` SDK (what applications use) and feed parsed chunks to ``obs``."""
    import openai  # imported here: the SDK is heavy and only this transport needs it (preload_openai)

    out = Outcome()
    body = dict(spec.body)
    body.pop("stream", None)
    extra = {k: body.pop(k) for k in ("min_tokens", "ignore_eos") if k in body}
    first_token, total = _timers(spec)
    stream = None
    total.start()
    first_token.start()
    try:
        if spec.path.endswith("/chat/completions"):
            stream = client.chat.completions.create(stream=True, extra_body=extra or None, **body)
        else:
            stream = client.completions.create(stream=True, extra_body=extra or None, **body)
        out.t_first_byte_s = perf_counter()
        out.http_status = 200
        # The SDK ends its iterator at [DONE] and at a stream cut alike, and drops [DONE]: watch its
        # SSE decoder to tell the two apart. Should a later SDK have no such decoder, a stream that
        # ended before any finish_reason is taken as cut (one cut after it passes unseen).
        done_watch = _DoneWatch.install(stream)
        finished = False
        on_event = obs.on_event
        for chunk in stream:
            now = perf_counter()
            data = chunk.model_dump(exclude_unset=True)
            on_event(data, now)
            if first_token.pending and obs.t_first_token_s is not None:
                first_token.cancel()
            if done_watch is None and not finished:
                finished = any(c.get("finish_reason") for c in data.get("choices") or ())
        if done_watch.done if done_watch is not None else finished:
            obs.on_event(b"[DONE]", perf_counter())
        elif done_watch is None:
            out.error_category = ErrorCategory.INCOMPLETE_STREAM
            out.error_detail = "stream ended without a finish_reason"
        # else the observer, never given [DONE], records incomplete_stream itself
    except _RequestTimeout as timeout:
        out.error_category, out.error_detail = timeout.category, timeout.detail
    except openai.APIStatusError as exc:
        out.http_status = exc.status_code
        out.error_category = ErrorCategory.for_status(exc.status_code)
        out.error_detail = str(exc.message)[:200]
    except openai.APITimeoutError as exc:
        out.error_category = ErrorCategory.TIMEOUT_CONNECT if out.t_first_byte_s is None else ErrorCategory.TIMEOUT_TOTAL
        out.error_detail = f"{type(exc).__name__}: {str(exc)[:160]}"
    except openai.APIConnectionError as exc:
        out.error_category = category_for_exception(exc)
        if out.error_category == ErrorCategory.CONNECTION_RESET and out.t_first_byte_s is None:
            out.error_category = ErrorCategory.CONNECTION_CLOSED
        out.error_detail = f"{type(exc).__name__}: {str(exc)[:160]}"
    except openai.APIError as exc:
        # the SDK raises this for an error event inside a 200 stream
        out.error_category = ErrorCategory.STREAM_ERROR_EVENT
        out.error_detail = str(exc.message)[:200]
    except Exception as exc:  # noqa: BLE001
        out.error_category = category_for_exception(exc)
        out.error_detail = f"{type(exc).__name__}: {str(exc)[:160]}"
    finally:
        first_token.close()
        total.close()
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - closing a broken stream must not mask the outcome
                pass
    return out
