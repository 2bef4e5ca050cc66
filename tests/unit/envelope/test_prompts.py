"""Prompt building against a fake tokenizer that behaves like a byte-level BPE with a chat template."""

import random

import pytest

from envelope.prompts import CANDIDATE_WORDS, PromptFactory, TokenizerProbe, calibrate, single_token_words

SINGLE = set(CANDIDATE_WORDS[:60])  # the fake tokenizer knows these as one " word" token
CHAT_OVERHEAD = 11  # <|im_start|>user\n ... <|im_end|>\n<|im_start|>assistant\n
SYSTEM_OVERHEAD = 5  # <|im_start|>system\n ... <|im_end|>\n


def _count_text(text: str) -> int:
    # words the tokenizer knows are one token; any other word splits into two pieces
    return sum(1 if w in SINGLE else 2 for w in text.split())


def fake_post(path: str, body: dict) -> dict:
    assert path == "/tokenize"
    if "messages" in body:
        n = CHAT_OVERHEAD
        for m in body["messages"]:
            n += _count_text(m["content"]) + (SYSTEM_OVERHEAD if m["role"] == "system" else 0)
        return {"count": n}
    text = body["prompt"]
    out = {"count": _count_text(text)}
    if body.get("return_token_strs"):
        strs = []
        for w in text.split():
            strs += [f"Ġ{w}"] if w in SINGLE else [f"Ġ{w[:1]}", w[1:]]
        out["token_strs"] = strs
    return out


def test_single_token_words_found_from_token_strings():
    probe = TokenizerProbe(fake_post, "m")
    assert set(single_token_words(probe)) == SINGLE


@pytest.mark.parametrize("target", [40, 64, 300, 3000])
def test_calibrated_prompts_have_exact_length(target):
    probe = TokenizerProbe(fake_post, "m")
    factory = calibrate(probe)
    assert factory.exact
    assert factory.chat_overhead_tokens == CHAT_OVERHEAD
    assert factory.system_overhead_tokens == SYSTEM_OVERHEAD
    rng = random.Random(target)
    assert probe.count_messages(factory.chat(target, rng).messages) == target
    assert probe.count_prompt(factory.completion(target, rng).text) == target
    prefix = factory.system_prefix(10, seed=0)
    built = factory.chat(target, rng, system_prefix=prefix, system_prefix_tokens=10)
    assert probe.count_messages(built.messages) == target


def test_prompts_differ_from_the_first_token_but_share_the_system_prefix():
    factory = calibrate(TokenizerProbe(fake_post, "m"))
    rng = random.Random(0)
    a = factory.chat(200, rng, system_prefix=factory.system_prefix(20, 7), system_prefix_tokens=20)
    b = factory.chat(200, rng, system_prefix=factory.system_prefix(20, 7), system_prefix_tokens=20)
    assert a.messages[0] == b.messages[0]
    assert a.messages[1]["content"].split()[:8] != b.messages[1]["content"].split()[:8]


def test_without_tokenize_lengths_are_flagged_as_estimates():
    factory = calibrate(None)
    assert not factory.exact
    assert isinstance(factory, PromptFactory)


def test_calibration_that_does_not_add_up_is_not_called_exact():
    def lying_post(path, body):
        out = fake_post(path, body)
        if "messages" in body and len(body["messages"][-1]["content"].split()) > 100:
            out["count"] += 3  # the template behaves differently for long content
        return out

    assert not calibrate(TokenizerProbe(lying_post, "m")).exact
