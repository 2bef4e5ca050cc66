"""Secrets and privacy: the API key and the prompt text stay out of everything a run leaves behind.

One full ``envelope run --quick`` against the real CPU vLLM it launches (the key from a file) is
searched everywhere: every file of the run directory (records, run.json, server.json, server.log,
Locust's logs, CSVs and HTML report, our report), what the command printed, and the command lines of
every process it started, read from ``/proc/<pid>/cmdline`` while they ran (vLLM takes the key from
``VLLM_API_KEY`` and Locust from ``ENVELOPE_API_KEY``, so it must be in those two environments and
nowhere else). That run is the ``launched_run`` fixture (tests/e2e/conftest.py): the capstone's chat
search, whose report and search test_envelope_run.py checks; one launch of vLLM serves both files.
Two short runs against the simulated server cover the key from a named environment variable and the
``--record-text`` opt-in, which also shows that the prompt-text detector finds prompts when they are there.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from envelope.prompts import CANDIDATE_WORDS
from server.sim.config import SimConfig
from server.sim.server import SimServer

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e]

# Prompts are runs of single-token words drawn at random (envelope.prompts); 16 of them in a row
# do not occur in prose, logs or reports, and every prompt of these scenarios is longer than that.
_WORD = "(?:" + "|".join(sorted(map(re.escape, set(CANDIDATE_WORDS)), key=len, reverse=True)) + ")"
PROMPT_RUN = re.compile(rf"\b{_WORD}(?: {_WORD}){{15,}}\b".encode())
SIM_COMPLETION_RUN = re.compile(rb"(?: tok){8,}")  # the simulated server's completion text

TINY = """\
name: tiny
seed: 7
defaults:
  client: fasthttp
  timeouts: {connect_s: 5, first_token_s: 10, total_s: 10}
  workload: {prompt_tokens: 48, output_tokens: 12, fixed_output: true}
passes:
  - name: tiny
    stages:
      - {users: 2, duration_s: 3}
