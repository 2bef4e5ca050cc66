"""Incremental Server-Sent-Events splitting for streamed completions.

vLLM streams ``data: {json}\\n\\n`` events and ends with ``data: [DONE]\\n\\n``.
Bytes arrive in arbitrary pieces, so :class:`SSEDecoder` keeps the unfinished
tail between feeds and returns only the ``data`` payloads of finished events.

It follows the SSE line rules that matter for completions: lines end with
``\\n``, ``\\r\\n`` or ``\\r``; a blank line ends an event; lines starting with
``:`` are comments; several ``data:`` lines in one event are joined with
``\\n``; other fields (``event``, ``id``, ``retry``) are ignored. Each data line
is stripped of surrounding whitespace, and events without data are dropped.

This sits on the client's hot path (one call per ``recv``), so the common case,
an event that is one ``data:`` line, is split off with one ``bytes.split`` per
feed; anything else goes through the line rules above.
"""

from __future__ import annotations

__all__ = ["SSEDecoder", "event_data"]

_BOUNDARY = b"\n\n"


class SSEDecoder:
    """Split a byte stream into SSE ``data`` payloads, one feed at a time."""

    __slots__ = ("_tail", "_skip_lf")

    def __init__(self) -> None:
        # Bytes after the last blank line seen, line endings already "\n" (never holds "\r");
        # it holds no blank line, so no event can have ended inside it.
        self._tail = b""
        self._skip_lf = False  # last feed ended with "\r": a leading "\n" completes that "\r\n"

    def feed(self, data: bytes) -> list[bytes]:
        """Consume ``data``; return the payloads of events it finished, in order."""
        out: list[bytes] = []
        for block in self.feed_blocks(data):
            payload = event_data(block)
            if payload:
                out.append(payload)
        return out

    def feed_blocks(self, data: bytes) -> list[bytes]:
        """Consume ``data``; return the events it finished as raw blocks (see :func:`event_data`).

        A block is the text of one event between blank lines, line endings made ``"\\n"``:
        for vLLM's events, ``data: {json}``.
        """
        if not data:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
        buf = self._tail + data if self._tail else data
        if b"\r" in buf:
            self._skip_lf = buf.endswith(b"\r")
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        # The stream's lines are block.split("\n") for each block, with a blank line between
        # blocks: events end exactly at the boundaries, so the last piece is the unfinished tail.
        blocks = buf.split(_BOUNDARY)
        self._tail = blocks.pop()
        return blocks

    def flush(self) -> list[bytes]:
        """End of stream: return the payload of a last event not followed by a blank line."""
        tail, self._tail = self._tail, b""
        self._skip_lf = False
        payload = event_data(tail) if tail else b""
        return [payload] if payload else []

    def __repr__(self) -> str:
        return f"SSEDecoder(buffered_bytes={len(self._tail)})"


def event_data(block: bytes) -> bytes:
    """The ``data`` of one event block (b"" when it has none): its data lines, stripped, joined with "\\n"."""
    if block[:5] == b"data:" and b"\n" not in block:
        return block[5:].strip()  # the usual event: one data line
    # A block holds no blank line except possibly a leading one (which ends no event, as
    # the previous block's boundary already did). Comments (":...") and other fields are ignored.
    data = [line[5:].strip() if line[:5] == b"data:" else b"" for line in block.split(b"\n")
            if line[:5] == b"data:" or line == b"data"]
    if not data:
        return b""
    return b"\n".join(data) if len(data) > 1 else data[0]
