"""Argument parsing shared by every command line: one-line errors and help that ends with an example.

``envelope`` and its aliases (``python -m server``, ``python -m analysis``,
``python -m server.sim``) build their parsers with :class:`OneLineParser`, so a
bad flag anywhere is one line naming the flag and where to read more, and the
caller decides the prefix and the exit status (2).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import NoReturn, Sequence, TextIO

__all__ = ["UsageError", "OneLineParser", "HELP_FORMAT", "examples", "paragraph", "parse_or_say"]

# epilogs keep their line breaks: an example is a command to copy
HELP_FORMAT = argparse.RawDescriptionHelpFormatter


class UsageError(Exception):
    """Bad input found before anything started; ``str()`` is the one line to print (exit status 2)."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that raises :class:`UsageError` instead of printing its usage block and exiting.

    Subparsers made from it are of the same class (argparse's default), so this holds at every level.
    """

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see: {self.prog} --help)")


def examples(*commands: str) -> str:
    """An epilog: ``example:`` (or ``examples:``) and each command on its own indented line."""
    head = "example:" if len(commands) == 1 else "examples:"
    return "\n".join([head, *(f"  {c}" for c in commands)])


def paragraph(text: str, width: int = 78) -> str:
    """``text`` filled to ``width`` columns: with :data:`HELP_FORMAT` a description keeps its line breaks."""
    return textwrap.fill(" ".join(text.split()), width)


def parse_or_say(parser: argparse.ArgumentParser, argv: Sequence[str] | None, *, prefix: str,
                 err: TextIO | None = None) -> argparse.Namespace | None:
    """Parse ``argv``; on bad input print ``prefix`` and the one line to ``err`` and return None (exit 2)."""
    try:
        return parser.parse_args(argv)
    except UsageError as exc:
        print(f"{prefix}{exc}", file=err or sys.stderr)
        return None
