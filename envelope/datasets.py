"""Prompt datasets read from local files into typed entries.

Three formats, chosen by the file's suffix unless named:

- ``sharegpt`` (``.json``): a JSON array of ``{"conversations": [{"from", "value"}, ...]}``
  objects, or the same objects one per line. The first human turn is the
  prompt, after any system turn before it; the first gpt turn after the prompt
  is the answer, whose length in the served model's tokens is the output length.
  Turns after the answer are not read, so later turns of real ShareGPT dumps
  (odd roles, empty texts) do not matter.
- ``jsonl`` (``.jsonl``): one object per line with ``prompt`` or ``messages``,
  and optionally ``output_tokens``. Other keys are ignored.
- ``text`` (``.txt``): one prompt per non-blank line.

Every problem raises :class:`~envelope.config.ConfigError` with one line,
``file:line: what is wrong``. With ``limit`` a reader stops after that many
entries and reads no further, so the head of a large dump is cheap.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, get_args

import orjson

from envelope.config import ConfigError

__all__ = ["DatasetFormat", "DatasetEntry", "detect_dataset_format", "read_dataset"]

DatasetFormat = Literal["sharegpt", "jsonl", "text"]

_SUFFIX_FORMATS: dict[str, DatasetFormat] = {".json": "sharegpt", ".jsonl": "jsonl", ".txt": "text"}
# ShareGPT role names (and the OpenAI ones some copies use) -> chat roles.
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_CHAT_ROLES = ("system", "user", "assistant")
_CHUNK_BYTES = 1 << 16
_WHITESPACE = re.compile(r"[ \t\r\n]*")


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetEntry:
    """One prompt of a dataset: chat ``messages`` or a plain ``prompt``, never both.

    ``output_tokens`` is the output length a JSON-lines file asks for; ``answer``
    is a ShareGPT conversation's reply, whose token count in the served model is
    the output length to ask for.
    """

    index: int
    line: int
    messages: tuple[tuple[str, str], ...] | None = None
    prompt: str | None = None
    output_tokens: int | None = None
    answer: str | None = None


def detect_dataset_format(path: str | os.PathLike[str]) -> DatasetFormat:
    """The format named by the file's suffix: ``.json``, ``.jsonl`` or ``.txt``."""
    found = _SUFFIX_FORMATS.get(Path(path).suffix.lower())
    if found is None:
        raise ConfigError(f"{path}:1: cannot tell the format from the name; set format: sharegpt|jsonl|text")
    return found


def read_dataset(
    path: str | os.PathLike[str],
    *,
    format: Literal["auto", "sharegpt", "jsonl", "text"] = "auto",
    limit: int | None = None,
) -> list[DatasetEntry]:
    """Read the entries of a dataset file, at most ``limit`` of them.

    Raises :class:`ConfigError` (``file:line: message``) for anything unreadable
    or malformed, including a file without entries.
    """
    name = str(path)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, not {limit!r}")
    if format == "auto":
        format = detect_dataset_format(path)
    if format == "sharegpt":
        if _first_char(name, path) == "{":
            entries = _read_lines_of(name, path, limit, _sharegpt_line)
        else:
            entries = _read_sharegpt_array(name, path, limit)
    elif format == "jsonl":
        entries = _read_lines_of(name, path, limit, _jsonl_line)
    elif format == "text":
        entries = _read_lines_of(name, path, limit, _text_line)
    else:
        raise ConfigError(f"{name}:1: unknown dataset format {format!r}; expected {'|'.join(get_args(DatasetFormat))}")
    if not entries:
        raise ConfigError(f"{name}:1: no entries: the file holds no {format} prompts")
    return entries


# --- reading files ----------------------------------------------------------------------------------------
# Shared with envelope.traces, which reads JSON lines the same way.


def _error(name: str, line: int, message: str) -> ConfigError:
    # One line, whatever a parser or the OS put into the message.
    return ConfigError(f"{name}:{line}: {' '.join(message.split())}")


def _open(name: str, path: str | os.PathLike[str]) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise _error(name, 1, "file not found") from None
    except OSError as exc:
        raise _error(name, 1, f"cannot read: {exc.strerror or exc}") from None


