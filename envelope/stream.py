"""The stream observer: turns one streamed response into request-record fields.

One :class:`StreamObserver` per request. The client feeds it either raw body
bytes (:meth:`StreamObserver.on_bytes`) or already-split events
(:meth:`StreamObserver.on_event`, raw JSON or a parsed dict); both give the same
result for the same stream. It only records timestamps and server counts;
durations are computed later by :mod:`envelope.metrics`.
"""

from __future__ import annotations

import http.client
import re
import socket
from typing import Any, Mapping, NamedTuple

import orjson

from envelope.records import ErrorCategory
from envelope.sse import SSEDecoder, event_data

__all__ = ["StreamObserver", "ChunkLayout", "ChunkSummary", "summarize_chunk", "category_for_exception"]

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

    Raw bytes take a fast path: a stream's ordinary content chunks are
    byte-identical except for the text and the token counts, so after one chunk
    was parsed in full, later ones are matched against its layout (see
    :class:`ChunkLayout`) instead of being parsed; anything that does not match
    exactly is parsed in full. Both paths give the same record; ``fast=False``
    parses every event in full (the reference the fast path is tested against).
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
        "_layout",
        "_layout_tries",
        "_layout_misses",
    )

    def __init__(self, t_start_s: float, *, keep_text: bool = False, fast: bool = True) -> None:
        self.t_start_s = t_start_s
        self.keep_text = keep_text
        self._decoder: SSEDecoder | None = None
        self._last_bytes_s: float | None = None
        self._t_first_event_s: float | None = None
        self._t_first_token_s: float | None = None
        self._t_end_s: float | None = None
        self._offsets: list[float] = []
        self._tokens: list[int] = []  # tokens each content chunk carried (from usage)
        self._tokens_known = True  # every content chunk so far carried usage
        # completion_tokens at the previous content chunk (0 before the first)
        self._content_tokens_seen = 0
        self._prompt_tokens: int | None = None
        self._completion_tokens: int | None = None
        self._done = False
        self._error_category: str | None = None
        self._error_detail: str | None = None
        self._text: list[str] = []
        self._layout: ChunkLayout | None = None
        self._layout_tries = _LAYOUT_TRIES if fast else 0  # layouts this stream may still learn
        self._layout_misses = 0  # content chunks in a row that did not match the layout

    # -- feeding ---------------------------------------------------------------

    def on_bytes(self, data: bytes, now_s: float) -> None:
        """Feed raw response-body bytes as read from the socket at ``now_s``."""
        decoder = self._decoder
        if decoder is None:
            decoder = self._decoder = SSEDecoder()
        self._last_bytes_s = now_s
        layout = self._layout
        for block in decoder.feed_blocks(data):
            if layout is not None and block.startswith(layout.head):
                m = layout.tail_match(block, layout.head_len) or layout.match_unicode(block)
                if m is not None:
                    # Exactly what _on_payload would do with this chunk (ChunkLayout.learn proved the
                    # meaning); the first event and first token came with the chunk it was learned from.
                    self._t_end_s = now_s
                    self._offsets.append(now_s - self.t_start_s)
                    if layout.prompt_group:
                        self._prompt_tokens = int(m[layout.prompt_group])
                    if layout.completion_group:
                        self._completion_tokens = tokens = int(m[layout.completion_group])
                        if self._tokens_known:
                            self._tokens.append(tokens - self._content_tokens_seen)
                            self._content_tokens_seen = tokens
                    else:
                        self._tokens_known = False
                    if self.keep_text and layout.keeps_text:
                        self._text.append(m[1].decode())
                    self._layout_misses = 0
                    continue
            payload = event_data(block)
            if payload:
                self._on_payload(payload, now_s)
                layout = self._layout

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
        summary = self._on_object(obj, now_s)
        if summary is not None and summary.content and self._layout_tries:
            # A content chunk the layout (if any) did not match. Learn one from it when there is
            # none, or when two chunks in a row missed (the stream's shape changed); a chunk that
            # is merely unusual (the last one, with finish_reason) keeps the current layout.
            self._layout_misses += 1
            if self._layout is None or self._layout_misses >= 2:
                self._layout_tries -= 1
                layout = ChunkLayout.learn(payload, obj, summary)
                if layout is not None:
                    self._layout, self._layout_misses = layout, 0

    def _on_object(self, obj: Mapping[str, Any], now_s: float) -> ChunkSummary | None:
        summary = summarize_chunk(obj)
        if summary.error is not None:
            if self._error_category is None:
                self._error_category = ErrorCategory.STREAM_ERROR_EVENT
                self._error_detail = _short(summary.error)
            return None
        if summary.prompt_tokens is not None:
            self._prompt_tokens = summary.prompt_tokens
        completion_tokens = summary.completion_tokens
        if completion_tokens is not None:
            self._completion_tokens = completion_tokens
        if not summary.content:
            return summary
        if self.keep_text:
            self._text.extend(summary.pieces)
        if self._t_first_token_s is None:
            self._t_first_token_s = now_s
        self._t_end_s = now_s
        self._offsets.append(now_s - self.t_start_s)
        if completion_tokens is None:
            self._tokens_known = False
        elif self._tokens_known:
            # Tokens since the previous content chunk: a chunk with no text but new tokens
            # (held-back partial characters) belongs to the next content chunk.
            self._tokens.append(completion_tokens - self._content_tokens_seen)
            self._content_tokens_seen = completion_tokens
        return summary

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


