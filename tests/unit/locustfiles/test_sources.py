"""Dataset, trace and conversation prompts (``locustfiles/sources.py``), with lengths checked by hand.

Exact lengths are checked against the simulator's tokenizer, called directly as the probe's ``post``
(no network): one token per space-separated word, 5 template tokens per chat message and 6 for the
generation prompt, so one user message costs 11 tokens on top of its words.
"""

import random

import weakref

import pytest

import locustfiles.sources as sources
from envelope.datasets import DatasetEntry
from envelope.prompts import PromptFactory, TokenizerProbe, calibrate
from envelope.scenario import Conversation, DatasetSource, Distribution, Workload
from envelope.source_log import LengthSummary, SourceEntry
from envelope.traces import MOONCAKE_BLOCK_TOKENS, TraceEntry
from locustfiles.sources import (
    ConversationState,
    DatasetSampler,
    MeasuredDataset,
    MeasuredEntry,
    dataset_prompt,
    measure_dataset,
    trace_prompt,
)
from server.sim.config import SimConfig
from server.sim.tokenizer import chat_tokens, split_tokens


def sim_post(config: SimConfig):
    """``(path, body) -> dict`` doing what the simulator's ``/tokenize`` does."""

    def post(path: str, body: dict) -> dict:
        assert path == "/tokenize"
        if body.get("messages") is not None:
            tokens = chat_tokens(body["messages"], message_overhead_tokens=config.chat_message_overhead_tokens,
                                 generation_prompt_tokens=config.chat_generation_prompt_tokens,
                                 add_generation_prompt=bool(body.get("add_generation_prompt", True)))
        else:
            tokens = split_tokens(body["prompt"])
            if body.get("add_special_tokens", True):
                tokens = ["<|special|>"] * config.prompt_special_tokens + tokens
        return {"count": len(tokens), "token_strs": tokens if body.get("return_token_strs") else None}

    return post


SIM = SimConfig()  # chat: 5 per message + 6; completions: no special tokens
SIM_BOS = SimConfig(prompt_special_tokens=1)  # completions: one special token
SIM_PROBE = TokenizerProbe(sim_post(SIM), "sim-model")
SIM_BOS_PROBE = TokenizerProbe(sim_post(SIM_BOS), "sim-model")


@pytest.fixture(autouse=True)
def fresh_block_cache(monkeypatch):
    # trace blocks are cached per factory in a module global: each test starts with none
    monkeypatch.setattr(sources, "_BLOCKS", weakref.WeakKeyDictionary())


@pytest.fixture(scope="module")
def factory() -> PromptFactory:
    f = calibrate(SIM_PROBE)
    assert f.exact
    assert (f.chat_overhead_tokens, f.completion_overhead_tokens, f.turn_overhead_tokens) == (11, 0, 10)
    return f


@pytest.fixture(scope="module")
def bos_factory() -> PromptFactory:
    f = calibrate(SIM_BOS_PROBE)
    assert (f.chat_overhead_tokens, f.completion_overhead_tokens) == (11, 1)
    return f


# -- measure_dataset --------------------------------------------------------------------------------------------

MSG_OVERHEAD, GEN_PROMPT, BOS = 3, 2, 1


def fake_post(path: str, body: dict) -> dict:
    """Words plus a fixed template: 3 per message, 2 for the generation prompt, 1 BOS on a raw prompt."""
    assert path == "/tokenize"
    if "messages" in body:
        texts = [m["content"] for m in body["messages"]]
        n = sum(len(t.split()) + MSG_OVERHEAD for t in texts) + GEN_PROMPT
    else:
        texts = [body["prompt"]]
        n = len(body["prompt"].split()) + (BOS if body["add_special_tokens"] else 0)
    if any("BOOM" in t for t in texts):
        raise Refused()
    return {"count": n}


class Refused(Exception):
    """What httpx raises for a 4xx answer, as far as measure_dataset looks: a response with its status."""

    response = type("Response", (), {"status_code": 400})()


