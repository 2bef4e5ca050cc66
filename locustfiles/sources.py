"""Where a request's prompt comes from when it is not synthetic: dataset entries, trace entries,
and the turns of a conversation. No Locust, no gevent: pure functions and small state objects,
used by the users (closed loop) and the open-loop dispatcher alike.

- A dataset's entries are measured once per process with the server's tokenizer
  (:func:`measure_dataset`): prompt and answer lengths in the served model's tokens.
  Entries whose prompt plus output does not fit ``max_model_len`` are skipped and counted.
- A trace entry becomes a prompt of its length; a Mooncake entry's ``hash_ids`` become
  512-token blocks of words drawn from the block id, so entries sharing leading ids share
  exactly that prefix (and the server's prefix cache can hit it).
- A conversation keeps its history; each turn sends it whole plus a new message.
"""

from __future__ import annotations

import random
import weakref
from dataclasses import dataclass, field
from typing import Sequence

from envelope.datasets import DatasetEntry
from envelope.prompts import BuiltPrompt, PromptFactory, TokenizerProbe
from envelope.scenario import Conversation, DatasetSource, Workload, token_upper
from envelope.source_log import LengthSummary, SourceEntry
from envelope.traces import MOONCAKE_BLOCK_TOKENS, TraceEntry

__all__ = ["MeasuredEntry", "MeasuredDataset", "measure_dataset", "DatasetSampler", "dataset_prompt",
           "trace_prompt", "ConversationState", "RequestPlan"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestPlan:
    """What one request sends, wherever it came from: a built prompt and the lengths asked for."""

    built: BuiltPrompt
    prompt_tokens: int | None  # our count of the prompt (None: not known before sending)
    output_tokens: int | None  # max_tokens (and min_tokens when the output is fixed); None: free
    source_index: int | None = None
    conversation_id: str | None = None
    turn_index: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MeasuredEntry:
    entry: DatasetEntry
    prompt_tokens: int  # as sent to the endpoint (chat template included for chat)
    output_tokens: int | None  # the entry's own output length (an answer's tokens), None: the workload's


@dataclass(frozen=True, slots=True, kw_only=True)
class MeasuredDataset:
    """A dataset's usable entries, measured against the server, and what was left out."""

    source: DatasetSource
    endpoint: str
    usable: tuple[MeasuredEntry, ...]
    skipped_too_long: int
    entries: int
    exact: bool

    def log_entry(self, stages: Sequence[str]) -> SourceEntry:
        return SourceEntry(
            kind="dataset", path=self.source.path, format=self.source.format, entries=self.entries,
            skipped_too_long=self.skipped_too_long,
            prompt_tokens=LengthSummary.of([m.prompt_tokens for m in self.usable]),
            output_tokens=LengthSummary.of([m.output_tokens for m in self.usable if m.output_tokens is not None]),
            stages=tuple(stages), exact=self.exact)


def _messages(entry: DatasetEntry) -> list[dict]:
    if entry.messages is not None:
        return [{"role": role, "content": content} for role, content in entry.messages]
    return [{"role": "user", "content": entry.prompt or ""}]


def _text(entry: DatasetEntry) -> str:
    if entry.prompt is not None:
        return entry.prompt
    return "\n".join(content for _, content in entry.messages or ())


def measure_dataset(source: DatasetSource, entries: Sequence[DatasetEntry], *, endpoint: str,
                    workload: Workload, probe: TokenizerProbe | None, max_model_len: int | None) -> MeasuredDataset:
    """Every entry's prompt length (and answer length) in the served model's tokens; one ``/tokenize``
    call each. Without ``probe`` (no ``/tokenize``) lengths are word counts, marked inexact."""
    usable: list[MeasuredEntry] = []
    skipped = 0
    fallback_output = token_upper(workload.output_tokens) or 0
    for entry in entries:
        if probe is None:
            prompt = len(_text(entry).split())
            answer = None if entry.answer is None else len(entry.answer.split())
        else:
            try:
                prompt = (probe.count_messages(_messages(entry)) if endpoint == "chat"
                          else probe.count_prompt(_text(entry)))
                answer = None if entry.answer is None else probe.count_text(entry.answer)
            except Exception as exc:
                status = getattr(getattr(exc, "response", None), "status_code", None)
                if status is None or not 400 <= status < 500:
                    raise  # not the entry's fault (the server went away): the probe says so
                skipped += 1  # the server would not tokenize it (longer than it takes): it cannot be sent
                continue
        output = entry.output_tokens if entry.output_tokens is not None else (answer if answer else None)
        if max_model_len is not None and prompt + (output or fallback_output) > max_model_len:
            skipped += 1
            continue
        usable.append(MeasuredEntry(entry=entry, prompt_tokens=prompt, output_tokens=output))
    return MeasuredDataset(source=source, endpoint=endpoint, usable=tuple(usable), skipped_too_long=skipped,
                           entries=len(entries), exact=probe is not None)


class DatasetSampler:
    """Draws entries for one process: with replacement (seeded), or without (a seeded order shared by every
    process, which takes every ``processes``-th entry from its ``index``, then the next order)."""

    def __init__(self, measured: MeasuredDataset, *, seed: int | str, processes: int = 1, index: int = 0) -> None:
        if not measured.usable:
            raise ValueError(f"{measured.source.path}: no entry fits the server's max_model_len")
        self.measured = measured
        self._seed = seed
        self._rng = random.Random(f"{seed}:dataset:{measured.source.path}:{index}")
        self._processes = max(1, processes)
        self._position = index % self._processes  # in the endless sequence of seeded orders
        self._orders: dict[int, list[int]] = {}

    def next(self) -> MeasuredEntry:
        usable = self.measured.usable
        if self.measured.source.replacement:
            return usable[self._rng.randrange(len(usable))]
        epoch, at = divmod(self._position, len(usable))
        order = self._orders.get(epoch)
        if order is None:
            order = list(range(len(usable)))
            random.Random(f"{self._seed}:dataset-order:{self.measured.source.path}:{epoch}").shuffle(order)
            self._orders = {epoch: order}
        self._position += self._processes
        return usable[order[at]]


def dataset_prompt(measured: MeasuredEntry, *, endpoint: str) -> BuiltPrompt:
    entry = measured.entry
    if endpoint == "chat":
        return BuiltPrompt(messages=_messages(entry), text=None, target_tokens=measured.prompt_tokens)
    return BuiltPrompt(messages=None, text=_text(entry), target_tokens=measured.prompt_tokens)


def _block_words(factory: PromptFactory, seed: int | str, block_id: int) -> list[str]:
    """A block's 512 words: the same for every request that names the block (made once, kept)."""
    cache = _BLOCKS.setdefault(factory, {}).setdefault(seed, {})
    words = cache.get(block_id)
    if words is None:
        words = cache[block_id] = factory.text_of(MOONCAKE_BLOCK_TOKENS, random.Random(f"{seed}:block:{block_id}")).split(" ")[1:]
    return words


# per factory (a new calibration makes a new one: its words differ), gone with it
_BLOCKS: weakref.WeakKeyDictionary[PromptFactory, dict[int | str, dict[int, list[str]]]] = weakref.WeakKeyDictionary()


def trace_prompt(entry: TraceEntry, factory: PromptFactory, *, endpoint: str, seed: int | str) -> BuiltPrompt:
    """A prompt of the entry's length (``seed``: the run's and the stage's, so that a trace replayed in two
    stages shares no prefix across them, only within each). With ``hash_ids``, its text is the blocks' words in order (cut to
    length after the template's overhead), so equal leading ids give an equal prefix; without, words drawn
    for this entry alone."""
    overhead = factory.chat_overhead_tokens if endpoint == "chat" else factory.completion_overhead_tokens
    content_tokens = max(1, entry.prompt_tokens - overhead)
    if entry.hash_ids:
        pieces: list[str] = []
        for block_id in entry.hash_ids:
            pieces.extend(_block_words(factory, seed, block_id))
            if len(pieces) >= content_tokens:
                break
        text = " " + " ".join(pieces[:content_tokens])
    else:
        text = factory.text_of(content_tokens, random.Random(f"{seed}:trace-entry:{entry.index}"))
    if endpoint == "chat":
        return BuiltPrompt(messages=[{"role": "user", "content": text}], text=None, target_tokens=entry.prompt_tokens)
    return BuiltPrompt(messages=None, text=text, target_tokens=entry.prompt_tokens)


@dataclass(slots=True)
class ConversationState:
    """One user's conversation in progress: its id, how many turns it will have, the history so far."""

    conversation_id: str
    turns: int
    client: str = ""
    turn_index: int = 0
    history: list[dict] = field(default_factory=list)
    prompt_tokens: int | None = None  # the last turn's prompt, as the server counted it (else ours)
    _last_answer_tokens: int | None = None  # the last answer's length in the history

    @property
    def done(self) -> bool:
        return self.turn_index >= self.turns

    def plan(self, workload: Workload, factory: PromptFactory, rng: random.Random, *,
             max_model_len: int | None, seed: int | str = 0) -> RequestPlan | None:
        """The next turn's request, or None when it would not fit ``max_model_len`` (the conversation ends)."""
        conv = workload.conversation
        assert conv is not None
        output = workload.sample_output_tokens(rng)
        if self.turn_index == 0:
            tokens = workload.sample_prompt_tokens(rng, max_model_len=max_model_len)
            prefix = workload.system_prefix_tokens
            built = factory.chat(tokens, rng, system_prefix=factory.system_prefix(prefix, seed) if prefix else None,
                                 system_prefix_tokens=prefix)
            self.history = list(built.messages or ())[:-1]  # the shared system prefix, if any
            message = built.messages[-1] if built.messages else {"role": "user", "content": ""}
            expected = tokens
        else:
            size = conv.message_tokens if conv.message_tokens is not None else workload.prompt_tokens
            n = size if isinstance(size, int) else size.sample(rng)
            message = {"role": "user", "content": factory.text_of(n, rng)}
            answer_tokens = self._last_answer_tokens
            expected = (None if self.prompt_tokens is None or answer_tokens is None
                        else self.prompt_tokens + answer_tokens + factory.turn_overhead_tokens + n)
        if max_model_len is not None and expected is not None and expected + (output or 0) > max_model_len:
            return None
        messages = self.history + [message]
        return RequestPlan(built=BuiltPrompt(messages=messages, text=None, target_tokens=expected or 0),
                           prompt_tokens=expected, output_tokens=output, conversation_id=self.conversation_id,
                           turn_index=self.turn_index)

    def answered(self, plan: RequestPlan, *, answer_text: str | None, answer_tokens: int | None,
                 server_prompt_tokens: int | None, conv: Conversation, factory: PromptFactory,
                 rng: random.Random) -> None:
        """A turn ended well: the history gains its message and the answer (the server's, or a stand-in)."""
        messages = list(plan.built.messages or ())
        if conv.answers == "fixed":
            n = conv.answer_tokens or plan.output_tokens or answer_tokens or 1
            answer_text, answer_tokens = factory.text_of(n, rng), n
        self.history = messages + [{"role": "assistant", "content": answer_text or ""}]
        self.prompt_tokens = server_prompt_tokens if server_prompt_tokens is not None else plan.prompt_tokens
        self._last_answer_tokens = answer_tokens
        self.turn_index += 1
