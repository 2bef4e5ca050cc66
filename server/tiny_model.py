"""Build a tiny Qwen3-architecture model that a real vLLM can serve without a model hub.

The weights are random (from a seeded generator) and the tokenizer is a byte-level
BPE trained on a fixed, sorted list of Python standard-library source files, so a
build needs no network and takes seconds. The model's output is gibberish; what it
is for is exercising a real vLLM server: batching, queueing, KV-cache pressure,
streaming, metrics. The same seed gives the same files.

KV cache per token (see server/README.md):
2 (K and V) x 4 layers x 2 KV heads x 64 head_dim x 2 bytes (bfloat16) = 2,048 bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from envelope.rundir import file_sha256

__all__ = [
    "TINY_MODEL_CONFIG",
    "TINY_MODEL_DTYPE",
    "TinyModelError",
    "build_tiny_model",
    "default_tiny_model_dir",
    "ensure_tiny_model",
    "kv_bytes_per_token",
]

BUILDER_VERSION = 1
MARKER_FILE = "envelope-model.json"

# Numbers from FACTS.md: small enough to build in seconds and serve ~300-500 tokens/s
# on two CPU cores, large enough (4 layers, GQA 4:2) to behave like a real decoder.
TINY_MODEL_CONFIG: dict[str, Any] = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}
TINY_MODEL_DTYPE = "bfloat16"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# Qwen-style ChatML; OpenAI content parts (lists of {"type": "text"}) are joined.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Fixed training text for the tokenizer: code plus English docstrings. Sorted; a
# missing file (a trimmed Python install) is skipped and recorded in the marker.
CORPUS_FILES = sorted(
    [
        "argparse.py",
        "collections/__init__.py",
        "dataclasses.py",
        "email/message.py",
        "http/client.py",
        "json/decoder.py",
        "json/encoder.py",
        "logging/__init__.py",
        "pathlib.py",
        "random.py",
        "string.py",
        "textwrap.py",
        "typing.py",
    ]
)


class TinyModelError(RuntimeError):
    """The tiny model could not be built (missing packages, unwritable directory)."""


def default_tiny_model_dir() -> Path:
    """``$ENVELOPE_HOME/models/tiny-qwen3-seed0``; ``ENVELOPE_HOME`` defaults to ``~/.cache/envelope``."""
    home = os.environ.get("ENVELOPE_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "envelope")
    return Path(home) / "models" / "tiny-qwen3-seed0"


def kv_bytes_per_token(*, num_hidden_layers: int, num_key_value_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """KV-cache bytes one token occupies: K and V, for every layer and KV head."""
    return 2 * num_hidden_layers * num_key_value_heads * head_dim * dtype_bytes


def _corpus_paths() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [stdlib / name for name in CORPUS_FILES if (stdlib / name).is_file()]


def _train_tokenizer(paths: list[Path], vocab_size: int):
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise TinyModelError(f"the tiny model needs 'tokenizers' ({exc}); pip install 'llm-envelope[cpu]'") from None
    if not paths:
        raise TinyModelError("no tokenizer training text: none of the standard-library corpus files exist")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in paths]
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def build_tiny_model(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write the tiny model (weights, config, tokenizer, generation config) into ``out_dir``.

    Deterministic for a given ``seed``. Does not touch the process's global RNG state.
    """
    try:
        import torch
        from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise TinyModelError(f"the tiny model needs torch and transformers ({exc}); pip install 'llm-envelope[cpu]'") from None

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = _corpus_paths()
    tok = _train_tokenizer(paths, TINY_MODEL_CONFIG["vocab_size"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=TINY_MODEL_CONFIG["max_position_embeddings"],
    )
    eos_id = tok.token_to_id(EOS_TOKEN)
    pad_id = tok.token_to_id(PAD_TOKEN)

    config = Qwen3Config(
        **TINY_MODEL_CONFIG,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype=TINY_MODEL_DTYPE,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model = model.to(getattr(torch, TINY_MODEL_DTYPE))
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard progress bar is noise in `python -m server up`
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    fast.save_pretrained(out)
    GenerationConfig(bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id).save_pretrained(out)

    marker = {
        "builder": "envelope.server.tiny_model",
        "builder_version": BUILDER_VERSION,
        "seed": seed,
        "architecture": "Qwen3ForCausalLM",
        "config": TINY_MODEL_CONFIG,
        "dtype": TINY_MODEL_DTYPE,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "kv_bytes_per_token_bf16": kv_bytes_per_token(
            num_hidden_layers=TINY_MODEL_CONFIG["num_hidden_layers"],
            num_key_value_heads=TINY_MODEL_CONFIG["num_key_value_heads"],
            head_dim=TINY_MODEL_CONFIG["head_dim"],
            dtype_bytes=2,
        ),
        "tokenizer": {
            "type": "byte-level BPE",
            "vocab_size": tok.get_vocab_size(),
            "special_tokens": SPECIAL_TOKENS,
            "corpus": [
                {"file": str(p.relative_to(sysconfig.get_paths()["stdlib"])), "sha256": file_sha256(p)} for p in paths
            ],
        },
    }
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return out


def ensure_tiny_model(model_dir: str | os.PathLike[str] | None = None, *, seed: int = 0) -> Path:
    """``model_dir`` (default :func:`default_tiny_model_dir`), built first if it is missing.

    Builds into a temporary sibling directory and renames it into place, so an
    interrupted build leaves nothing half-written and concurrent builders are safe.
    """
    target = Path(model_dir) if model_dir is not None else default_tiny_model_dir()
    if (target / MARKER_FILE).is_file():
        return target
    if target.exists() and any(target.iterdir()):
        raise TinyModelError(f"{target} exists but is not a tiny model built by envelope (no {MARKER_FILE})")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build_tiny_model(tmp, seed=seed)
        if target.exists():
            target.rmdir()  # empty (checked above); a rename onto it would fail on some systems
        os.rename(tmp, target)
    except OSError:
        # Another builder won the race: use its result.
        if (target / MARKER_FILE).is_file():
            return target
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target

