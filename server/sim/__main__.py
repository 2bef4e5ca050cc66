"""``python -m server.sim``: the same command as ``envelope sim`` (see :mod:`server.sim.cli`)."""

import sys

from server.sim.cli import main, parse_fault

__all__ = ["main", "parse_fault"]

if __name__ == "__main__":
    sys.exit(main())
