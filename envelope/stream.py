"""The stream observer: turns one streamed response into request-record fields.

One :class:`StreamObserver` per request. The client feeds it either raw body
bytes (:meth:`StreamObserver.on_bytes`) or already-split events
(:meth:`StreamObserver.on_event`, raw JSON or a parsed dict); both give the same
result for the same stream. It only records timestamps and server counts;
durations are computed later by :mod:`envelope.metrics`.
"""

from __future__ import annotations

import http.client
import socket
from typing import Any, Mapping

import orjson

from envelope.records import ErrorCategory
from envelope.sse import SSEDecoder

__all__ = ["StreamObserver", "category_for_exception"]

_DONE = b"[DONE]"
_ERROR_DETAIL_MAX_CHARS = 200


class StreamObserver:
    """Observe one streamed completion and produce the fields of its record.

    ``t_start_s`` is the ``time.perf_counter()`` reading taken just before the
    request was sent; every ``now_s`` passed in must come from the same clock.

    A *content chunk* is an event whose choices carry non-empty ``delta.content``
    (chat), ``text`` (completions), or ``delta.reasoning_content`` /
    ``delta.reasoning`` (reasoning models). ``output_tokens_client_estimate`` is
    the number of content chunks: vLLM streams one token per chunk in most cases,
    so this is only an estimate; the server's ``usage.completion_tokens`` is used
    whenever it was reported.

    With ``keep_text`` the chat content / completion text (not reasoning) is
    accumulated for the opt-in ``completion_text`` field (see :attr:`text`).
    """

    __slots__ = (
        "t_start_s",
        "keep_text",
        "_decoder",
        "_last_bytes_s",
        "_t_first_event_s",
        "_t_first_token_s",
        "_t_end_s",
        "_offsets",
        "_tokens",
        "_tokens_known",
        "_content_tokens_seen",
        "_prompt_tokens",
        "_completion_tokens",
        "_done",
        "_error_category",
        "_error_detail",
        "_text",
    )

    def __init__(self, t_start_s: float, *, keep_text: bool = False) -> None:
        self.t_start_s = t_start_s
        self.keep_text = keep_text
        self._decoder: SSEDecoder | None = None
        self._last_bytes_s: float | None = None
        self._t_first_event_s: float | None = None
        self._t_first_token_s: float | None = None
        self._t_end_s: float | None = None
        self._offsets: list[float] = []
        self._tokens: list[int] = []
        self._tokens_known = True  # every content chunk so far carried usage
        # completion_tokens at the previous content chunk (0 before the first)
        self._content_tokens_seen = 0
        self._prompt_tokens: int | None = None
        self._completion_tokens: int | None = None
        self._done = False
        self._error_category: str | None = None
        self._error_detail: str | None = None
        self._text: list[str] = []

    # -- feeding ---------------------------------------------------------------

    def on_bytes(self, data: bytes, now_s: float) -> None:
        """Feed raw response-body bytes as read from the socket at ``now_s``."""
        decoder = self._decoder
        if decoder is None:
            decoder = self._decoder = SSEDecoder()
        self._last_bytes_s = now_s
        for payload in decoder.feed(data):
            self._on_payload(payload, now_s)

    def on_event(self, payload: bytes | str | Mapping[str, Any], now_s: float) -> None:
        """Feed one already-split event: its ``data`` as bytes/str, or a parsed dict."""
        if isinstance(payload, Mapping):
            if self._t_first_event_s is None:
                self._t_first_event_s = now_s
            self._on_object(payload, now_s)
        else:
            if isinstance(payload, str):
                payload = payload.encode()
            self._on_payload(payload.strip(), now_s)

    def _on_payload(self, payload: bytes, now_s: float) -> None:
        if self._t_first_event_s is None:
            self._t_first_event_s = now_s
        if payload == _DONE:
            self._done = True
            return
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            if self._error_category is None:
                self._error_category = ErrorCategory.MALFORMED_SSE
                self._error_detail = _short(bytes(payload).decode("utf-8", "replace"))
            return
        self._on_object(obj, now_s)

    def _on_object(self, obj: Mapping[str, Any], now_s: float) -> None:
        error = obj.get("error")
        if error or obj.get("object") == "error":
            if self._error_category is None:
                if isinstance(error, Mapping):
                    message = error.get("message") or str(error)
                elif error:
                    message = str(error)
                else:
                    message = obj.get("message") or "error event"
                self._error_category = ErrorCategory.STREAM_ERROR_EVENT
                self._error_detail = _short(str(message))
            return

        usage = obj.get("usage")
        completion_tokens = None
        if usage:
            prompt = usage.get("prompt_tokens")
            if prompt is not None:
                self._prompt_tokens = prompt
            completion_tokens = usage.get("completion_tokens")
            if completion_tokens is not None:
                self._completion_tokens = completion_tokens

        choices = obj.get("choices")
        if not choices:
            return
        content = False
        for choice in choices:
            delta = choice.get("delta")
            if delta:
                piece = delta.get("content")
                if piece:
                    content = True
                    if self.keep_text:
                        self._text.append(piece)
                elif delta.get("reasoning_content") or delta.get("reasoning"):
                    content = True
            piece = choice.get("text")
            if piece:
                content = True
                if self.keep_text:
                    self._text.append(piece)
        if not content:
            return

        if self._t_first_token_s is None:
            self._t_first_token_s = now_s
        self._t_end_s = now_s
        self._offsets.append(now_s - self.t_start_s)
        if completion_tokens is None:
            self._tokens_known = False
        else:
            # Tokens since the previous content chunk: a chunk with no text but new
            # tokens (held-back partial characters) belongs to the next content chunk.
            self._tokens.append(completion_tokens - self._content_tokens_seen)
            self._content_tokens_seen = completion_tokens

    # -- results ---------------------------------------------------------------

    @property
    def usage_seen(self) -> bool:
        """Whether the server reported ``usage.completion_tokens`` at least once."""
        return self._completion_tokens is not None

    @property
    def t_first_token_s(self) -> float | None:
        """When the first content chunk arrived (None until it has)."""
        return self._t_first_token_s

    @property
    def done(self) -> bool:
        """Whether ``[DONE]`` was received."""
        return self._done

    @property
    def text(self) -> str | None:
        """The accumulated completion text when ``keep_text``, else None."""
        return "".join(self._text) if self.keep_text else None

    def finish(
        self,
        now_s: float,
        *,
        error_category: str | None = None,
        error_detail: str | None = None,
        http_status: int | None = None,
    ) -> dict[str, Any]:
        """End the observation at ``now_s``; return the record fields observed.

        An explicit ``error_category`` wins over errors seen in the stream; else
        the first observed error wins; else a stream without ``[DONE]`` is
        ``incomplete_stream``. Missing usage is not an error: ``output_tokens``
        then falls back to the client estimate with ``output_tokens_estimated``.
        """
        if self._decoder is not None:
            # A last event without a trailing blank line arrived with the last bytes.
            t_last = self._last_bytes_s if self._last_bytes_s is not None else now_s
            for payload in self._decoder.flush():
                self._on_payload(payload, t_last)

        if error_category is None:
            error_category, error_detail = self._error_category, self._error_detail
            if error_category is None and not self._done:
                error_category = ErrorCategory.INCOMPLETE_STREAM
                error_detail = "stream ended without [DONE]"

        n_content = len(self._offsets)
        chunk_tokens = None
        if self._tokens_known and n_content and len(self._tokens) == n_content:
            chunk_tokens = tuple(self._tokens)
        if self._completion_tokens is not None:
            output_tokens, estimated = self._completion_tokens, False
        else:
            output_tokens, estimated = n_content, True

        fields: dict[str, Any] = {
            "t_first_event_s": self._t_first_event_s,
            "t_first_token_s": self._t_first_token_s,
            "t_end_s": self._t_end_s,
            "t_done_s": now_s,
            "chunk_offsets_s": tuple(self._offsets),
            "chunk_tokens": chunk_tokens,
            "prompt_tokens": self._prompt_tokens,
            "output_tokens": output_tokens,
            "output_tokens_estimated": estimated,
            "output_tokens_client_estimate": n_content,
            "error_category": error_category,
            "error_detail": error_detail,
            "http_status": http_status,
        }
        if self.keep_text:
            fields["completion_text"] = "".join(self._text)
        return fields

    def __repr__(self) -> str:
        return (
            f"StreamObserver(t_start_s={self.t_start_s!r}, content_chunks={len(self._offsets)},"
            f" done={self._done}, error_category={self._error_category!r})"
        )


