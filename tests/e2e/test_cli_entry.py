"""The one front door: the installed ``envelope`` console script and its verbs, run in subprocesses.

``envelope run|report|compare|server|sim``: every verb is listed with its one-line help, every
``--help`` ends with an example, bad input is one line and exit 2, and ``report``/``compare``/
``sim`` do what their aliases (``python -m analysis``, ``python -m server.sim``) do. The
``envelope server up``/``down`` round trip against the real vLLM is in
``tests/integration/test_server.py``.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from analysis.cli import COMPARE_HELP, REPORT_HELP
from envelope.cli import RUN_HELP
from server.cli import HELP as SERVER_HELP
from server.sim.cli import HELP as SIM_HELP

REPO = Path(__file__).resolve().parents[2]
ENVELOPE = Path(sys.executable).parent / "envelope"
GOLDEN_RUN = REPO / "tests" / "fixtures" / "golden_run"

pytestmark = [pytest.mark.e2e]

VERB_HELP = {"run": RUN_HELP, "report": REPORT_HELP, "compare": COMPARE_HELP, "server": SERVER_HELP,
             "sim": SIM_HELP}


def envelope(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    # a fixed width: argparse wraps help to the terminal's, and each verb's help must fit one line at 80
    env = {**os.environ, "COLUMNS": "80"}
    return subprocess.run([str(ENVELOPE), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout_s)


def python_m(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout_s)


def assert_one_line_usage_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.stdout == ""
    return lines[0]


def test_the_console_script_is_installed():
    assert ENVELOPE.is_file() and os.access(ENVELOPE, os.X_OK), f"{ENVELOPE}: pip install -e ."


def test_help_lists_every_verb_with_its_one_line_help():
    proc = envelope("--help")
    assert proc.returncode == 0, proc.stderr
    for verb, help_line in VERB_HELP.items():
        assert re.search(rf"^ +{verb} +{re.escape(help_line)}$", proc.stdout, re.MULTILINE), (verb, proc.stdout)
    assert "example" in proc.stdout


@pytest.mark.parametrize("argv", [
    ["run"], ["report"], ["compare"], ["server"], ["server", "up"], ["server", "down"], ["server", "status"],
    ["server", "build-tiny-model"], ["sim"],
], ids=" ".join)
def test_every_verb_help_ends_with_an_example(argv):
    proc = envelope(*argv, "--help")
    assert proc.returncode == 0, proc.stderr
    last_block = proc.stdout.strip().split("\n\n")[-1]
    assert last_block.startswith("example"), proc.stdout
    # the example is a command of this verb, to copy
    assert f"envelope {' '.join(argv)}" in last_block, last_block


@pytest.mark.parametrize("argv", [["server", "--help"], ["server", "up", "--help"], ["server.sim", "--help"],
                                  ["analysis", "--help"]], ids=" ".join)
def test_aliases_help_ends_with_an_example(argv):
    proc = python_m(*argv)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().split("\n\n")[-1].startswith("example"), proc.stdout


def test_no_verb_prints_the_short_usage_and_exits_2():
    line = assert_one_line_usage_error(envelope())
    assert line.startswith("usage: envelope ")
    for verb in VERB_HELP:
        assert verb in line


@pytest.mark.parametrize("argv, pattern", [
    (["sideways"], r"^envelope: argument command: invalid choice: 'sideways'"),
    (["report", "RUN", "--colour"], r"^envelope: unrecognized arguments: --colour \(see: envelope report --help\)$"),
    (["server", "up", "--profile", "cpu-tiny", "--colour", "red"],
     r"^envelope: unrecognized arguments: --colour red \(see: envelope server up --help\)$"),
    (["report"], r"^envelope: the following arguments are required: RUN \(see: envelope report --help\)$"),
    (["compare", "only-one"], r"^envelope: the following arguments are required: B \(see: envelope compare --help\)$"),
    (["server"], r"^envelope: the following arguments are required: command \(see: envelope server --help\)$"),
    (["server", "down", "--grace", "soon"],
     r"^envelope: argument --grace: invalid float value: 'soon' \(see: envelope server down --help\)$"),
    (["server", "down", "--run-dir", "RUNDIR", "--", "--seed", "1"],
     r"^envelope: extra arguments after '--' are only for 'up'$"),
    (["sim", "--port", "eighty"], r"^envelope: argument --port: invalid int value: 'eighty' \(see: envelope sim --help\)$"),
    (["sim", "--fault", "stall:stall_s"], r"^envelope: fault option 'stall_s' is not key=value$"),
    (["run", "--scenario", "scenarios/smoke.yaml", "--", "x"],
     r"^envelope: extra arguments after '--' are only for 'envelope server up'"),
], ids=["unknown-verb", "report-unknown-flag", "up-unknown-flag", "report-no-run", "compare-one-run", "server-no-command",
        "down-bad-grace", "down-extra-args", "sim-bad-port", "sim-bad-fault", "run-extra-args"])
def test_bad_input_is_one_line_exit_2(tmp_path, argv, pattern):
    argv = [str(tmp_path) if a == "RUNDIR" else a for a in argv]
    line = assert_one_line_usage_error(envelope(*argv))
    assert re.search(pattern, line), line


def test_server_down_without_a_state_file_in_the_run_dir(tmp_path):
    line = assert_one_line_usage_error(envelope("server", "down", "--run-dir", str(tmp_path)))
    assert line.startswith(f"envelope: {tmp_path / 'server-state.json'}: no state file"), line


def test_report_writes_the_report_and_prints_what_the_alias_prints(tmp_path):
    run_dir = tmp_path / "golden_run"
    shutil.copytree(GOLDEN_RUN, run_dir)
    proc = envelope("report", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "report" / "envelope.md").is_file()
    assert proc.stderr.splitlines()[-1] == f"envelope: wrote {run_dir / 'report' / 'envelope.md'}"
    alias = python_m("analysis", str(run_dir), "--out", str(tmp_path / "alias-report"))
    assert alias.returncode == 0, alias.stderr
    assert proc.stdout == alias.stdout != ""
    assert (tmp_path / "alias-report" / "envelope.md").read_text() == (run_dir / "report" / "envelope.md").read_text()


def test_report_of_a_directory_that_is_no_run_is_one_line(tmp_path):
    proc = envelope("report", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == f"envelope: {tmp_path}: not a run directory (no records/ and no stages.json)"


def test_compare_writes_compare_md(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(GOLDEN_RUN, a)
    shutil.copytree(GOLDEN_RUN, b)
    proc = envelope("compare", str(a), str(b), "--out", str(tmp_path / "cmp"))
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "+0.0%" in text  # a run compared with itself
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    alias = python_m("analysis", "--compare", str(a), str(b))  # default: B/report/compare
    assert alias.returncode == 0, alias.stderr
    assert (b / "report" / "compare" / "compare.md").read_text() == text


@pytest.mark.timeout(60)
def test_sim_listens_and_stops_on_sigterm():
    proc = subprocess.Popen([str(ENVELOPE), "sim", "--port", "0"], cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=30), "no 'listening on' line within 30 s"
        line = proc.stdout.readline()
        assert line.startswith("listening on http://"), line
        base_url = line.split()[-1]
        assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def test_building_the_parser_imports_no_locust_or_gevent():
    # every module of the server and analysis packages too: they must never monkey-patch a process
    code = ("import importlib, pkgutil, sys\n"
            "import analysis, server\n"
            "from envelope.cli import _parser\n"
            "_parser()\n"
            "for pkg in (analysis, server):\n"
            "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
            "        if not m.name.endswith('__main__'):\n"
            "            importlib.import_module(m.name)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'locust', 'gevent', 'geventhttpclient'}))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_help_is_fast():
    t0 = time.monotonic()
    assert envelope("--help").returncode == 0
    # generous for a loaded CI machine; it is about 0.2 s: nothing heavy is imported to build the parsers
    assert time.monotonic() - t0 < 10
