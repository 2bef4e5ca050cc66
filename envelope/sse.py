"""Incremental Server-Sent-Events splitting for streamed completions.

vLLM streams ``data: {json}\\n\\n`` events and ends with ``data: [DONE]\\n\\n``.
Bytes arrive in arbitrary pieces, so :class:`SSEDecoder` keeps the unfinished
tail between feeds and returns only the ``data`` payloads of finished events.

It follows the SSE line rules that matter for completions: lines end with
``\\n``, ``\\r\\n`` or ``\\r``; a blank line ends an event; lines starting with
``:`` are comments; several ``data:`` lines in one event are joined with
``\\n``; other fields (``event``, ``id``, ``retry``) are ignored. Each data line
is stripped of surrounding whitespace, and events without data are dropped.
"""

from __future__ import annotations

__all__ = ["SSEDecoder"]


class SSEDecoder:
    """Split a byte stream into SSE ``data`` payloads, one feed at a time."""

    __slots__ = ("_tail", "_data", "_skip_lf")

    def __init__(self) -> None:
        self._tail = b""  # bytes after the last line ending seen (never holds "\r")
        self._data: list[bytes] = []  # data lines of the event being read
        self._skip_lf = False  # last feed ended with "\r": a leading "\n" completes that "\r\n"

    def feed(self, data: bytes) -> list[bytes]:
        """Consume ``data``; return the payloads of events it finished, in order."""
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
        cut = buf.rfind(b"\n")
        if cut < 0:
            self._tail = buf
            return []
        self._tail = buf[cut + 1 :]
        return self._lines(buf[:cut].split(b"\n"))

    def flush(self) -> list[bytes]:
        """End of stream: return the payload of a last event not followed by a blank line."""
        lines = [self._tail, b""] if self._tail else [b""]
        self._tail = b""
        self._skip_lf = False
        return self._lines(lines)

    def _lines(self, lines: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        pending = self._data
        for line in lines:
            if not line:
                if pending:
                    payload = b"\n".join(pending) if len(pending) > 1 else pending[0]
                    pending.clear()
                    if payload:
                        out.append(payload)
                continue
            if line.startswith(b"data:"):
                pending.append(line[5:].strip())
            elif line == b"data":
                pending.append(b"")
            # comments (":...") and other fields are ignored
        return out

    def __repr__(self) -> str:
        return f"SSEDecoder(buffered_bytes={len(self._tail)}, pending_lines={len(self._data)})"