class ChunkSummary(NamedTuple):
    """What one parsed event means to the observer (see :func:`summarize_chunk`)."""

    error: str | None  # the message of an error event, else None
    prompt_tokens: Any  # usage.prompt_tokens when reported, else None
    completion_tokens: Any  # usage.completion_tokens when reported, else None
    content: bool  # a content chunk (text, completion text or reasoning)
    pieces: tuple[str, ...]  # the content / completion text it carries (not reasoning)


def summarize_chunk(obj: Mapping[str, Any]) -> ChunkSummary:
    """The observer's reading of one parsed event: an error, its usage, whether it carries content."""
    error = obj.get("error")
    if error or obj.get("object") == "error":
        if isinstance(error, Mapping):
            message = error.get("message") or str(error)
        elif error:
            message = str(error)
        else:
            message = obj.get("message") or "error event"
        return ChunkSummary(str(message), None, None, False, ())

    usage = obj.get("usage")
    prompt_tokens = completion_tokens = None
    if usage:
        prompt_tokens = usage.get("prompt_tokens")
        completion_tokens = usage.get("completion_tokens")

    content = False
    pieces: list[str] = []
    for choice in obj.get("choices") or ():
        delta = choice.get("delta")
        if delta:
            piece = delta.get("content")
            if piece:
                content = True
                pieces.append(piece)
            elif delta.get("reasoning_content") or delta.get("reasoning"):
                content = True
        piece = choice.get("text")
        if piece:
            content = True
            pieces.append(piece)
    return ChunkSummary(None, prompt_tokens, completion_tokens, content, tuple(pieces))


# A text slot: bytes that stand for themselves inside a JSON string (no quote, backslash or
# control character). The fast pattern admits ASCII only; the second one any other byte,
# and a match is then checked to be UTF-8 (_valid_text), as a full parse would.
_ASCII_TEXT_SLOT = rb"([\x20\x21\x23-\x5b\x5d-\x7f]+)"
_ANY_TEXT_SLOT = rb'([^"\\\x00-\x1f]+)'
_NUMBER_SLOT = rb"(0|[1-9][0-9]*)"
_PLAIN_ASCII = bytes(c for c in range(0x20, 0x80) if c not in (0x22, 0x5C))
_BLOCK_PREFIX = b"data: "  # layouts match whole event blocks: one data line
# usage counts cut out of a layout, and what the observer does with each
_PROMPT, _COMPLETION, _IGNORED = "prompt", "completion", "ignored"
_NUMBER_KEYS = ((b'"prompt_tokens":', "prompt_tokens", _PROMPT),
                (b'"completion_tokens":', "completion_tokens", _COMPLETION),
                (b'"total_tokens":', "total_tokens", _IGNORED))
