"""Counting with the served model's own tokenizer, for a server without /tokenize or usage.

The counts are checked against what two real servers counted for the same text: the capability
probe's recorded streams (tests/fixtures/capabilities/) carry vLLM's and transformers serve's
usage.prompt_tokens for the probe's chat message and raw prompt on the tiny model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from envelope.tokenizer import LocalTokenizer, find_local_tokenizer

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "capabilities"


@pytest.fixture(scope="module")
def tiny_dir():
    from server.tiny_model import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return LocalTokenizer(tiny_dir)


def _server_prompt_tokens(recording: str, path: str) -> set[int]:
    rec = json.loads((FIXTURES / recording).read_text())
    bodies = [e["body"] for e in rec["exchanges"] if e["method"] == "POST" and e["path"] == path
              and e["status"] == 200]
    return {int(n) for body in bodies for n in re.findall(r'"prompt_tokens": ?(\d+)', body)}


def test_find_local_tokenizer(tmp_path, tiny_dir):
    assert find_local_tokenizer([None, "", "Qwen/Qwen3-8B", str(tmp_path), tiny_dir]) == str(Path(tiny_dir).resolve())
    # transformers serve names its model "<path>@<revision>"
    assert find_local_tokenizer([f"{tiny_dir}@main"]) == str(Path(tiny_dir).resolve())
    assert find_local_tokenizer([str(tmp_path / "missing"), str(tmp_path)]) is None


@pytest.mark.parametrize("recording", ["vllm.json", "transformers-serve.json"])
def test_prompts_count_as_the_servers_counted_them(tok, recording):
    from envelope.capabilities import _probe_body

    chat = _probe_body("/v1/chat/completions", "m", forced=False, stream_options=True)["messages"]
    prompt = _probe_body("/v1/completions", "m", forced=False, stream_options=True)["prompt"]
    assert {tok.count_messages(chat)} == _server_prompt_tokens(recording, "/v1/chat/completions")
    assert {tok.count_prompt(prompt)} == _server_prompt_tokens(recording, "/v1/completions")


def test_an_answer_counts_as_the_tokenizer_file_encodes_it(tok, tiny_dir):
    """count_text is the plain encoding (no special tokens), as an independent reader of tokenizer.json gives it."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(Path(tiny_dir) / "tokenizer.json"))
    for text in (" detail detail detail", "Count from one to twenty.", " 1, 2, 3", "", "naïve café"):
        assert tok.count_text(text) == len(raw.encode(text, add_special_tokens=False).ids), text
    assert tok.count_text(" detail detail detail") == 3
    assert tok.token_strings(" detail detail") == raw.encode(" detail detail", add_special_tokens=False).tokens


def test_the_prompt_factory_calibrates_on_the_local_tokenizer(tok):
    """A server without /tokenize gets exact prompt lengths from the local tokenizer."""
    import random

    from envelope.prompts import calibrate

    factory = calibrate(tok)
    assert factory.exact
    for n in (16, 64, 300):
        built = factory.chat(n, random.Random(n))
        assert tok.count_messages(built.messages) == n
        built = factory.completion(n, random.Random(n))
        assert tok.count_prompt(built.text) == n