FAKE_PROBE = TokenizerProbe(fake_post, "m")
SOURCE = DatasetSource(path="data/prompts.jsonl", format="jsonl")
WORKLOAD = Workload(prompt_tokens=50, output_tokens=100)

ENTRIES = [
    # chat: (2 + 3) + (4 + 3) + 2 = 14; text "be brief\ntell me a story": 6 words + BOS = 7; output: the workload's
    DatasetEntry(index=0, line=1, messages=(("system", "be brief"), ("user", "tell me a story"))),
    # chat: 3 + 3 + 2 = 8; text: 3 + 1 = 4; output: the answer's 5 words (no BOS on an answer)
    DatasetEntry(index=1, line=2, prompt="hello there world", answer="one two three four five"),
    # chat: 4 + 3 + 2 = 9; text: 4 + 1 = 5; output: its own 7 wins over the answer's 2
    DatasetEntry(index=2, line=3, prompt="a b c d", output_tokens=7, answer="x y"),
    # chat: 40 + 5 = 45, + the workload's 100 > 120; text: 41 + 100 > 120: too long either way
    DatasetEntry(index=3, line=4, prompt=" ".join(["w"] * 40)),
    # the probe refuses it: skipped
    DatasetEntry(index=4, line=5, prompt="BOOM now"),
]


def _lengths(measured: MeasuredDataset) -> list[tuple[int, int, int | None]]:
    return [(m.entry.index, m.prompt_tokens, m.output_tokens) for m in measured.usable]


def test_measure_chat_prompts_with_the_template():
    measured = measure_dataset(SOURCE, ENTRIES, endpoint="chat", workload=WORKLOAD, probe=FAKE_PROBE,
                               max_model_len=120)
    assert _lengths(measured) == [(0, 14, None), (1, 8, 5), (2, 9, 7)]
    assert (measured.entries, measured.skipped_too_long, measured.exact) == (5, 2, True)
    assert measured.endpoint == "chat" and measured.source is SOURCE


def test_measure_completion_prompts_as_text():
    measured = measure_dataset(SOURCE, ENTRIES, endpoint="completions", workload=WORKLOAD, probe=FAKE_PROBE,
                               max_model_len=120)
    assert _lengths(measured) == [(0, 7, None), (1, 4, 5), (2, 5, 7)]
    assert (measured.entries, measured.skipped_too_long, measured.exact) == (5, 2, True)


def test_an_entry_that_just_fits_is_kept():
    # entry 0: 14 + 100 (the workload's output) = 114
    fits = measure_dataset(SOURCE, ENTRIES[:1], endpoint="chat", workload=WORKLOAD, probe=FAKE_PROBE,
                           max_model_len=114)
    assert _lengths(fits) == [(0, 14, None)] and fits.skipped_too_long == 0
    over = measure_dataset(SOURCE, ENTRIES[:1], endpoint="chat", workload=WORKLOAD, probe=FAKE_PROBE,
                           max_model_len=113)
    assert over.usable == () and over.skipped_too_long == 1


def test_the_entrys_own_output_decides_whether_it_fits():
    # entry 1: 8 + its answer's 5 = 13 fits 13 though 8 + the workload's 100 would not
    measured = measure_dataset(SOURCE, ENTRIES[1:2], endpoint="chat", workload=WORKLOAD, probe=FAKE_PROBE,
                               max_model_len=13)
    assert _lengths(measured) == [(1, 8, 5)]
    assert measure_dataset(SOURCE, ENTRIES[1:2], endpoint="chat", workload=WORKLOAD, probe=FAKE_PROBE,
                           max_model_len=12).skipped_too_long == 1