_LAYOUT_TRIES = 3  # layouts one stream may learn (a server whose chunks vary otherwise gets none)
_TAILS: dict[bytes, tuple] = {}  # compiled tail patterns, shared by every stream of the same shape
_TAILS_MAX = 256


def _valid_text(text: bytes) -> bool:
    """Whether a text slot that matched ``_ANY_TEXT_SLOT`` is valid UTF-8."""
    try:
        text.decode()
    except UnicodeDecodeError:
        return False
    return True


def _compiled_tail(literals: list[bytes], slots: list[bytes]) -> tuple:
    """(ASCII-text fullmatch, any-text fullmatch) of the pattern slot0 lit1 slot1 lit2 ..."""
    key = b"\0".join(literals) + b"\0" + b"".join(b"t" if s is _ANY_TEXT_SLOT else b"n" for s in slots)
    compiled = _TAILS.get(key)
    if compiled is None:
        def build(text_slot: bytes):
            parts = []
            for slot, literal in zip(slots, literals):
                parts.append(text_slot if slot is _ANY_TEXT_SLOT else slot)
                parts.append(re.escape(literal))
            return re.compile(b"".join(parts), re.DOTALL).fullmatch

        if len(_TAILS) >= _TAILS_MAX:
            _TAILS.clear()
        compiled = _TAILS[key] = (build(_ASCII_TEXT_SLOT), build(_ANY_TEXT_SLOT))
    return compiled


