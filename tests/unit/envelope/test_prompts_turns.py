"""Calibration against the simulator's tokenizer: the per-turn overhead of a chat, ``text_of``, ``count_text``.

The probe's ``post`` callable is the simulator's ``/tokenize`` logic called directly (no network), with the
simulator's default template: 5 tokens per message, 6 for the generation prompt, no special prompt tokens.
"""

import random

import pytest

from envelope.prompts import PromptFactory, TokenizerProbe, calibrate
from server.sim.config import SimConfig
from server.sim.tokenizer import chat_tokens, count_chat_tokens, count_text_tokens, split_tokens


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


def _chat_count(config: SimConfig, messages: list[dict]) -> int:
    return count_chat_tokens(messages, message_overhead_tokens=config.chat_message_overhead_tokens,
                             generation_prompt_tokens=config.chat_generation_prompt_tokens)


def _turn_overhead(config: SimConfig) -> int:
    """What one more assistant + user pair adds to a chat beyond their own words, per the simulator."""
    first = [{"role": "user", "content": " a b c"}]
    answer, message = " d e f g", " h i"
    longer = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": message}]
    return (_chat_count(config, longer) - _chat_count(config, first)
            - count_text_tokens(answer) - count_text_tokens(message))


@pytest.mark.parametrize(
    "config",
    [
        SimConfig(),
        SimConfig(chat_message_overhead_tokens=3, chat_generation_prompt_tokens=2, prompt_special_tokens=1),
        SimConfig(chat_message_overhead_tokens=0, chat_generation_prompt_tokens=4),
    ],
    ids=["default", "3-2-bos", "no-message-overhead"],
)
def test_calibrate_measures_the_simulators_overheads(config):
    factory = calibrate(TokenizerProbe(sim_post(config), "sim-model"))
    assert factory.exact
    m, g = config.chat_message_overhead_tokens, config.chat_generation_prompt_tokens
    assert factory.chat_overhead_tokens == m + g
    assert factory.completion_overhead_tokens == config.prompt_special_tokens
    assert factory.system_overhead_tokens == m
    # one assistant message and one user message: their template tokens, and nothing else
    assert factory.turn_overhead_tokens == 2 * m
    assert factory.turn_overhead_tokens == _turn_overhead(config)


def test_default_simulator_turn_overhead_is_ten():
    assert _turn_overhead(SimConfig()) == 10
    assert calibrate(TokenizerProbe(sim_post(SimConfig()), "sim-model")).turn_overhead_tokens == 10


def test_turn_overhead_predicts_a_three_message_chat_exactly():
    config = SimConfig()
    probe = TokenizerProbe(sim_post(config), "sim-model")
    factory = calibrate(probe)
    rng = random.Random(3)
    first = factory.chat(150, rng)
    assert probe.count_messages(first.messages) == 150
    answer, message = factory.text_of(37, rng), factory.text_of(21, rng)
    chat = first.messages + [{"role": "assistant", "content": answer}, {"role": "user", "content": message}]
    assert probe.count_messages(chat) == 150 + 37 + factory.turn_overhead_tokens + 21 == 218


def test_text_of_has_exactly_n_single_token_words():
    factory = calibrate(TokenizerProbe(sim_post(SimConfig()), "sim-model"))
    text = factory.text_of(25, random.Random(0))
    assert text.startswith(" ")
    words = text.split()
    assert len(words) == 25
    assert set(words) <= set(factory.words)
    assert count_text_tokens(text) == 25
    # the same rng seed gives the same text, another seed another
    assert factory.text_of(25, random.Random(0)) == text
    assert factory.text_of(25, random.Random(1)) != text


def test_text_of_zero_still_gives_one_word():
    factory = PromptFactory(words=["a", "b"], chat_overhead_tokens=0, completion_overhead_tokens=0, exact=True)
    assert len(factory.text_of(0, random.Random(0)).split()) == 1


def test_count_text_sends_no_special_tokens():
    config = SimConfig(prompt_special_tokens=2)
    seen: list[dict] = []

    def post(path, body):
        seen.append(body)
        return sim_post(config)(path, body)

    probe = TokenizerProbe(post, "sim-model")
    assert probe.count_text(" one two three") == 3
    assert probe.count_prompt(" one two three") == 5
    assert seen[0] == {"model": "sim-model", "prompt": " one two three", "add_special_tokens": False}


def test_factory_defaults_to_no_turn_overhead():
    factory = PromptFactory(words=["a"], chat_overhead_tokens=4, completion_overhead_tokens=0, exact=False)
    assert factory.turn_overhead_tokens == 0
    assert calibrate(None).turn_overhead_tokens == 0