"""


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVELOPE_")}
    env.update(extra)
    return env


def files_containing(root: Path, pattern: bytes | re.Pattern[bytes]) -> list[str]:
    hits = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        found = pattern.search(data) if isinstance(pattern, re.Pattern) else pattern in data
        if found:
            hits.append(str(path.relative_to(root)))
    return hits


# --------------------------------------------------------------------------- one real run


# launched_run (tests/e2e/conftest.py): the capstone's chat search, the key from --api-key-file, watched while it ran


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1200)
def test_real_run_completed_and_the_server_enforced_the_key(launched_run):
    assert launched_run["rc"] == 0, launched_run["stderr"].decode(errors="replace")[-3000:]
    info = json.loads((launched_run["run_dir"] / "run.json").read_text())
    assert info["status"] == "complete"
    assert info["options"]["api_key"] == "***"
    # the key was in force: without it the launched server refused, with it it answered
    assert (launched_run["unauthorized"], launched_run["authorized"]) == (401, 200)
    server = json.loads((launched_run["run_dir"] / "server.json").read_text())
    assert server["api_key_set"] is True and server["env"]["VLLM_API_KEY"] == "***"


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1200)
def test_key_is_in_no_file_log_or_report_of_the_run(launched_run):
    run_dir, key = launched_run["run_dir"], launched_run["key"].encode()
    for part in ("run.json", "server.json", "server.log", "scenario.yaml", "locust/locust.log",
                 "locust/report.html", "locust/locust_stats.csv", "report/envelope.md", "report/envelope.html"):
        assert (run_dir / part).is_file(), f"{part} missing: the search below would not cover it"
    assert next((run_dir / "records").glob("*.jsonl")).stat().st_size > 0
    assert files_containing(run_dir, key) == []
    assert key not in launched_run["stdout"] and key not in launched_run["stderr"]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1200)
def test_key_is_in_no_command_line_and_only_in_the_server_and_locust_environments(launched_run):
    key = launched_run["key"].encode()
    seen = [(pid, cmd) for pid, cmds in launched_run["cmdlines"].items() for cmd in cmds]
    api_server = next((pid for pid, cmd in seen if b"vllm.entrypoints" in cmd), None)
    assert api_server is not None, "the vLLM API server was never seen"
    assert len(launched_run["server_tree"]) >= 2, "vLLM's engine process was never seen"
    assert any(cmd.startswith(b"VLLM::") for pid, cmd in seen if pid in launched_run["server_tree"]), seen
    assert any(b"-m\0locust\0" in cmd for _, cmd in seen), "Locust was never seen"
    leaks = [(pid, cmd.replace(b"\0", b" ")[:200]) for pid, cmd in seen if key in cmd]
    assert leaks == []
    # vLLM gets the key from its environment (readable only by the same user), as VLLM_API_KEY
    assert b"VLLM_API_KEY=" + key + b"\0" in launched_run["environs"][api_server]
    # ... and Locust, which sends it, as ENVELOPE_API_KEY; no other process of the run has it (the envelope
    # command read it from --api-key-file), and neither the server nor Locust under the other's name
    locust = {pid for pid, cmd in seen if b"-m\0locust\0" in cmd}
    # vLLM's processes (its tree, or renamed VLLM::… even if seen before its tree was)
    server = launched_run["server_tree"] | {pid for pid, cmd in seen if cmd.startswith(b"VLLM::") or b"vllm" in cmd}
    holders = {pid for pid, env in launched_run["environs"].items() if key in env}
    assert api_server in holders and holders & locust, (holders, server, locust)
    assert holders <= server | locust, (holders, server, locust)
    for pid in holders:
        name = b"ENVELOPE_API_KEY=" if pid in locust else b"VLLM_API_KEY="
        assert name + key + b"\0" in launched_run["environs"][pid], pid


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1200)
def test_no_prompt_or_completion_text_without_opting_in(launched_run):
    run_dir = launched_run["run_dir"]
    records = [json.loads(line) for path in (run_dir / "records").glob("*.jsonl")
               for line in path.read_bytes().splitlines()]
    assert len(records) >= 5
    assert {(r["prompt_text"], r["completion_text"]) for r in records} == {(None, None)}
    assert files_containing(run_dir, PROMPT_RUN) == []
    assert PROMPT_RUN.search(launched_run["stdout"] + launched_run["stderr"]) is None


# --------------------------------------------------------------------------- the simulated server


@pytest.fixture(scope="module")
def sim_runs(tmp_path_factory):
    """Two runs against a key-protected simulated server, the key in ``MY_LLM_KEY``: plain, and ``--record-text``."""
    tmp = tmp_path_factory.mktemp("secrets-sim")
    key = f"sk-sim-secret-{secrets.token_hex(16)}"
    scenario = tmp / "tiny.yaml"
    scenario.write_text(TINY)
    sim = SimServer(SimConfig(api_key=key, ttft_s=0.02, itl_s=0.005)).start_in_subprocess()
    runs = {}
    try:
        # only the plain run needs the report (searched for the key); the other one is about records
        for name, extra in (("plain", []), ("record-text", ["--record-text", "--no-analysis"])):
            out = tmp / name
            proc = subprocess.run(
                [sys.executable, "-m", "envelope.cli", "run", "--scenario", str(scenario), "--host", sim.base_url,
                 "--api-key-env", "MY_LLM_KEY", "--out", str(out), *extra],
                cwd=REPO, env=child_env(MY_LLM_KEY=key), capture_output=True, timeout=300)
            assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
            (run_dir,) = out.iterdir()
            runs[name] = {"run_dir": run_dir, "stdout": proc.stdout, "stderr": proc.stderr}
    finally:
        sim.stop()
    return key, runs


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_key_from_a_named_variable_is_in_no_output(sim_runs):
    key, runs = sim_runs
    assert (runs["plain"]["run_dir"] / "report" / "envelope.html").is_file()
    for run in runs.values():
        run_dir = run["run_dir"]
        assert json.loads((run_dir / "run.json").read_text())["options"]["api_key_env"] == "MY_LLM_KEY"
        assert (run_dir / "locust" / "report.html").is_file()
        assert files_containing(run_dir, key.encode()) == []
        assert key.encode() not in run["stdout"] + run["stderr"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_prompt_text_only_with_record_text(sim_runs):
    _, runs = sim_runs
    plain, opted = runs["plain"]["run_dir"], runs["record-text"]["run_dir"]

    def records(run_dir: Path) -> list[dict]:
        return [json.loads(line) for p in (run_dir / "records").glob("*.jsonl") for line in p.read_bytes().splitlines()]

    assert json.loads((opted / "run.json").read_text())["options"]["record_text"] is True
    with_text = records(opted)
    assert with_text and all(r["prompt_text"] and r["completion_text"] for r in with_text if r["error_category"] is None)
    # the detector finds the prompts and completions where they were asked for...
    assert any(name.startswith("records/") for name in files_containing(opted, PROMPT_RUN))
    assert any(name.startswith("records/") for name in files_containing(opted, SIM_COMPLETION_RUN))
    # ...and nowhere in the plain run
    without = records(plain)
    assert without and {(r["prompt_text"], r["completion_text"]) for r in without} == {(None, None)}
    assert files_containing(plain, PROMPT_RUN) == []
    assert files_containing(plain, SIM_COMPLETION_RUN) == []