def test_the_workloads_largest_output_is_the_fallback():
    workload = Workload(output_tokens=Distribution(distribution="uniform", min=10, max=30))
    # entry 0: 14 + 30 = 44
    assert measure_dataset(SOURCE, ENTRIES[:1], endpoint="chat", workload=workload, probe=FAKE_PROBE,
                           max_model_len=44).skipped_too_long == 0
    assert measure_dataset(SOURCE, ENTRIES[:1], endpoint="chat", workload=workload, probe=FAKE_PROBE,
                           max_model_len=43).skipped_too_long == 1
    # free output length: only the prompt must fit
    free = Workload(output_tokens=None)
    assert measure_dataset(SOURCE, ENTRIES[:1], endpoint="chat", workload=free, probe=FAKE_PROBE,
                           max_model_len=14).skipped_too_long == 0


def test_without_max_model_len_only_refused_entries_are_skipped():
    measured = measure_dataset(SOURCE, ENTRIES, endpoint="chat", workload=WORKLOAD, probe=FAKE_PROBE,
                               max_model_len=None)
    assert _lengths(measured) == [(0, 14, None), (1, 8, 5), (2, 9, 7), (3, 45, None)]
    assert measured.skipped_too_long == 1


def test_an_empty_answer_leaves_the_output_to_the_workload():
    entry = DatasetEntry(index=0, line=1, prompt="hi", answer="")
    measured = measure_dataset(SOURCE, [entry], endpoint="chat", workload=WORKLOAD, probe=FAKE_PROBE,
                               max_model_len=None)
    assert _lengths(measured) == [(0, 6, None)]


def test_without_a_probe_lengths_are_word_counts():
    measured = measure_dataset(SOURCE, ENTRIES, endpoint="chat", workload=WORKLOAD, probe=None, max_model_len=120)
    # no template, no refusals: entry 3 (40 + 100) is too long, "BOOM now" (2 + 100) fits
    assert _lengths(measured) == [(0, 6, None), (1, 3, 5), (2, 4, 7), (4, 2, None)]
    assert (measured.entries, measured.skipped_too_long, measured.exact) == (5, 1, False)


def test_measured_against_the_simulator():
    entries = [DatasetEntry(index=0, line=1, messages=(("system", "be brief"), ("user", "tell me a story")),
                            answer="once upon a time")]
    measured = measure_dataset(SOURCE, entries, endpoint="chat", workload=WORKLOAD, probe=SIM_PROBE,
                               max_model_len=None)
    # (5 + 2) + (5 + 4) + 6 = 22; the answer: 4 words
    assert _lengths(measured) == [(0, 22, 4)]


def test_log_entry_summarises_the_usable_lengths():
    measured = measure_dataset(SOURCE, ENTRIES, endpoint="chat", workload=WORKLOAD, probe=FAKE_PROBE,
                               max_model_len=120)
    entry = measured.log_entry(["warmup", "ramp"])
    assert entry == SourceEntry(
        kind="dataset", path="data/prompts.jsonl", format="jsonl", entries=5, skipped_too_long=2,
        # prompts 14, 8, 9 -> sorted 8, 9, 14: p50 is the 2nd, p95 the 3rd (nearest rank)
        prompt_tokens=LengthSummary(count=3, p50=9, p95=14, max=14),
        # only entries with their own output: 5 and 7
        output_tokens=LengthSummary(count=2, p50=5, p95=7, max=7),
        stages=("warmup", "ramp"), exact=True)
    assert measure_dataset(SOURCE, ENTRIES, endpoint="chat", workload=WORKLOAD, probe=None,
                           max_model_len=120).log_entry([]).exact is False


def test_dataset_prompt_sends_messages_or_text():
    measured = measure_dataset(SOURCE, ENTRIES[:1], endpoint="chat", workload=WORKLOAD, probe=FAKE_PROBE,
                               max_model_len=None).usable[0]
    chat = dataset_prompt(measured, endpoint="chat")
    assert chat.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me a story"}]
    assert chat.text is None and chat.target_tokens == 14
    text = dataset_prompt(MeasuredEntry(entry=ENTRIES[1], prompt_tokens=4, output_tokens=5), endpoint="completions")
    assert (text.messages, text.text, text.target_tokens) == (None, "hello there world", 4)
    prompt_as_chat = dataset_prompt(MeasuredEntry(entry=ENTRIES[1], prompt_tokens=8, output_tokens=5), endpoint="chat")
    assert prompt_as_chat.messages == [{"role": "user", "content": "hello there world"}]


