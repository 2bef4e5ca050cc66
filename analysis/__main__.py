"""``python -m analysis RUN_DIR`` (see :mod:`analysis.cli`)."""

from analysis.cli import main

raise SystemExit(main())
