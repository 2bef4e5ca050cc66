"""The stream observer: turns one streamed response into request-record fields.

One :class:`StreamObserver` per request. The client feeds it either raw body
bytes (:meth:`StreamObserver.on_bytes`) or already-split events
(:meth:`StreamObserver.on_event`, raw JSON or a parsed dict); both give the same
result for the same stream. It only records timestamps and server counts;
durations are computed later by :mod:`envelope.metrics`. Which exception means
which error category is the transports' business (:mod:`locustfiles.errors`).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import orjson

from envelope.chunk_layout import ChunkLayout
from envelope.records import ErrorCategory
from envelope.sse import SSEDecoder, event_data

__all__ = ["StreamObserver", "ChunkSummary", "summarize_chunk"]

_DONE = b"[DONE]"
_ERROR_DETAIL_MAX_CHARS = 200
_LAYOUT_TRIES = 3  # layouts one stream may learn (a server whose chunks vary otherwise gets none)


class StreamObserver:
    """Observe one streamed completion and produce the fields of its record.

    ``t_start_s`` is the ``time.perf_counter()`` reading taken just before the
    request was sent; a transport that can stamp closer to the send (after the
    request is built and its connection is ready) replaces it with :meth:`sent`.
    Every ``now_s`` passed in must come from the same clock.

    A *token chunk* is an event with ``choices`` that carries a new output token:
    its ``usage.completion_tokens`` (continuous usage stats) rose over the last
    count the stream reported (an earlier chunk reported one, or this one carries
    output: a finish chunk with the stream's only usage adds no token), or, when it has no usage, it
    carries output: non-empty ``delta.content`` (chat), ``text`` (completions),
    ``delta.reasoning_content`` / ``delta.reasoning`` (reasoning models) or
    ``delta.tool_calls``. So a token whose text is held back (an empty delta)
    still counts, and the role-only first chunk (``completion_tokens`` 0) and a
    finish chunk that adds no token do not. TTFT starts at the first token
    chunk, E2E ends at the last one, and ``chunk_offsets_s`` / ``chunk_tokens``
    list them all, so ``chunk_tokens`` sums to the server's count (it is None
    unless every token chunk carried usage). A usage-only chunk (no choices)
    is never a token chunk. ``output_tokens_client_estimate`` is the number of
    token chunks: vLLM streams one token per chunk in most cases, so this is
    only an estimate; the server's ``usage.completion_tokens`` is used whenever
    it was reported.

    With ``keep_text`` the chat content / completion text (not reasoning) is
    accumulated for the opt-in ``completion_text`` field (see :attr:`text`).

    Raw bytes take a fast path: a stream's ordinary content chunks are
    byte-identical except for the text and the token counts, so after one chunk
    was parsed in full, later ones are matched against its layout (see
    :class:`envelope.chunk_layout.ChunkLayout`) instead of being parsed; anything
    that does not match exactly is parsed in full. Both paths give the same
    record; ``fast=False`` parses every event in full (the reference the fast
    path is tested against).
    """

    __slots__ = (
        "t_start_s",
        "keep_text",
        "_decoder",
        "_last_bytes_s",
        "_t_first_event_s",
        "_t_first_token_s",
        "_t_last_token_s",
        "_offsets",
        "_tokens",
        "_tokens_known",
        "_prompt_tokens",
        "_completion_tokens",
        "_done",
        "_finished",
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
        self._t_last_token_s: float | None = None
        self._offsets: list[float] = []
        self._tokens: list[int] = []  # tokens each token chunk carried (from usage)
        self._tokens_known = True  # every token chunk so far carried usage, and no other chunk added tokens
        self._prompt_tokens: int | None = None
        self._completion_tokens: int | None = None
        self._done = False
        self._finished = False  # a chunk carried a finish_reason
        self._error_category: str | None = None
        self._error_detail: str | None = None
        self._text: list[str] = []
        self._layout: ChunkLayout | None = None
        self._layout_tries = _LAYOUT_TRIES if fast else 0  # layouts this stream may still learn
        self._layout_misses = 0  # content chunks in a row that did not match the layout

    def sent(self, t_start_s: float) -> None:
        """The request is handed to the socket now (``t_start_s``): the stamp its times count from.

        Only before anything was fed: offsets already taken count from the old stamp.
        """
        if self._decoder is not None or self._t_first_event_s is not None:
            raise RuntimeError("StreamObserver.sent() after the response began")
        self.t_start_s = t_start_s

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
                    # Exactly what _on_object would do with this chunk (ChunkLayout.learn proved the
                    # meaning: a chunk with choices and text); the first event came before.
                    if layout.prompt_group:
                        self._prompt_tokens = int(m[layout.prompt_group])
                    if layout.completion_group:
                        tokens = int(m[layout.completion_group])
                        before = self._completion_tokens or 0
                        self._completion_tokens = tokens
                        if tokens > before:
                            self._token_chunk(now_s, tokens - before)
                    else:
                        self._token_chunk(now_s, None)
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
        if summary is not None and summary.content and not summary.finished and self._layout_tries:
            # A content chunk the layout (if any) did not match. Learn one from it when there is
            # none, or when two chunks in a row missed (the stream's shape changed); a chunk that
            # is merely unusual (the last one, with finish_reason) keeps the current layout.
            self._layout_misses += 1
            if self._layout is None or self._layout_misses >= 2:
                self._layout_tries -= 1
                layout = ChunkLayout.learn(payload, obj, summarize_chunk)
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
            counted_before = self._completion_tokens is not None
            before = self._completion_tokens or 0
            self._completion_tokens = completion_tokens
            if completion_tokens > before:
                if summary.choices and (summary.content or counted_before):
                    self._token_chunk(now_s, completion_tokens - before)
                else:
                    # tokens no token chunk carried (a usage-only chunk, or a finish chunk with the first
                    # and only usage of the stream, as transformers serve sends it): chunk_tokens would not sum
                    self._tokens_known = False
        elif summary.choices and summary.content:
            self._token_chunk(now_s, None)
        if summary.pieces and self.keep_text:
            self._text.extend(summary.pieces)
        if summary.finished:
            self._finished = True
        return summary

    def _token_chunk(self, now_s: float, tokens: int | None) -> None:
        """Record a token chunk that arrived at ``now_s``, carrying ``tokens`` (None: no usage)."""
        if self._t_first_token_s is None:
            self._t_first_token_s = now_s
        self._t_last_token_s = now_s
        self._offsets.append(now_s - self.t_start_s)
        if tokens is None:
            self._tokens_known = False
        elif self._tokens_known:
            self._tokens.append(tokens)

    # -- results ---------------------------------------------------------------

    @property
    def usage_seen(self) -> bool:
        """Whether the server reported ``usage.completion_tokens`` at least once."""
        return self._completion_tokens is not None

    @property
    def t_first_token_s(self) -> float | None:
        """When the first token chunk arrived (None until it has)."""
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
        usage_expected: bool = False,
        done_expected: bool = True,
    ) -> dict[str, Any]:
        """End the observation at ``now_s``; return the record fields observed.

        An explicit ``error_category`` wins over errors seen in the stream; else
        the first observed error wins; else a stream without ``[DONE]`` is
        ``incomplete_stream`` (with ``done_expected=False``, for a server that never
        sends ``[DONE]``, a stream is complete when a chunk carried a
        ``finish_reason``); else, with ``usage_expected``, a stream that
        reported no usage is ``missing_usage``. The caller says whether usage
        was expected: the request asked for it and the server is known to give
        it (see :func:`locustfiles.users.send_one`). Without usage
        ``output_tokens`` falls back to the client estimate with
        ``output_tokens_estimated``, failed or not.
        """
        if self._decoder is not None:
            # A last event without a trailing blank line arrived with the last bytes.
            t_last = self._last_bytes_s if self._last_bytes_s is not None else now_s
            for payload in self._decoder.flush():
                self._on_payload(payload, t_last)

        if error_category is None:
            error_category, error_detail = self._error_category, self._error_detail
            if error_category is None and not self._done and (done_expected or not self._finished):
                error_category = ErrorCategory.INCOMPLETE_STREAM
                error_detail = ("stream ended without [DONE]" if done_expected
                                else "stream ended without a finish_reason")
            elif error_category is None and usage_expected and self._completion_tokens is None:
                error_category = ErrorCategory.MISSING_USAGE
                error_detail = "no usage in the stream, though asked for (stream_options.include_usage)"

        n_chunks = len(self._offsets)
        chunk_tokens = None
        if self._tokens_known and n_chunks and len(self._tokens) == n_chunks:
            chunk_tokens = tuple(self._tokens)
        if self._completion_tokens is not None:
            output_tokens, estimated = self._completion_tokens, False
        else:
            output_tokens, estimated = n_chunks, True

        fields: dict[str, Any] = {
            "t_first_event_s": self._t_first_event_s,
            "t_first_token_s": self._t_first_token_s,
            "t_last_token_s": self._t_last_token_s,
            "t_done_s": now_s,
            "chunk_offsets_s": tuple(self._offsets),
            "chunk_tokens": chunk_tokens,
            "prompt_tokens": self._prompt_tokens,
            "output_tokens": output_tokens,
            "output_tokens_estimated": estimated,
            "output_tokens_client_estimate": n_chunks,
            "error_category": error_category,
            "error_detail": error_detail,
            "http_status": http_status,
        }
        if self.keep_text:
            fields["completion_text"] = "".join(self._text)
        return fields

    def __repr__(self) -> str:
        return (
            f"StreamObserver(t_start_s={self.t_start_s!r}, token_chunks={len(self._offsets)},"
            f" done={self._done}, error_category={self._error_category!r})"
        )


class ChunkSummary(NamedTuple):
    """What one parsed event means to the observer (see :func:`summarize_chunk`)."""

    error: str | None  # the message of an error event, else None
    prompt_tokens: Any  # usage.prompt_tokens when reported, else None
    completion_tokens: Any  # usage.completion_tokens when reported, else None
    content: bool  # carries output: text, completion text, reasoning or tool calls
    pieces: tuple[str, ...]  # the content / completion text it carries (not reasoning)
    choices: bool  # has a non-empty ``choices`` list (a usage-only chunk has none)
    finished: bool = False  # a choice carries a finish_reason (the server's end of the answer)


def summarize_chunk(obj: Mapping[str, Any]) -> ChunkSummary:
    """The observer's reading of one parsed event: an error, its usage, whether it carries output."""
    error = obj.get("error")
    if error or obj.get("object") == "error":
        if isinstance(error, Mapping):
            message = error.get("message") or str(error)
        elif error:
            message = str(error)
        else:
            message = obj.get("message") or "error event"
        return ChunkSummary(str(message), None, None, False, (), False)

    usage = obj.get("usage")
    prompt_tokens = completion_tokens = None
    if usage:
        prompt_tokens = usage.get("prompt_tokens")
        completion_tokens = usage.get("completion_tokens")

    content = finished = False
    pieces: list[str] = []
    choices = obj.get("choices") or ()
    for choice in choices:
        if choice.get("finish_reason"):
            finished = True
        delta = choice.get("delta")
        if delta:
            piece = delta.get("content")
            if piece:
                content = True
                pieces.append(piece)
            elif delta.get("reasoning_content") or delta.get("reasoning") or delta.get("tool_calls"):
                content = True
        piece = choice.get("text")
        if piece:
            content = True
            pieces.append(piece)
    return ChunkSummary(None, prompt_tokens, completion_tokens, content, tuple(pieces), bool(choices), finished)


def _short(text: str) -> str:
    return text if len(text) <= _ERROR_DETAIL_MAX_CHARS else text[: _ERROR_DETAIL_MAX_CHARS - 3] + "..."
