import hashlib
import json
from pathlib import Path

import pytest

from server.tiny_model import (
    MARKER_FILE,
    TinyModelError,
    build_tiny_model,
    default_tiny_model_dir,
    ensure_tiny_model,
    kv_bytes_per_token,
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "a", seed=0)


def test_kv_bytes_per_token():
    # 2 (K, V) x 4 layers x 2 KV heads x 64 head_dim x 2 bytes (bf16)
    assert kv_bytes_per_token(num_hidden_layers=4, num_key_value_heads=2, head_dim=64, dtype_bytes=2) == 2048
    # Qwen3-8B: 36 layers, 8 KV heads, head_dim 128, bf16
    assert kv_bytes_per_token(num_hidden_layers=36, num_key_value_heads=8, head_dim=128, dtype_bytes=2) == 147456


def test_default_dir_reads_env_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("ENVELOPE_HOME", str(tmp_path))
    assert default_tiny_model_dir() == tmp_path / "models" / "tiny-qwen3-seed0"
    monkeypatch.delenv("ENVELOPE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_tiny_model_dir() == tmp_path / "home" / ".cache" / "envelope" / "models" / "tiny-qwen3-seed0"


def test_same_seed_same_bytes_other_seed_other_weights(built, tmp_path):
    again = build_tiny_model(tmp_path / "b", seed=0)
    other = build_tiny_model(tmp_path / "c", seed=1)
    for name in ["model.safetensors", "tokenizer.json", "config.json", "generation_config.json", MARKER_FILE]:
        assert _sha(built / name) == _sha(again / name), name
    assert _sha(built / "model.safetensors") != _sha(other / "model.safetensors")
    assert _sha(built / "tokenizer.json") == _sha(other / "tokenizer.json")  # the tokenizer does not depend on the seed


def test_config_marker_and_files(built):
    config = json.loads((built / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 64)
    assert config["dtype"] == "bfloat16"
    marker = json.loads((built / MARKER_FILE).read_text())
    assert marker["seed"] == 0
    assert marker["num_parameters"] == 4_197_120  # 4096*256 embeddings + 4 x 787,072 per layer + 256 final norm
    assert marker["kv_bytes_per_token_bf16"] == 2048
    assert marker["tokenizer"]["vocab_size"] <= config["vocab_size"]
    # bf16 weights: 2 bytes per parameter plus a small safetensors header
    assert 2 * 4_197_120 < (built / "model.safetensors").stat().st_size < 2 * 4_197_120 + 10_000


def test_tokenizer_chat_template_and_special_tokens(built):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hello world"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    ids = tok("def f(x):\n    return x")["input_ids"]
    assert tok.decode(ids) == "def f(x):\n    return x"  # byte-level: round-trips exactly
    assert max(ids) < 4096
    gen = json.loads((built / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]


def test_ensure_builds_once_and_refuses_a_foreign_directory(built, tmp_path, monkeypatch):
    target = tmp_path / "models" / "tiny"
    calls = []

    def fake_build(out, *, seed):
        calls.append(seed)
        Path(out, MARKER_FILE).write_text("{}")
        return Path(out)

    monkeypatch.setattr("server.tiny_model.build_tiny_model", fake_build)
    assert ensure_tiny_model(target, seed=5) == target
    assert ensure_tiny_model(target, seed=5) == target
    assert calls == [5]
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny"]  # no temp directory left behind

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("x")
    with pytest.raises(TinyModelError, match="exists but is not a tiny model built by envelope"):
        ensure_tiny_model(foreign)


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def failing_build(out, *, seed):
        Path(out, "half-written").write_text("x")
        raise KeyboardInterrupt

    monkeypatch.setattr("server.tiny_model.build_tiny_model", failing_build)
    with pytest.raises(KeyboardInterrupt):
        ensure_tiny_model(tmp_path / "m" / "tiny")
    assert list((tmp_path / "m").iterdir()) == []