# -- DatasetSampler ---------------------------------------------------------------------------------------------


def _dataset(n: int, *, replacement: bool, path: str = "data/d.jsonl") -> MeasuredDataset:
    usable = tuple(MeasuredEntry(entry=DatasetEntry(index=i, line=i + 1, prompt=f"p{i}"), prompt_tokens=10 + i,
                                 output_tokens=None) for i in range(n))
    return MeasuredDataset(source=DatasetSource(path=path, replacement=replacement), endpoint="chat", usable=usable,
                           skipped_too_long=0, entries=n, exact=True)


def _draw(sampler: DatasetSampler, k: int) -> list[int]:
    return [sampler.next().entry.index for _ in range(k)]


def test_with_replacement_draws_are_seeded():
    measured = _dataset(8, replacement=True)
    first = _draw(DatasetSampler(measured, seed=1), 40)
    assert _draw(DatasetSampler(measured, seed=1), 40) == first
    assert _draw(DatasetSampler(measured, seed=2), 40) != first
    assert _draw(DatasetSampler(measured, seed=1, processes=2, index=1), 40) != first
    assert set(first) <= set(range(8))
    # 40 draws of 8 with replacement: some entry comes twice within the first 8
    assert len(set(first[:8])) < 8


def test_with_replacement_only_usable_entries_are_drawn():
    measured = measure_dataset(SOURCE, ENTRIES, endpoint="chat", workload=WORKLOAD, probe=FAKE_PROBE,
                               max_model_len=120)
    measured = MeasuredDataset(source=DatasetSource(path="x.jsonl"), endpoint="chat", usable=measured.usable,
                               skipped_too_long=2, entries=5, exact=True)
    assert set(_draw(DatasetSampler(measured, seed=0), 60)) == {0, 1, 2}


def test_without_replacement_each_epoch_is_a_permutation():
    measured = _dataset(8, replacement=False)
    draws = _draw(DatasetSampler(measured, seed=5), 24)
    epochs = [draws[0:8], draws[8:16], draws[16:24]]
    for epoch in epochs:
        assert sorted(epoch) == list(range(8))
    assert epochs[0] != epochs[1] != epochs[2]  # a new order every epoch
    assert _draw(DatasetSampler(measured, seed=5), 24) == draws
    assert _draw(DatasetSampler(measured, seed=6), 8) != epochs[0]


