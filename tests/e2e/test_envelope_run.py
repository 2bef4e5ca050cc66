"""End to end: ``envelope run`` launches the real vLLM (cpu-tiny), runs the quick capstone, and writes the report.

It runs at ``--duration-scale 0.25`` (a search budget of a quarter) the capstone's chat search only, to
keep CI short: the integration tests analyse the capstone's fixed passes on the session's server, the
sweep test runs fixed stages through ``envelope run``'s launch twice, and ``make demo`` runs the whole
scenario at ``--quick`` (0.4). The run is the ``launched_run`` fixture (tests/e2e/conftest.py), watched
while it runs and shared with test_secrets.py, which checks where its API key went. It launches
``cpu-tiny`` with 2 batch slots and sets the search's SLOs from the machine's speed (the fixture says
why), so that the bend is where the test knows it is on any box.

The chat search must end with a bracket (the highest level that passed and the lowest that failed,
both with confidence) and name why it bends there from the server's own telemetry.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import psutil
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.slow]


@pytest.mark.timeout(1200)
def test_envelope_run_capstone_quick(launched_run):
    from analysis.broke import cross_check_text, run_probe_output_tokens, token_cross_check, what_broke_first
    from analysis.load import load_run
    from analysis.table import envelope_table

    proc = SimpleNamespace(returncode=launched_run["rc"], stdout=launched_run["stdout"].decode(errors="replace"),
                           stderr=launched_run["stderr"].decode(errors="replace"))
    key, run_dir = launched_run["key"], launched_run["run_dir"]
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"
    assert (run_dir / "report" / "envelope.md").is_file()
    assert (run_dir / "report" / "envelope.html").is_file()

    samples = [json.loads(line) for line in (run_dir / "telemetry" / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for s in samples if s.get("ok")) >= 10

    run = load_run(run_dir)
    check = token_cross_check(run.frame, run.telemetry.get("metrics"),
                              probe_output_tokens=run_probe_output_tokens(run))
    assert check.server_generation_tokens is not None and check.client_output_tokens > 0
    assert check.difference_ratio < 0.01, check

    first = what_broke_first(run, envelope_table(run))
    assert first.first is not None, first.sentence  # the capstone is built so that something breaks
    report = (run_dir / "report" / "envelope.md").read_text()
    section = report.split("## What broke first\n", 1)[1].split("\n## ", 1)[0]
    assert first.sentence in section
    assert f"{first.first.label} broke first" in first.sentence or "first limit reached" in first.sentence
    assert f"What broke first: {first.sentence}" in proc.stdout

    from analysis.search import search_findings

    findings = {f.pass_name: f for f in search_findings(envelope_table(run), run.searches)}
    assert set(findings) == {"chat-search"}
    chat = findings["chat-search"]
    assert chat.done, chat.live
    b = chat.bracket
    assert b.highest_pass is not None and b.lowest_fail is not None and b.highest_pass < b.lowest_fail, b
    # the bend is known: as many users as batch slots, then requests wait for one (tests/e2e/conftest.py)
    slots = json.loads((run_dir / "server.json").read_text())["max_num_seqs"]
    assert b.highest_pass == slots, b
    assert chat.cause == "queueing", (chat.cause, chat.evidence)
    assert any("server" in e for e in chat.evidence), chat.evidence  # the server's own evidence
    assert (run_dir / "report" / "envelope_graph_chat-search.png").is_file() or \
        (run_dir / "report" / "envelope_graph.png").is_file()
    first_screen = report.split("\n## Run", 1)[0]
    assert f"{int(b.highest_pass)} concurrent users" in first_screen, first_screen[:2000]  # "up to N" or "at N"
    print(chat.bracket.describe("users"), chat.cause, chat.evidence)

    assert [p for p in run_dir.rglob("*") if p.is_file() and key.encode() in p.read_bytes()] == []
    assert key not in proc.stdout and key not in proc.stderr

    server = json.loads((run_dir / "server.json").read_text())
    assert not psutil.pid_exists(server["pid"]) or psutil.Process(server["pid"]).status() == psutil.STATUS_ZOMBIE
    leftovers = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "vllm.entrypoints" in " ".join(p.info["cmdline"] or ()) and p.cwd() == str(run_dir):
                leftovers.append(p.pid)
        except psutil.Error:
            continue
    assert leftovers == []
    print(proc.stdout)
    print(cross_check_text(check))
    for e in first.events:
        print(f"{e.t_s:7.1f} s  {e.stage_name}  {e.kind}: {e.detail}")
