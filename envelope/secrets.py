"""API keys: where they come from, and keeping them out of everything we write.

A key is read from an environment variable or a file, held in a
:class:`Secret` whose ``repr``/``str`` never show it, and scrubbed from any
text (command lines, log tails, error details) with :func:`redact`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

__all__ = [
    "Secret",
    "SecretError",
    "resolve_api_key",
    "redact",
    "redact_argv",
    "REDACTED",
    "DEFAULT_API_KEY_ENV",
]

REDACTED = "***"
DEFAULT_API_KEY_ENV = "ENVELOPE_API_KEY"
# Command-line flags whose next argument is a secret.
_SECRET_FLAGS = ("--api-key", "--api_key", "--token", "--hf-token")


class Secret:
    """A secret string that does not print itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({REDACTED})"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class SecretError(ValueError):
    """The key source was named but could not be read."""


def resolve_api_key(
    *,
    env_var: str | None = None,
    file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Secret | None:
    """The API key from ``file`` (its first non-blank line, stripped) or the environment variable ``env_var``.

    With neither given, ``ENVELOPE_API_KEY`` is consulted. A named file that is
    missing or empty is an error; an unset variable simply means no key.
    """
    environ = os.environ if environ is None else environ
    if file is not None:
        path = Path(file)
        try:
            value = path.read_text(encoding="utf-8").strip().splitlines()
        except OSError as exc:
            raise SecretError(f"API key file {path}: cannot read ({exc.strerror or exc})") from None
        if not value or not value[0].strip():
            raise SecretError(f"API key file {path}: is empty")
        return Secret(value[0].strip())
    value = environ.get(env_var or DEFAULT_API_KEY_ENV, "")
    return Secret(value) if value else None


def redact(text: str, secrets: Iterable[Secret | str | None]) -> str:
    """``text`` with every occurrence of each secret replaced by ``***``."""
    for secret in secrets:
        if secret is None:
            continue
        value = secret.get() if isinstance(secret, Secret) else secret
        if value:
            text = text.replace(value, REDACTED)
    return text


def redact_argv(argv: Iterable[str], secrets: Iterable[Secret | str | None] = ()) -> list[str]:
    """A copy of a command line with secret flag values (``--api-key X``, ``--api-key=X``) and known secrets masked."""
    out: list[str] = []
    hide_next = False
    secrets = list(secrets)
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        flag, eq, _ = arg.partition("=")
        if flag in _SECRET_FLAGS:
            if eq:
                out.append(f"{flag}={REDACTED}")
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(redact(arg, secrets))
    return out
