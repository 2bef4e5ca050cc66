"""The shipped sample files read cleanly, are what generate.py writes, and have the shape they promise."""

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from envelope.datasets import read_dataset
from envelope.traces import MOONCAKE_BLOCK_TOKENS, read_trace, trace_mean_rate_per_s

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
SAMPLE_FILES = ["sharegpt.json", "prompts.jsonl", "prompts.txt", "mooncake.jsonl", "trace.jsonl"]
MODEL_CONTEXT_TOKENS = 4096


@pytest.mark.parametrize(("name", "count"), [("sharegpt.json", 40), ("prompts.jsonl", 30), ("prompts.txt", 30)])
def test_datasets_read(name, count):
    entries = read_dataset(SAMPLES / name)
    assert len(entries) == count
    assert [e.index for e in entries] == list(range(count))


def test_sharegpt_has_system_turns_multi_turn_conversations_and_answers():
    entries = read_dataset(SAMPLES / "sharegpt.json")
    assert all(e.answer for e in entries)
    assert any(e.messages[0][0] == "system" for e in entries)
    prompt_words = [len(e.messages[-1][1].split()) for e in entries]
    assert 20 <= min(prompt_words) and max(prompt_words) <= 450
    text = (SAMPLES / "sharegpt.json").read_text()
    assert text.count('"from": "human"') > len(entries)  # some conversations go on after the first answer


def test_prompts_jsonl_mixes_prompts_and_messages():
    entries = read_dataset(SAMPLES / "prompts.jsonl")
    assert 0 < sum(e.prompt is not None for e in entries) < len(entries)
    lengths = [e.output_tokens for e in entries if e.output_tokens is not None]
    assert 0 < len(lengths) < len(entries)
    assert all(16 <= n <= 128 for n in lengths)


def test_mooncake_sample():
    entries = read_trace(SAMPLES / "mooncake.jsonl")
    assert len(entries) == 60
    assert 25 <= entries[-1].t_s - entries[0].t_s <= 35
    assert all(e.prompt_tokens + e.output_tokens <= MODEL_CONTEXT_TOKENS for e in entries)
    assert all(300 <= e.prompt_tokens <= 1500 and 16 <= e.output_tokens <= 64 for e in entries)
    # Several requests start with the same block, and a shared block is always a whole one.
    first_blocks = Counter(e.hash_ids[0] for e in entries)
    shared = {block for block, n in first_blocks.items() if n > 1}
    assert len(shared) >= 2
    for e in entries:
        if e.hash_ids[0] in shared:
            assert e.prompt_tokens > MOONCAKE_BLOCK_TOKENS
    # Blocks after the shared prefix are each used by one request only.
    uses = Counter(block for e in entries for block in set(e.hash_ids))
    assert sum(1 for n in uses.values() if n > 1) <= 6


def test_trace_sample():
    entries = read_trace(SAMPLES / "trace.jsonl")
    assert len(entries) == 40
    assert 15 <= entries[-1].t_s <= 25
    assert trace_mean_rate_per_s(entries) == pytest.approx(39 / entries[-1].t_s)
    assert any(e.session_id for e in entries) and not all(e.session_id for e in entries)
    assert all(50 <= e.prompt_tokens <= 600 and 16 <= e.output_tokens <= 64 for e in entries)


@pytest.mark.parametrize("name", SAMPLE_FILES)
def test_samples_are_small(name):
    assert (SAMPLES / name).stat().st_size < 200_000


def test_regenerating_gives_the_same_bytes(tmp_path):
    subprocess.run([sys.executable, str(SAMPLES / "generate.py"), str(tmp_path)], check=True, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(SAMPLE_FILES)
    for name in SAMPLE_FILES:
        assert (tmp_path / name).read_bytes() == (SAMPLES / name).read_bytes(), name
