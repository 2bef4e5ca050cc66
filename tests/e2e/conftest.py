"""E2E fixtures: one real ``envelope run`` that launches the CPU vLLM, shared by two test files.

``launched_run`` runs the capstone's chat search (``envelope run --profile cpu-tiny --quick
--duration-scale 0.25``, the key from ``--api-key-file``) and watches it while it runs: every command
line and environment of the processes it started, read from ``/proc``, and whether the launched server
refused a request without the key. test_envelope_run.py checks the run and its report (the search's
bracket, what broke first, the token cross-check, no server left behind); test_secrets.py checks where
the key and the prompt text went. One launch of vLLM serves both (each used to launch its own, ~60 s of CI).
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

RUN_TIMEOUT_S = 1150


def _read_proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


@pytest.fixture(scope="session")
def launched_run(tmp_path_factory):
    """The capstone's chat search through ``envelope run --profile cpu-tiny``, watched while it runs.

    A dict: ``rc``, ``key``, ``run_dir``, ``stdout`` and ``stderr`` (bytes), ``cmdlines`` (every command
    line seen per pid: vLLM renames its own processes), ``environs`` (each pid's environment, read when
    first seen), ``server_tree`` (the vLLM API server and its descendants), and the launched server's
    answers to ``/v1/models`` without the key (``unauthorized``) and with it (``authorized``).
    """
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    tmp = tmp_path_factory.mktemp("launched-run")
    # the chat search only (the demo runs every pass; tests/integration analyses the fixed ones)
    scenario = yaml.safe_load((REPO / "scenarios" / "capstone.yaml").read_text())
    scenario["passes"] = [p for p in scenario["passes"] if p["name"] == "chat-search"]
    capstone = tmp / "capstone.yaml"
    capstone.write_text(yaml.safe_dump(scenario, sort_keys=False))
    key = f"sk-e2e-{secrets.token_hex(16)}"
    key_file = tmp / "key.txt"
    key_file.write_text(key + "\n")
    out = tmp / "runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVELOPE_")}
    # to files, not pipes: nothing reads a pipe while the run goes on, and its live progress could fill one
    stdout_path, stderr_path = tmp / "stdout.txt", tmp / "stderr.txt"
    with open(stdout_path, "wb") as stdout_file, open(stderr_path, "wb") as stderr_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "envelope.cli", "run", "--scenario", str(capstone), "--profile", "cpu-tiny",
             "--quick", "--duration-scale", "0.25", "--api-key-file", str(key_file), "--out", str(out)],
            cwd=REPO, env=env, stdout=stdout_file, stderr=stderr_file)
    cmdlines: dict[int, set[bytes]] = {}  # every command line seen per process (vLLM renames its own)
    environs: dict[int, bytes] = {}
    server_tree: set[int] = set()  # the vLLM API server and its descendants
    unauthorized_status = authorized_status = None
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            except psutil.Error:
                tree = []
            for pid in tree:
                cmdline = _read_proc(pid, "cmdline")
                if cmdline:
                    cmdlines.setdefault(pid, set()).add(cmdline)
                    if pid not in environs:
                        environs[pid] = _read_proc(pid, "environ")
                if b"vllm.entrypoints" in cmdline:
                    try:
                        server_tree.update([pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)])
                    except psutil.Error:
                        pass
            server_json = next(out.glob("*/server.json"), None) if out.exists() else None
            if server_json is not None and unauthorized_status is None:
                base_url = json.loads(server_json.read_text())["base_url"]
                unauthorized_status = httpx.get(f"{base_url}/v1/models", timeout=30).status_code
                authorized_status = httpx.get(f"{base_url}/v1/models", timeout=30,
                                              headers={"Authorization": f"Bearer {key}"}).status_code
            time.sleep(0.25)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (run_dir,) = out.iterdir()
    return {"rc": proc.returncode, "key": key, "run_dir": run_dir, "stdout": stdout_path.read_bytes(),
            "stderr": stderr_path.read_bytes(), "cmdlines": cmdlines, "environs": environs,
            "server_tree": server_tree, "unauthorized": unauthorized_status, "authorized": authorized_status}