def _short(text: str) -> str:
    return text if len(text) <= _ERROR_DETAIL_MAX_CHARS else text[: _ERROR_DETAIL_MAX_CHARS - 3] + "..."


# Exception class names from clients we do not import (gevent, geventhttpclient,
# httpx, openai, requests), matched anywhere in the exception's class hierarchy.
# Order matters: openai's APITimeoutError subclasses APIConnectionError.
_NAME_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("ConnectTimeout", ErrorCategory.TIMEOUT_CONNECT),
    ("Timeout", ErrorCategory.TIMEOUT_TOTAL),  # gevent.timeout.Timeout
    ("ReadTimeout", ErrorCategory.TIMEOUT_TOTAL),
    ("TimeoutException", ErrorCategory.TIMEOUT_TOTAL),
    ("APITimeoutError", ErrorCategory.TIMEOUT_TOTAL),
    ("ConnectError", ErrorCategory.CONNECT_ERROR),
    ("IncompleteRead", ErrorCategory.CONNECTION_RESET),
    ("HTTPConnectionClosed", ErrorCategory.CONNECTION_RESET),
    ("RemoteProtocolError", ErrorCategory.CONNECTION_RESET),
    ("ChunkedEncodingError", ErrorCategory.CONNECTION_RESET),
    ("ReadError", ErrorCategory.CONNECTION_RESET),
)
# Wrappers whose cause, when known, is the better answer.
_WRAPPER_CATEGORIES: tuple[tuple[str, str], ...] = (("APIConnectionError", ErrorCategory.CONNECT_ERROR),)


