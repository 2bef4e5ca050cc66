"""A minimal HTTP/1.1 server connection on ``asyncio.Protocol`` and ``httptools``.

Keep-alive, chunked streaming responses (one HTTP chunk per SSE event, like
uvicorn) and sequential handling of pipelined requests. It knows nothing about
completions: each parsed request goes to ``handler(conn, request)``, which
answers with :meth:`Connection.send`, or with :meth:`Connection.start_stream`,
:meth:`Connection.write` and :meth:`Connection.end_stream`.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from http import HTTPStatus
from typing import Callable
from urllib.parse import parse_qs

import httptools

__all__ = ["Connection", "HttpRequest", "frame_chunk"]

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_SERVER = b"server: envelope-sim\r\n"


def frame_chunk(data: bytes) -> bytes:
    """``data`` as one HTTP/1.1 chunk."""
    return b"%x\r\n%b\r\n" % (len(data), data)


class HttpRequest:
    """One parsed request; header names are lower-case ``str``."""

    __slots__ = ("method", "path", "query", "headers", "body", "keep_alive", "t_arrival_s")

    def __init__(self, method: str, url: bytes, headers: dict[str, str], body: bytes, keep_alive: bool) -> None:
        self.method = method
        parsed = httptools.parse_url(url)
        self.path = parsed.path.decode("latin-1")
        self.query = {k: v[-1] for k, v in parse_qs((parsed.query or b"").decode("latin-1")).items()}
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.t_arrival_s = time.perf_counter()  # request fully received


class Connection(asyncio.Protocol):
    """One client connection; requests are answered one at a time, in order."""

    def __init__(self, handler: Callable[["Connection", HttpRequest], None],
                 on_accept: Callable[["Connection"], bool] | None = None,
                 registry: set | None = None) -> None:
        self._handler = handler
        self._on_accept = on_accept
        self._registry = registry
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._busy = False
        self._keep_alive = True
        self._pending: deque[HttpRequest] = deque()
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._header_name = b""
        self.on_close: Callable[[], None] | None = None  # set by a streaming handler

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if self._registry is not None:
            self._registry.add(self)
        if self._on_accept is not None and not self._on_accept(self):
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._registry is not None:
            self._registry.discard(self)
        cb, self.on_close = self.on_close, None
        if cb is not None:
            cb()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.send(400, b'{"detail":"upgrade not supported"}', keep_alive=False)
        except httptools.HttpParserError:
            self.send(400, b'{"detail":"bad request"}', keep_alive=False)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        req = HttpRequest(self._parser.get_method().decode(), self._url, self._headers, b"".join(self._body),
                          self._parser.should_keep_alive())
        if self._busy:
            self._pending.append(req)
        else:
            self._dispatch(req)

    # responses
    def _dispatch(self, req: HttpRequest) -> None:
        self._busy = True
        self._keep_alive = req.keep_alive
        self._handler(self, req)

    def _head(self, status: int, headers: tuple[tuple[bytes, bytes], ...], keep_alive: bool) -> list[bytes]:
        out = [b"HTTP/1.1 %d %b\r\n" % (status, _REASONS.get(status, b"Unknown")), _SERVER]
        for name, value in headers:
            out.append(b"%b: %b\r\n" % (name, value))
        if not keep_alive:
            out.append(b"connection: close\r\n")
        return out

    def send(self, status: int, body: bytes, *, content_type: bytes = b"application/json",
             headers: tuple[tuple[bytes, bytes], ...] = (), keep_alive: bool | None = None) -> None:
        """A complete response with a ``content-length`` body."""
        if keep_alive is False:
            self._keep_alive = False
        if self.closed:
            return
        out = self._head(status, headers, self._keep_alive)
        out.append(b"content-type: %b\r\ncontent-length: %d\r\n\r\n" % (content_type, len(body)))
        out.append(body)
        self.transport.write(b"".join(out))  # type: ignore[union-attr]
        self._response_done()

    def start_stream(self, status: int = 200, *, content_type: bytes = b"text/event-stream; charset=utf-8",
                     headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """Send the head of a chunked response."""
        if self.closed:
            return
        out = self._head(status, headers, self._keep_alive)
        out.append(b"content-type: %b\r\ntransfer-encoding: chunked\r\n\r\n" % content_type)
        self.transport.write(b"".join(out))  # type: ignore[union-attr]

    def write(self, data: bytes) -> None:
        """Write already-framed bytes (see :func:`frame_chunk`)."""
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def end_stream(self, data: bytes = b"") -> None:
        """Write ``data`` (framed chunks) and the terminating zero-length chunk."""
        self.on_close = None
        if not self.closed:
            self.transport.write(data + b"0\r\n\r\n")  # type: ignore[union-attr]
        self._response_done()

    def abort(self) -> None:
        """Drop the connection at once (the peer sees a reset)."""
        self._pending.clear()
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def _response_done(self) -> None:
        self._busy = False
        if not self._keep_alive:
            self.close()
            return
        if self._pending and not self.closed:
            self._dispatch(self._pending.popleft())
