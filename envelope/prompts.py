"""Prompts with an exact token count, per the served model's own tokenizer.

vLLM's ``/tokenize`` endpoint tells us, in one call, which words of a candidate
list the model's tokenizer encodes as a single token when preceded by a space.
A prompt of N tokens is then the chat template's fixed overhead plus N minus
that overhead such words, drawn at random per request so that prompts differ
from their first token (no accidental prefix-cache hits). A shared system
prefix, when asked for, is the same for every request and so *is* cached.

Byte-level BPE tokenizers (Qwen's among them) pre-split text on spaces, so a
run of " word" pieces encodes to exactly one token per piece; the builder
checks its own arithmetic against ``/tokenize`` at calibration and every
record also carries the server's ``usage.prompt_tokens`` for the audit.

When the server has no ``/tokenize`` (not vLLM), counts are estimates: one
token per word, flagged by ``PromptFactory.exact == False``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

__all__ = [
    "TokenizerProbe",
    "PromptFactory",
    "BuiltPrompt",
    "calibrate",
    "single_token_words",
    "CANDIDATE_WORDS",
]

# Common English and code words; most tokenizers hold many of them as one " word" token.
CANDIDATE_WORDS: tuple[str, ...] = tuple(
    """
    the of and to in is for on that with as it be at by this from or are an not which have but
    all can if will one has more when there so some what out up about into than them only other
    new time two may first then do any like these its now over such our also used use each
    how where most after way many before must through back years well should because between
    same under while last might us great old year off come since against go came right take
    three state never become high really something most another family own leave put old while
    return self def class import none true false value name data list dict string file path
    error type object result args kwargs line text key index count size start end number item
    test case config module function method call default option level mode format write read
    open close set get add remove update check find match filter map sort join split strip
    group order table row column field record entry node tree graph edge point range step
    """.split()
)


@dataclass(frozen=True, slots=True)
class BuiltPrompt:
    """A prompt ready to send: chat messages or a completion string, and its token target."""

    messages: list[dict] | None
    text: str | None
    target_tokens: int


class TokenizerProbe:
    """Calls a vLLM server's ``/tokenize``; ``post`` is any ``(path, json) -> dict`` callable."""

    def __init__(self, post: Callable[[str, dict], dict], model: str) -> None:
        self._post = post
        self.model = model

    def count_prompt(self, text: str) -> int:
        return int(self._post("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": True})["count"])

    def count_messages(self, messages: list[dict]) -> int:
        body = {"model": self.model, "messages": messages, "add_generation_prompt": True}
        return int(self._post("/tokenize", body)["count"])

    def count_text(self, text: str) -> int:
        """Tokens of ``text`` alone (no special tokens): an answer's length as the model counts it."""
        return int(self._post("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False})["count"])

    def token_strings(self, text: str) -> list[str]:
        body = {"model": self.model, "prompt": text, "add_special_tokens": False, "return_token_strs": True}
        out = self._post("/tokenize", body)
        return list(out.get("token_strs") or [])


class PromptFactory:
    """Builds prompts of a requested token length.

    ``words`` are pieces that each encode to exactly one token when joined with
    spaces; ``chat_overhead_tokens`` and ``completion_overhead_tokens`` are what
    the template (or special tokens) add around a user message or raw prompt.
    """

    def __init__(
        self,
        *,
        words: Sequence[str],
        chat_overhead_tokens: int,
        completion_overhead_tokens: int,
        system_overhead_tokens: int = 0,
        turn_overhead_tokens: int = 0,
        exact: bool,
    ) -> None:
        if not words:
            raise ValueError("no single-token words to build prompts from")
        self.words = tuple(words)
        self.chat_overhead_tokens = chat_overhead_tokens
        self.completion_overhead_tokens = completion_overhead_tokens
        self.system_overhead_tokens = system_overhead_tokens
        # what one more turn (an answer and a user message) adds to a chat beyond their own tokens
        self.turn_overhead_tokens = turn_overhead_tokens
        self.exact = exact

    def __repr__(self) -> str:
        return (
            f"PromptFactory(words={len(self.words)}, chat_overhead_tokens={self.chat_overhead_tokens}, "
            f"completion_overhead_tokens={self.completion_overhead_tokens}, exact={self.exact})"
        )

    def _words(self, rng: random.Random, n: int) -> str:
        # One ``choices`` call, not a ``choice`` per word: the next request's prompt is built in the
        # load generator's one event loop while every other stream's chunks wait to be read (a
        # 2,000-token prompt took about 0.7 ms word by word, 0.2 ms so).
        # A leading space keeps the first word the same token as every other.
        return " " + " ".join(rng.choices(self.words, k=max(n, 1)))

    def text_of(self, n_tokens: int, rng: random.Random) -> str:
        """``n_tokens`` single-token words (a leading space each): text of a known length."""
        return self._words(rng, n_tokens)

    def system_prefix(self, n_tokens: int, seed: int) -> str:
        """The shared system prefix text: the same for every request of a run."""
        return self._words(random.Random(f"system-prefix:{seed}"), n_tokens)

    def chat(self, target_tokens: int, rng: random.Random, *, system_prefix: str | None = None,
             system_prefix_tokens: int = 0) -> BuiltPrompt:
        """Chat messages whose templated length is ``target_tokens`` (as closely as the overhead allows)."""
        messages: list[dict] = []
        budget = target_tokens - self.chat_overhead_tokens
        if system_prefix:
            messages.append({"role": "system", "content": system_prefix})
            budget -= system_prefix_tokens + self.system_overhead_tokens
        messages.append({"role": "user", "content": self._words(rng, budget)})
        return BuiltPrompt(messages=messages, text=None, target_tokens=target_tokens)

    def completion(self, target_tokens: int, rng: random.Random, *, system_prefix: str | None = None,
                   system_prefix_tokens: int = 0) -> BuiltPrompt:
        """A raw completion prompt of ``target_tokens`` tokens."""
        budget = target_tokens - self.completion_overhead_tokens
        prefix = ""
        if system_prefix:
            prefix = system_prefix
            budget -= system_prefix_tokens
        return BuiltPrompt(messages=None, text=prefix + self._words(rng, budget), target_tokens=target_tokens)


def single_token_words(probe: TokenizerProbe, candidates: Sequence[str] = CANDIDATE_WORDS) -> list[str]:
    """The candidates that encode to one token each, found with one ``/tokenize`` call.

    Candidates are joined with spaces; a token string that is exactly one
    candidate, preceded by the tokenizer's space marker, is a single-token word.
    """
    unique = list(dict.fromkeys(candidates))
    pieces = probe.token_strings(" " + " ".join(unique))
    found: list[str] = []
    wanted = set(unique)
    for piece in pieces:
        for marker in ("Ġ", "▁", " "):
            if piece.startswith(marker) and piece[len(marker):] in wanted:
                found.append(piece[len(marker):])
                break
    return list(dict.fromkeys(found))


def calibrate(probe: TokenizerProbe | None, *, check_tokens: int = 64) -> PromptFactory:
    """A :class:`PromptFactory` for the server behind ``probe`` (estimates when ``probe`` is None)."""
    if probe is None:
        return PromptFactory(words=CANDIDATE_WORDS, chat_overhead_tokens=0, completion_overhead_tokens=0, exact=False)
    words = single_token_words(probe)
    if len(words) < 16:
        raise ValueError(f"the tokenizer has only {len(words)} single-token words among the candidates")
    rng = random.Random(0)
    sample = PromptFactory(words=words, chat_overhead_tokens=0, completion_overhead_tokens=0, exact=True)
    text = sample._words(rng, check_tokens)
    completion_overhead = probe.count_prompt(text) - check_tokens
    chat_overhead = probe.count_messages([{"role": "user", "content": text}]) - check_tokens
    sys_text = sample._words(rng, check_tokens)
    with_system = probe.count_messages([{"role": "system", "content": sys_text}, {"role": "user", "content": text}])
    system_overhead = with_system - check_tokens - check_tokens - chat_overhead
    answer, message = sample._words(rng, check_tokens), sample._words(rng, check_tokens)
    two_turns = probe.count_messages([{"role": "user", "content": text}, {"role": "assistant", "content": answer},
                                      {"role": "user", "content": message}])
    turn_overhead = two_turns - (check_tokens + chat_overhead) - 2 * check_tokens
    factory = PromptFactory(
        words=words,
        chat_overhead_tokens=chat_overhead,
        completion_overhead_tokens=completion_overhead,
        system_overhead_tokens=system_overhead,
        turn_overhead_tokens=turn_overhead,
        exact=True,
    )
    # Check the arithmetic on a different length before trusting it.
    probe_len = check_tokens * 3 + 7
    built = factory.chat(probe_len, random.Random(1))
    got = probe.count_messages(built.messages or [])
    if got != probe_len:
        factory = PromptFactory(
            words=words,
            chat_overhead_tokens=chat_overhead,
            completion_overhead_tokens=completion_overhead,
            system_overhead_tokens=system_overhead,
            turn_overhead_tokens=turn_overhead,
            exact=False,
        )
    return factory