def category_for_exception(exc: BaseException) -> str:
    """The :class:`~envelope.records.ErrorCategory` for an exception a client raised.

    Timeouts map to ``timeout_total`` (``timeout_connect`` for an explicit connect
    timeout); a caller that knows which deadline expired overrides it. Wrapped
    exceptions (``raise ... from``, geventhttpclient's ``original``) are looked
    through. Anything unrecognised is ``client_error``.
    """
    chain = _exception_chain(exc)
    for current in chain:
        category = _category_of(current)
        if category is not None:
            return category
    for current in chain:
        names = {cls.__name__ for cls in type(current).__mro__}
        for name, category in _WRAPPER_CATEGORIES:
            if name in names:
                return category
    return ErrorCategory.CLIENT_ERROR


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 8 and current not in chain:
        chain.append(current)
        original = getattr(current, "original", None)
        if isinstance(original, BaseException):
            current = original
        else:
            current = current.__cause__
    return chain


def _category_of(exc: BaseException) -> str | None:
    if isinstance(exc, (ConnectionRefusedError, socket.gaierror)):
        return ErrorCategory.CONNECT_ERROR
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, http.client.IncompleteRead)):
        return ErrorCategory.CONNECTION_RESET
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError
        return ErrorCategory.TIMEOUT_TOTAL
    names = {cls.__name__ for cls in type(exc).__mro__}
    for name, category in _NAME_CATEGORIES:
        if name in names:
            return category
    return None