class ChunkLayout:
    """The byte layout of a stream's ordinary content chunks, learned from one parsed chunk.

    vLLM (pydantic) serialises every chunk of a stream the same way: only the
    text and the usage counts change. A layout is such a chunk cut into a fixed
    *head* (``data: {"id":...,"delta":{"content":"``, compared with
    ``startswith``) and a *tail* pattern of literal bytes with slots for the
    counts (``usage.prompt_tokens``, ``completion_tokens``, ``total_tokens``).
    An event that matches is valid JSON of the same structure, so it means what
    the learned chunk meant with the slots' values; :meth:`learn` proves this by
    substituting other values and parsing the result in full. Tails are
    compiled once per shape, not once per stream.
    """

    __slots__ = ("head", "head_len", "tail_match", "tail_match_any", "prompt_group", "completion_group",
                 "keeps_text")

    def __init__(self, head: bytes, literals: list[bytes], slots: list[bytes], roles: list[str],
                 keeps_text: bool) -> None:
        self.head = _BLOCK_PREFIX + head
        self.head_len = len(self.head)
        self.tail_match, self.tail_match_any = _compiled_tail(literals, slots)
        # regex group of each count (0: not in this layout); group 1 is the text
        self.prompt_group = roles.index(_PROMPT) + 1 if _PROMPT in roles else 0
        self.completion_group = roles.index(_COMPLETION) + 1 if _COMPLETION in roles else 0
        self.keeps_text = keeps_text  # the text slot is content or completion text, not reasoning

    def match(self, block: bytes) -> re.Match | None:
        """The match of event ``block`` (group 1: the text) when it has this layout, else None."""
        if not block.startswith(self.head):
            return None
        return self.tail_match(block, self.head_len) or self.match_unicode(block)

    def match_unicode(self, block: bytes) -> re.Match | None:
        """The match of a block (head already checked) whose text is not all ASCII; it must be UTF-8."""
        m = self.tail_match_any(block, self.head_len)
        return m if m is not None and _valid_text(m[1]) else None

    def __repr__(self) -> str:
        return (f"ChunkLayout(head_bytes={self.head_len}, prompt_group={self.prompt_group}, "
                f"completion_group={self.completion_group}, keeps_text={self.keeps_text})")

    @classmethod
    def learn(cls, payload: bytes, obj: Mapping[str, Any], summary: ChunkSummary) -> "ChunkLayout | None":
        """The layout of content chunk ``payload`` (parsed: ``obj``), or None if it cannot be proven."""
        choices = obj.get("choices")
        if not (summary.content and type(choices) is list and len(choices) == 1 and type(choices[0]) is dict):
            return None
        if b"\n" in payload or b"\r" in payload or payload != payload.strip():
            return None  # the layout matches whole blocks: "data: " + payload must be the one data line
        text = _text_span(payload, choices[0])
        if text is None:
            return None
        spans: list[tuple[int, int, str]] = []  # (start, end, role) of the counts
        usage = obj.get("usage")
        for key, name, role in _NUMBER_KEYS:
            value = usage.get(name) if type(usage) is dict else None
            if type(value) is not int or value < 0:
                continue
            if payload.count(key) != 1:
                return None
            start = payload.find(key) + len(key)
            digits = b"%d" % value
            end = start + len(digits)
            if payload[start:end] != digits or payload[end:end + 1].isdigit():
                return None
            spans.append((start, end, role))
        spans.sort()
        if spans and spans[0][0] < text[1]:
            return None  # counts before the text: unusual, not worth a layout
        if summary.completion_tokens is not None and all(role != _COMPLETION for _, _, role in spans):
            return None
        literals, slots, roles, pos = [], [_ANY_TEXT_SLOT], [], text[1]
        for start, end, role in spans:
            if start < pos:
                return None
            literals.append(payload[pos:start])
            slots.append(_NUMBER_SLOT)
            roles.append(role)
            pos = end
        literals.append(payload[pos:])
        layout = cls(payload[:text[0]], literals, slots, ["text", *roles], bool(summary.pieces))
        return layout if layout._proven(payload[:text[0]], literals, slots, payload, summary) else None

    def _proven(self, head: bytes, literals: list[bytes], slots: list[bytes], payload: bytes,
                summary: ChunkSummary) -> bool:
        """The layout reads its own chunk as the full parse did, and reads a chunk with other slot
        values (non-ASCII text, other counts) as a full parse of that chunk does."""
        m = self.match(_BLOCK_PREFIX + payload)
        if m is None or self.meaning(m) != summary:
            return False
        built = [head]
        for i, (slot, literal) in enumerate(zip(slots, literals)):
            built.append("Z\u00e9\u4e2d x".encode() if slot is _ANY_TEXT_SLOT else b"%d" % (1234567 + i))
            built.append(literal)
        candidate = b"".join(built)
        m = self.match(_BLOCK_PREFIX + candidate)
        if m is None:
            return False
        try:
            obj = orjson.loads(candidate)
        except orjson.JSONDecodeError:
            return False
        return isinstance(obj, dict) and summarize_chunk(obj) == self.meaning(m)

    def meaning(self, m: re.Match) -> ChunkSummary:
        """What the observer reads from a matching block (the fast path applies exactly this)."""
        return ChunkSummary(None,
                            int(m[self.prompt_group]) if self.prompt_group else None,
                            int(m[self.completion_group]) if self.completion_group else None,
                            True, (m[1].decode(),) if self.keeps_text else ())


def _text_span(payload: bytes, choice: dict) -> tuple[int, int] | None:
    """Where the chunk's text (or reasoning) value sits in ``payload``, if it can be cut out."""
    delta = choice.get("delta")
    if type(delta) is dict and delta.get("content"):
        key, value = b'"content":"', delta.get("content")
    elif type(delta) is dict and delta.get("reasoning_content"):
        key, value = b'"reasoning_content":"', delta.get("reasoning_content")
    elif type(delta) is dict and delta.get("reasoning"):
        key, value = b'"reasoning":"', delta.get("reasoning")
    else:
        key, value = b'"text":"', choice.get("text")
    if type(value) is not str or not value:
        return None
    raw = value.encode("utf-8", "surrogatepass")
    # only text that JSON writes as itself (no escapes) can be found in the raw bytes
    if any(c < 0x80 for c in raw.translate(None, _PLAIN_ASCII)):
        return None
    if payload.count(key[:-1]) != 1:
        return None
    start = payload.find(key + raw + b'"')
    if start < 0:
        return None
    start += len(key)
    return start, start + len(raw)


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