@pytest.mark.parametrize("n, processes", [(8, 2), (5, 2), (7, 3), (2, 3)])
def test_processes_split_each_epoch_between_them(n, processes):
    measured = _dataset(n, replacement=False)
    per_process = 4 * n  # several epochs each
    draws = [_draw(DatasetSampler(measured, seed=9, processes=processes, index=i), per_process)
             for i in range(processes)]
    # position p of the shared sequence is drawn by process p % processes as its (p // processes)-th draw
    combined = [draws[p % processes][p // processes] for p in range(per_process * processes)]
    assert combined == _draw(DatasetSampler(measured, seed=9), per_process * processes)
    for start in range(0, len(combined), n):
        assert sorted(combined[start:start + n]) == list(range(n))  # each entry exactly once per epoch
    if n % processes == 0:
        for k in range(0, per_process, n // processes):  # within an epoch no two processes share an entry
            chunks = [set(d[k:k + n // processes]) for d in draws]
            assert len(set().union(*chunks)) == n


def test_nothing_usable_raises():
    measured = MeasuredDataset(source=DatasetSource(path="data/empty.jsonl"), endpoint="chat", usable=(),
                               skipped_too_long=3, entries=3, exact=True)
    with pytest.raises(ValueError, match="data/empty.jsonl"):
        DatasetSampler(measured, seed=0)


# -- trace_prompt -----------------------------------------------------------------------------------------------


def _trace(index: int, prompt_tokens: int, hash_ids=()) -> TraceEntry:
    return TraceEntry(index=index, line=index + 1, t_s=0.0, prompt_tokens=prompt_tokens, output_tokens=10,
                      hash_ids=tuple(hash_ids))


def _content_words(built) -> list[str]:
    text = built.messages[-1]["content"] if built.messages is not None else built.text
    assert text.startswith(" ")
    return text.split(" ")[1:]


@pytest.mark.parametrize("hash_ids", [(), (4, 5)])
def test_a_chat_trace_prompt_has_the_entrys_length(factory, hash_ids):
    built = trace_prompt(_trace(0, 1000, hash_ids), factory, endpoint="chat", seed=0)
    words = _content_words(built)
    assert len(words) == 1000 - 11
    assert set(words) <= set(factory.words)
    assert built.text is None and built.target_tokens == 1000
    assert [m["role"] for m in built.messages] == ["user"]
    assert SIM_PROBE.count_messages(built.messages) == 1000


@pytest.mark.parametrize("hash_ids", [(), (4, 5)])
def test_a_completion_trace_prompt_uses_the_completion_overhead(bos_factory, hash_ids):
    built = trace_prompt(_trace(0, 700, hash_ids), bos_factory, endpoint="completions", seed=0)
    assert built.messages is None and built.target_tokens == 700
    assert len(_content_words(built)) == 700 - 1
    assert SIM_BOS_PROBE.count_prompt(built.text) == 700


def _common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_shared_leading_hash_ids_share_exactly_their_blocks(factory):
    block = MOONCAKE_BLOCK_TOKENS
    assert block == 512
    a = _content_words(trace_prompt(_trace(0, 1500, (10, 11, 12)), factory, endpoint="chat", seed=0))
    b = _content_words(trace_prompt(_trace(1, 1400, (10, 11, 99)), factory, endpoint="chat", seed=0))
    c = _content_words(trace_prompt(_trace(2, 1500, (10, 77, 12)), factory, endpoint="chat", seed=0))
    assert (len(a), len(b), len(c)) == (1489, 1389, 1489)
    assert _common_prefix(a, b) == 2 * block
    assert a[2 * block:len(b)] != b[2 * block:]
    assert _common_prefix(a, c) == block
    # block 12 is the same words wherever it appears
    assert a[2 * block:] == c[2 * block:]
    # a shorter entry naming the same first block is a prefix of it
    d = _content_words(trace_prompt(_trace(3, 300, (10,)), factory, endpoint="chat", seed=0))
    assert d == a[:300 - 11]


def test_blocks_depend_on_the_seed(factory):
    a = _content_words(trace_prompt(_trace(0, 500, (10,)), factory, endpoint="chat", seed=0))
    b = _content_words(trace_prompt(_trace(0, 500, (10,)), factory, endpoint="chat", seed=1))
    assert _common_prefix(a, b) < 8


def test_entries_without_hash_ids_differ_by_index(factory):
    a0 = _content_words(trace_prompt(_trace(0, 300), factory, endpoint="chat", seed=0))
    a1 = _content_words(trace_prompt(_trace(1, 300), factory, endpoint="chat", seed=0))
    assert len(a0) == len(a1) == 289
    assert _common_prefix(a0, a1) < 8
    # the same entry is the same prompt (replayable)
    assert _content_words(trace_prompt(_trace(0, 300), factory, endpoint="chat", seed=0)) == a0


def test_a_prompt_shorter_than_the_overhead_is_one_word(factory):
    built = trace_prompt(_trace(0, 5), factory, endpoint="chat", seed=0)
    assert len(_content_words(built)) == 1
    assert built.target_tokens == 5


def test_a_new_factory_does_not_get_blocks_made_for_a_freed_one():
    """Blocks are kept per factory and go with it: a new calibration (another server) gets its own words."""
    import gc

    old = PromptFactory(words=["aa", "bb"], chat_overhead_tokens=0, completion_overhead_tokens=0, exact=True)
    trace_prompt(_trace(0, 600, (1, 2)), old, endpoint="completions", seed=0)
    assert len(sources._BLOCKS) == 1
    del old
    gc.collect()
    assert len(sources._BLOCKS) == 0
    new = PromptFactory(words=["xx", "yy"], chat_overhead_tokens=0, completion_overhead_tokens=0, exact=True)
    words = _content_words(trace_prompt(_trace(0, 600, (1, 2)), new, endpoint="completions", seed=0))
    assert set(words) <= {"xx", "yy"}


# -- ConversationState ------------------------------------------------------------------------------------------


def _conv_workload(**conv) -> Workload:
    return Workload(prompt_tokens=100, output_tokens=20, conversation=Conversation(**conv))


def _roles(messages) -> list[str]:
    return [m["role"] for m in messages]


def test_fixed_answers_make_every_turns_length_known(factory):
    workload = _conv_workload(turns=3, answers="fixed", message_tokens=30)
    conv = workload.conversation
    rng = random.Random(0)
    state = ConversationState(conversation_id="u1/c0", turns=3, client="chat")
    expected = [100, 100 + 20 + 10 + 30, 160 + 20 + 10 + 30]  # previous + answer + turn overhead + message
    for k, tokens in enumerate(expected):
        assert not state.done
        plan = state.plan(workload, factory, rng, max_model_len=None)
        assert (plan.prompt_tokens, plan.output_tokens, plan.turn_index, plan.conversation_id) == (
            tokens, 20, k, "u1/c0")
        assert plan.built.target_tokens == tokens
        assert SIM_PROBE.count_messages(plan.built.messages) == tokens  # the server would count the same
        assert _roles(plan.built.messages) == ["user", "assistant"] * k + ["user"]
        if k:
            assert len(plan.built.messages[-1]["content"].split()) == 30
        # the server reports what it counted; a fixed answer ignores the server's own
        state.answered(plan, answer_text="ignored", answer_tokens=3, server_prompt_tokens=tokens, conv=conv,
                       factory=factory, rng=rng)
        assert state.history[-1]["role"] == "assistant"
        assert len(state.history[-1]["content"].split()) == 20  # the turn's output length
        assert state.turn_index == k + 1
    assert state.done
    assert _roles(state.history) == ["user", "assistant"] * 3


def test_fixed_answer_tokens_and_the_servers_prompt_count_are_used(factory):
    workload = _conv_workload(turns=2, answers="fixed", answer_tokens=7)
    conv = workload.conversation
    rng = random.Random(1)
    state = ConversationState(conversation_id="c", turns=2)
    first = state.plan(workload, factory, rng, max_model_len=None)
    # the server counted one more than we did: the next turn builds on its count
    state.answered(first, answer_text=None, answer_tokens=None, server_prompt_tokens=101, conv=conv, factory=factory,
                   rng=rng)
    assert state.prompt_tokens == 101
    assert len(state.history[-1]["content"].split()) == 7
    second = state.plan(workload, factory, rng, max_model_len=None)
    # message_tokens defaults to the workload's prompt_tokens
    assert second.prompt_tokens == 101 + 7 + 10 + 100


def test_without_a_server_count_our_own_is_kept(factory):
    workload = _conv_workload(turns=2, answers="fixed", message_tokens=5)
    conv = workload.conversation
    rng = random.Random(2)
    state = ConversationState(conversation_id="c", turns=2)
    first = state.plan(workload, factory, rng, max_model_len=None)
    state.answered(first, answer_text=None, answer_tokens=None, server_prompt_tokens=None, conv=conv,
                   factory=factory, rng=rng)
    assert state.prompt_tokens == 100
    assert state.plan(workload, factory, rng, max_model_len=None).prompt_tokens == 100 + 20 + 10 + 5


def test_a_turn_that_would_not_fit_ends_the_conversation(factory):
    workload = _conv_workload(turns=5, answers="fixed", message_tokens=30)
    conv = workload.conversation
    # the third turn: 220 prompt + 20 output = 240
    for limit, planned in [(240, 3), (239, 2)]:
        rng = random.Random(0)
        state = ConversationState(conversation_id="c", turns=5)
        plans = []
        while (plan := state.plan(workload, factory, rng, max_model_len=limit)) is not None:
            plans.append(plan.prompt_tokens)
            state.answered(plan, answer_text=None, answer_tokens=None, server_prompt_tokens=plan.prompt_tokens,
                           conv=conv, factory=factory, rng=rng)
            if len(plans) == 3:
                break
        assert plans == [100, 160, 220][:planned]
    # the first turn too: 100 + 20 > 119
    state = ConversationState(conversation_id="c", turns=5)
    assert state.plan(workload, factory, random.Random(0), max_model_len=119) is None


def test_server_answers_go_into_the_history(factory):
    workload = _conv_workload(turns=2, answers="server", message_tokens=30)
    conv = workload.conversation
    rng = random.Random(3)
    state = ConversationState(conversation_id="c", turns=2)
    first = state.plan(workload, factory, rng, max_model_len=None)
    state.answered(first, answer_text=" the answer text", answer_tokens=3, server_prompt_tokens=100, conv=conv,
                   factory=factory, rng=rng)
    assert state.history == first.built.messages + [{"role": "assistant", "content": " the answer text"}]
    second = state.plan(workload, factory, rng, max_model_len=None)
    assert second.prompt_tokens == 100 + 3 + 10 + 30
    assert SIM_PROBE.count_messages(second.built.messages) == 143
    assert second.built.messages[:2] == state.history


def test_server_answers_without_a_length_leave_the_next_prompt_unknown(factory):
    workload = _conv_workload(turns=2, answers="server")
    conv = workload.conversation
    rng = random.Random(4)
    state = ConversationState(conversation_id="c", turns=2)
    first = state.plan(workload, factory, rng, max_model_len=None)
    state.answered(first, answer_text="hi", answer_tokens=None, server_prompt_tokens=100, conv=conv,
                   factory=factory, rng=rng)
    second = state.plan(workload, factory, rng, max_model_len=150)  # not checked: the length is unknown
    assert second is not None
    assert second.prompt_tokens is None and second.built.target_tokens == 0


def test_a_probe_failure_that_is_not_a_refusal_is_not_counted_as_too_long():
    def down(path, body):
        raise ConnectionError("the server went away")

    with pytest.raises(ConnectionError):
        measure_dataset(SOURCE, [DatasetEntry(index=0, line=1, prompt="hello there")], endpoint="chat", workload=WORKLOAD,
                        probe=TokenizerProbe(down, "m"), max_model_len=4096)



def test_a_conversation_keeps_the_workloads_shared_system_prefix_in_every_turn(factory):
    workload = Workload(prompt_tokens=100, output_tokens=20, system_prefix_tokens=40,
                        conversation=Conversation(turns=2, answers="fixed", message_tokens=30))
    rng = random.Random(0)
    state = ConversationState(conversation_id="u1/c0", turns=2, client="chat")
    first = state.plan(workload, factory, rng, max_model_len=None, seed=3)
    assert _roles(first.built.messages) == ["system", "user"]
    assert first.built.messages[0]["content"] == factory.system_prefix(40, 3)
    assert SIM_PROBE.count_messages(first.built.messages) == 100  # prompt_tokens includes the prefix
    state.answered(first, answer_text=None, answer_tokens=None, server_prompt_tokens=100,
                   conv=workload.conversation, factory=factory, rng=rng)
    second = state.plan(workload, factory, rng, max_model_len=None, seed=3)
    assert _roles(second.built.messages) == ["system", "user", "assistant", "user"]
    assert second.built.messages[0] == first.built.messages[0]
    assert SIM_PROBE.count_messages(second.built.messages) == second.prompt_tokens == 100 + 20 + 10 + 30
