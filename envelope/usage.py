"""Argument parsing shared by every command line: one-line errors and help that ends with an example.

``envelope`` and its aliases (``python -m server``, ``python -m analysis``,
``python -m server.sim``) build their parsers with :class:`OneLineParser`, so a
bad flag anywhere is one line naming the flag and where to read more, and the
caller decides the prefix and the exit status (2).
"""

from __future__ import annotations

import argparse
import textwrap
from typing import NoReturn

__all__ = ["UsageError", "OneLineParser", "HELP_FORMAT", "examples", "paragraph"]

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
