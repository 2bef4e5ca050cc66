"""The simulated server's tokenizer: one token per space-separated word.

A word preceded by a space is one token whose string carries the byte-level
BPE space marker ``Ġ`` (``" the"`` -> ``"Ġthe"``); a space not followed by a
word is a token of its own. Chat prompts add a fixed template overhead:
``chat_message_overhead_tokens`` per message (5 by default, like
``<|im_start|>user\\n ... <|im_end|>\\n``) plus ``chat_generation_prompt_tokens``
(6 by default) when a generation prompt is added, so one user message costs
11 tokens on top of its words. Raw prompts add ``prompt_special_tokens`` (0).
"""

from __future__ import annotations

import re

__all__ = ["split_tokens", "count_text_tokens", "chat_tokens", "count_chat_tokens", "SPACE_MARKER"]

SPACE_MARKER = "Ġ"
_TOKEN = re.compile(r" ?[^ ]+| ")


def split_tokens(text: str) -> list[str]:
    """The token strings of ``text`` (with ``Ġ`` for a leading space)."""
    return [t.replace(" ", SPACE_MARKER, 1) if t[0] == " " else t for t in _TOKEN.findall(text)]


def count_text_tokens(text: str) -> int:
    """How many tokens ``text`` holds (no special tokens)."""
    return len(_TOKEN.findall(text))


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text parts count
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def chat_tokens(messages: list, *, message_overhead_tokens: int, generation_prompt_tokens: int,
                add_generation_prompt: bool = True) -> list[str]:
    """Token strings of a templated chat (template tokens appear as ``<|tpl|>``)."""
    out: list[str] = []
    for msg in messages:
        out.extend(["<|tpl|>"] * message_overhead_tokens)
        out.extend(split_tokens(_content_text(msg.get("content") if isinstance(msg, dict) else None)))
    if add_generation_prompt:
        out.extend(["<|tpl|>"] * generation_prompt_tokens)
    return out


def count_chat_tokens(messages: list, *, message_overhead_tokens: int, generation_prompt_tokens: int,
                      add_generation_prompt: bool = True) -> int:
    """How many tokens the templated chat holds."""
    n = generation_prompt_tokens if add_generation_prompt else 0
    for msg in messages:
        n += message_overhead_tokens + count_text_tokens(
            _content_text(msg.get("content") if isinstance(msg, dict) else None))
    return n
