"""The byte-layout fast path of the stream observer: reading a content chunk without parsing it.

vLLM writes every ordinary content chunk of a stream the same way, byte for
byte, except for the text and the usage counts. A :class:`ChunkLayout` is
learned from one chunk that was parsed in full; later chunks that match it
exactly are read from the match instead of being parsed. A layout is proven to
read every chunk it matches as the observer reads a full parse of it (with
:func:`envelope.stream.summarize_chunk`, passed in), so both paths give the
same record.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import orjson

__all__ = ["ChunkLayout"]

# The observer's reading of one parsed event (envelope.stream.summarize_chunk): a tuple in the order
# of envelope.stream.ChunkSummary, (error, prompt_tokens, completion_tokens, content, pieces, choices, finished). It is
# passed in, so this module does not import the observer that uses it.
Summarize = Callable[[Mapping[str, Any]], tuple]

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
    def learn(cls, payload: bytes, obj: Mapping[str, Any], summarize: Summarize) -> "ChunkLayout | None":
        """The layout of content chunk ``payload`` (parsed: ``obj``), or None if it cannot be proven.

        ``summarize`` is the observer's reading of a parsed event
        (:func:`envelope.stream.summarize_chunk`): the layout must read every
        matching chunk as it does.
        """
        summary = summarize(obj)
        _, _, completion_tokens, content, pieces, _, finished = summary
        choices = obj.get("choices")
        if finished:  # the end of the answer: the fast path reads only ordinary chunks
            return None
        if not (content and type(choices) is list and len(choices) == 1 and type(choices[0]) is dict):
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
        if completion_tokens is not None and all(role != _COMPLETION for _, _, role in spans):
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
        layout = cls(payload[:text[0]], literals, slots, ["text", *roles], bool(pieces))
        return layout if layout._proven(payload[:text[0]], literals, slots, payload, summary, summarize) else None

    def _proven(self, head: bytes, literals: list[bytes], slots: list[bytes], payload: bytes,
                summary: tuple, summarize: Summarize) -> bool:
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
        return isinstance(obj, dict) and summarize(obj) == self.meaning(m)

    def meaning(self, m: re.Match) -> tuple:
        """What the observer reads from a matching block (the fast path applies exactly this).

        A tuple in :class:`envelope.stream.ChunkSummary`'s order, so it compares equal to one.
        """
        return (None,
                int(m[self.prompt_group]) if self.prompt_group else None,
                int(m[self.completion_group]) if self.completion_group else None,
                True, (m[1].decode(),) if self.keeps_text else (), True, False)


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
