"""The served model's own tokenizer, read from its directory on this machine.

For a server without ``/tokenize`` (prompt sizing) or without usage in its streams
(token counting), Envelope counts tokens itself with the tokenizer the server
loaded, when that model's files are on this machine: the launcher's model
directory, a path the server lists as its model, or ``--tokenizer``. The answers
are those of vLLM's ``/tokenize``: a raw prompt with special tokens, a chat with
the model's chat template and the generation prompt, an answer's text alone.
Nothing is downloaded (``local_files_only``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["LocalTokenizer", "find_local_tokenizer"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def find_local_tokenizer(candidates: Iterable[str | os.PathLike[str] | None]) -> str | None:
    """The first candidate that is a directory holding a tokenizer (``tokenizer.json`` and the like)."""
    for candidate in candidates:
        if not candidate:
            continue
        text = str(candidate).split("@", 1)[0]  # transformers serve names its model "<path>@main"
        path = Path(text).expanduser()
        try:
            if path.is_dir() and any((path / name).is_file() for name in _TOKENIZER_FILES):
                return str(path.resolve())
        except OSError:
            continue
    return None


class LocalTokenizer:
    """Counts tokens as the server's ``/tokenize`` would; a drop-in for :class:`envelope.prompts.TokenizerProbe`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from transformers import AutoTokenizer  # heavy: imported only where a server lacks what we need

        self.path = str(path)
        self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)

    def __repr__(self) -> str:
        return f"LocalTokenizer(path={self.path!r})"

    def _ids(self, text: str, *, special: bool) -> list[int]:
        return list(self._tok(text, add_special_tokens=special)["input_ids"])

    def count_prompt(self, text: str) -> int:
        """Tokens of a raw (completions) prompt, with the special tokens the server adds."""
        return len(self._ids(text, special=True))

    def count_messages(self, messages: Sequence[dict]) -> int:
        """Tokens of a chat as the server renders it: the model's chat template and the generation prompt."""
        out = self._tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return len(ids)

    def count_text(self, text: str) -> int:
        """Tokens of ``text`` alone (no special tokens): an answer's length as the model counts it."""
        return len(self._ids(text, special=False))

    def token_strings(self, text: str) -> list[str]:
        return list(self._tok.convert_ids_to_tokens(self._ids(text, special=False)))
