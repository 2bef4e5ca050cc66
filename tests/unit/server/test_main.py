import argparse
import json
import socket
import subprocess
import sys
import time

import psutil
import pytest

from envelope.cli import main as envelope_main
from server.cli import DEFAULT_STATE, main, state_path
from server.process import group_members


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_unknown_profile_is_bad_input(capsys, tmp_path):
    assert main(["up", "--profile", "qwen3-7b", "--state", str(tmp_path / "s.json")]) == 2
    assert _one_line_error(capsys) == (
        "error: unknown server profile 'qwen3-7b'; available: cpu-tiny, cpu-tiny-transformers, "
        "cpu-tiny-transformers-cb, qwen3-8b, qwen3-8b-dummy (or give a path to a .yaml file)"
    )


def test_unset_key_variable_is_bad_input(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    args = ["up", "--profile", "cpu-tiny", "--api-key-env", "NO_SUCH_KEY_VAR", "--state", str(tmp_path / "s.json")]
    assert main(args) == 2
    assert _one_line_error(capsys) == "error: environment variable NO_SUCH_KEY_VAR is not set or empty"


def test_busy_port_is_a_launch_failure(capsys, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        args = ["up", "--profile", "cpu-tiny", "--port", str(port), "--run-dir", str(tmp_path / "run"),
                "--state", str(tmp_path / "s.json")]  # fmt: skip
        assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: port {port} on 127.0.0.1 is already in use"
    assert not (tmp_path / "s.json").exists()


def test_down_without_state_file(capsys, tmp_path):
    assert main(["down", "--state", str(tmp_path / "none.json")]) == 2
    assert "no state file" in _one_line_error(capsys)


def test_down_stops_the_whole_group_and_removes_the_state(capsys, tmp_path):
    leader = subprocess.Popen(
        [sys.executable, "-c", "import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']); time.sleep(60)"],
        start_new_session=True,
    )  # fmt: skip
    try:
        for _ in range(100):
            if len(group_members(leader.pid)) == 2:
                break
            time.sleep(0.05)
        assert len(group_members(leader.pid)) == 2
        state = tmp_path / "s.json"
        state.write_text(json.dumps({"pid": leader.pid, "pgid": leader.pid, "base_url": "http://x",
                                     "create_time": psutil.Process(leader.pid).create_time()}))  # fmt: skip
        assert main(["down", "--state", str(state), "--grace", "5"]) == 0
        assert group_members(leader.pid) == []
        assert not state.exists()
    finally:
        leader.kill()
        leader.wait()


def test_down_with_a_stale_state_file(capsys, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait()
    state = tmp_path / "s.json"
    state.write_text(json.dumps({"pid": proc.pid, "pgid": proc.pid, "base_url": "http://x", "create_time": 1.0}))
    assert main(["down", "--state", str(state)]) == 0
    assert "not running" in _one_line_error(capsys)
    assert not state.exists()


def test_the_state_file_lives_in_the_run_dir_unless_state_is_given(tmp_path):
    def args(**given):
        return argparse.Namespace(**{"state": None, "run_dir": None, **given})

    assert state_path(args()) == DEFAULT_STATE  # neither: today's default
    assert state_path(args(run_dir=str(tmp_path))) == tmp_path / "server-state.json"
    assert state_path(args(run_dir=str(tmp_path), state=str(tmp_path / "s.json"))) == tmp_path / "s.json"


@pytest.mark.parametrize("entry", ["python -m server", "envelope server"])
def test_status_and_down_find_the_state_through_the_run_dir(capsys, tmp_path, entry):
    run = (lambda argv: main(argv)) if entry == "python -m server" else (lambda argv: envelope_main(["server", *argv]))
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait()
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        state = tmp_path / "server-state.json"
        state.write_text(json.dumps({"pid": proc.pid, "pgid": proc.pid, "base_url": url, "create_time": 1.0}))
        assert run(["status", "--run-dir", str(tmp_path)]) == 1
    info = json.loads(capsys.readouterr().out)
    assert info["base_url"] == url and info["ok"] is False
    assert run(["down", "--run-dir", str(tmp_path)]) == 0
    assert "not running" in _one_line_error(capsys)
    assert not state.exists()
    assert run(["down", "--run-dir", str(tmp_path)]) == 2
    prefix = "error" if entry == "python -m server" else "envelope"
    assert _one_line_error(capsys).startswith(f"{prefix}: {state}: no state file")


def test_status_of_a_dead_url_exits_1_with_json(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert main(["status", "--url", f"http://127.0.0.1:{port}"]) == 1
    info = json.loads(capsys.readouterr().out)
    assert info["ok"] is False
    assert info["launched"] is False


def test_build_into_a_file_is_bad_input(capsys, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["build-tiny-model", str(target)]) == 2
    assert _one_line_error(capsys) == f"error: {target} exists and is not a directory"


def test_extra_args_only_for_up(capsys, tmp_path):
    assert main(["down", "--state", str(tmp_path / "s.json"), "--", "--seed", "1"]) == 2
    assert _one_line_error(capsys) == "error: extra arguments after '--' are only for 'up'"


@pytest.mark.parametrize("argv, message", [
    (["up"], "error: the following arguments are required: --profile (see: python -m server up --help)"),
    (["up", "--profile", "cpu-tiny", "--port", "abc"],
     "error: argument --port: invalid int value: 'abc' (see: python -m server up --help)"),
    ([], "error: the following arguments are required: command (see: python -m server --help)"),
    # argparse's wording of the choices differs between Python versions: only the ends are ours
    (["sideways"], "error: argument command: invalid choice: 'sideways' * (see: python -m server --help)"),
])
def test_argument_errors_are_one_line(capsys, argv, message):
    assert main(argv) == 2
    head, _, tail = message.partition("*")
    line = _one_line_error(capsys)
    assert line == message if not tail else (line.startswith(head) and line.endswith(tail)), line
