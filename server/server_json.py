"""``RUN/server.json``: what the run was measured against; its one writer.

Two sources fill it, with one shape (``docs/run-directory.md``): the launcher
(:meth:`server.launcher.VllmServer.start`, ``launched: true`` with the command,
environment, profile and KV-cache sizing) and the probe of a server someone else
runs (:func:`server.probe.probe_server`, ``launched: false``). Both go through
:func:`write_server_json`, which adds ``schema_version``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from envelope.rundir import SERVER_FILE, atomic_write_json

__all__ = ["SERVER_SCHEMA_VERSION", "write_server_json", "server_json_path"]

SERVER_SCHEMA_VERSION = 1


def server_json_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / SERVER_FILE


def write_server_json(run_dir: str | os.PathLike[str], info: Mapping[str, Any]) -> dict[str, Any]:
    """Write the launcher's or the probe's description of the server; returns what was written."""
    data = {"schema_version": SERVER_SCHEMA_VERSION, **info}
    atomic_write_json(server_json_path(run_dir), data)
    return data