def _lines(name: str, fh: BinaryIO) -> Iterator[tuple[int, str]]:
    """The file's lines with their 1-based numbers, blank lines included."""
    lineno = 0
    while True:
        try:
            raw = fh.readline()
        except OSError as exc:
            raise _error(name, lineno + 1, f"cannot read: {exc.strerror or exc}") from None
        if not raw:
            return
        lineno += 1
        try:
            # Decoded line by line (not through a text wrapper, which decodes ahead)
            # so that an encoding error names its own line.
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise _error(name, lineno, f"not UTF-8 text (byte {exc.start + 1} of the line)") from None
        yield lineno, text


def _json_line(name: str, lineno: int, text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise _error(name, lineno, f"not JSON: {exc.msg} (column {exc.colno})") from None


def _read_lines_of(
    name: str,
    path: str | os.PathLike[str],
    limit: int | None,
    parse: Callable[[str, int, str, int], DatasetEntry],
) -> list[DatasetEntry]:
    entries: list[DatasetEntry] = []
    with _open(name, path) as fh:
        for lineno, text in _lines(name, fh):
            if not text.strip():
                continue
            entries.append(parse(name, lineno, text, len(entries)))
            if limit is not None and len(entries) >= limit:
                break
    return entries


def _first_char(name: str, path: str | os.PathLike[str]) -> str | None:
    """The file's first character that is not whitespace, None for a blank file."""
    with _open(name, path) as fh:
        decoder = codecs.getincrementaldecoder("utf-8-sig")()
        while True:
            try:
                raw = fh.read(_CHUNK_BYTES)
                text = decoder.decode(raw, final=not raw)
            except OSError as exc:
                raise _error(name, 1, f"cannot read: {exc.strerror or exc}") from None
            except UnicodeDecodeError:
                return None  # the full read reports it with its line
            stripped = text.lstrip()
            if stripped:
                return stripped[0]
            if not raw:
                return None


def _iter_json_array(name: str, fh: BinaryIO) -> Iterator[tuple[int, Any]]:
    """The elements of a top-level JSON array, each with the line it starts on.

    The file is read in chunks and each element decoded as soon as it is whole,
    so stopping early reads no further than needed and memory holds about one
    element, not the file.
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8-sig")()
    buf = ""
    pos = 0  # next character of buf to look at
    line = 1  # the line buf[pos] is on
    want = _CHUNK_BYTES
    eof = False

    def more() -> bool:
        # Append the next chunk, dropping what has been consumed; False at the end of the file.
        nonlocal buf, pos, eof
        if eof:
            return False
        try:
            raw = fh.read(want)
            text = utf8.decode(raw, final=not raw)
        except OSError as exc:
            raise _error(name, line, f"cannot read: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            bad = line + buf.count("\n", pos) + raw[: exc.start].count(b"\n")
            raise _error(name, bad, "not UTF-8 text") from None
        eof = not raw
        buf = buf[pos:] + text
        pos = 0
        return not eof or bool(text)

    def skip_whitespace() -> str | None:
        nonlocal pos, line
        while True:
            end = _WHITESPACE.match(buf, pos).end()  # type: ignore[union-attr]  # matches the empty string
            line += buf.count("\n", pos, end)
            pos = end
            if pos < len(buf):
                return buf[pos]
            if not more():
                return None

    def decode() -> Any:
        nonlocal pos, line, want
        while True:
            try:
                value, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as exc:
                # Maybe only cut off by the chunk: read more (at least doubling the
                # buffer, so a long element is not re-parsed too often) and retry.
                want = max(want, len(buf))
                if more():
                    continue
                where = " at the end of the file" if exc.pos >= len(buf) else ""
                raise _error(name, line + buf.count("\n", pos, exc.pos), f"not JSON: {exc.msg}{where}") from None
            except (ValueError, RecursionError) as exc:
                raise _error(name, line, f"not JSON: {exc}") from None
            line += buf.count("\n", pos, end)
            pos = end
            return value

    char = skip_whitespace()
    if char is None:
        return
    if char != "[":
        raise _error(name, line, "expected a JSON array of conversations, or one JSON object per line")
    pos += 1
    char = skip_whitespace()
    if char == "]":
        pos += 1
    else:
        while True:
            if char is None:
                raise _error(name, line, "the array is not closed (missing ']')")
            start = line
            yield start, decode()
            char = skip_whitespace()
            if char == ",":
                pos += 1
                char = skip_whitespace()
                continue
            if char == "]":
                pos += 1
                break
            if char is None:
                raise _error(name, line, "the array is not closed (missing ']')")
            raise _error(name, line, "not JSON: expected ',' or ']' after an entry")
    if skip_whitespace() is not None:
        raise _error(name, line, "not JSON: extra text after the array")


# --- formats ----------------------------------------------------------------------------------------------


def _read_sharegpt_array(name: str, path: str | os.PathLike[str], limit: int | None) -> list[DatasetEntry]:
    entries: list[DatasetEntry] = []
    with _open(name, path) as fh:
        for line, value in _iter_json_array(name, fh):
            entries.append(_sharegpt_entry(name, line, value, len(entries)))
            if limit is not None and len(entries) >= limit:
                break
    return entries


def _sharegpt_line(name: str, lineno: int, text: str, index: int) -> DatasetEntry:
    return _sharegpt_entry(name, lineno, _json_line(name, lineno, text), index)


def _sharegpt_entry(name: str, line: int, value: Any, index: int) -> DatasetEntry:
    if not isinstance(value, dict):
        raise _error(name, line, f"entry {index} is {_kind(value)}, expected an object with 'conversations'")
    turns = value.get("conversations")
    if turns is None:
        raise _error(name, line, f"entry {index} has no 'conversations'")
    if not isinstance(turns, list):
        raise _error(name, line, f"entry {index}: 'conversations' is {_kind(turns)}, expected a list of turns")
    system: list[str] = []
    prompt: str | None = None
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _error(name, line, f"entry {index}: turn {number} is {_kind(turn)}, expected an object")
        speaker = turn.get("from")
        role = _SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            allowed = "|".join(_SHAREGPT_ROLES)
            raise _error(name, line, f"entry {index}: turn {number} has 'from' {_short(speaker)}, expected {allowed}")
        if prompt is None and role == "assistant":
            continue  # a reply before any question: nothing to ask
        text = turn.get("value")
        if not isinstance(text, str) or not text.strip():
            raise _error(name, line, f"entry {index}: turn {number} ({speaker}) has no text in 'value'")
        if prompt is None:
            if role == "system":
                system.append(text)
            else:
                prompt = text
        elif role == "assistant":
            return DatasetEntry(index=index, line=line, messages=_with_system(system, prompt), answer=text)
    if prompt is None:
        raise _error(name, line, f"entry {index} has no human turn to use as the prompt")
    return DatasetEntry(index=index, line=line, messages=_with_system(system, prompt))


def _with_system(system: list[str], prompt: str) -> tuple[tuple[str, str], ...]:
    return (*(("system", text) for text in system), ("user", prompt))


def _jsonl_line(name: str, lineno: int, text: str, index: int) -> DatasetEntry:
    value = _json_line(name, lineno, text)
    if not isinstance(value, dict):
        raise _error(name, lineno, f"{_kind(value)}, expected an object with 'prompt' or 'messages'")
    has_prompt, has_messages = "prompt" in value, "messages" in value
    if has_prompt == has_messages:
        which = "both" if has_prompt else "neither"
        raise _error(name, lineno, f"{which} of 'prompt' and 'messages'; give exactly one")
    output_tokens = value.get("output_tokens")
    if output_tokens is not None and not _positive_int(output_tokens):
        raise _error(name, lineno, f"'output_tokens' is {_short(output_tokens)}, expected a positive integer")
    if has_prompt:
        prompt = value["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise _error(name, lineno, "'prompt' has no text (expected a non-empty string)")
        return DatasetEntry(index=index, line=lineno, prompt=prompt, output_tokens=output_tokens)
    messages = value["messages"]
    if not isinstance(messages, list) or not messages:
        raise _error(name, lineno, "'messages' is not a non-empty list of {role, content} objects")
    pairs: list[tuple[str, str]] = []
    for number, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _error(name, lineno, f"message {number} is {_kind(message)}, expected {{role, content}}")
        role = message.get("role")
        if role not in _CHAT_ROLES:
            raise _error(name, lineno, f"message {number} has role {_short(role)}, expected {'|'.join(_CHAT_ROLES)}")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise _error(name, lineno, f"message {number} ({role}) has no text in 'content'")
        pairs.append((role, content))
    if pairs[-1][0] != "user":
        raise _error(name, lineno, f"the last message is from {pairs[-1][0]}; it must be from user")
    return DatasetEntry(index=index, line=lineno, messages=tuple(pairs), output_tokens=output_tokens)


def _text_line(name: str, lineno: int, text: str, index: int) -> DatasetEntry:
    return DatasetEntry(index=index, line=lineno, prompt=text.rstrip("\r\n"))


# --- small helpers ----------------------------------------------------------------------------------------


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _kind(value: Any) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
