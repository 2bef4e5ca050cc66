"""``envelope sweep``: bad input is one line and exit 2 before anything starts (no sweep directory)."""

from __future__ import annotations

import io

import pytest

from envelope.cli import main

SCENARIO = "scenarios/gate.yaml"


def _sweep(tmp_path, *args):
    out, err = io.StringIO(), io.StringIO()
    code = main(["sweep", "--scenario", SCENARIO, "--out", str(tmp_path / "sweeps"), *args], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("args, expect", [
    ([], "give --profile NAME (with --set or --configs) or --host URL"),
    (["--profile", "cpu-tiny"], "a sweep needs configurations: --set KEY=V1,V2"),
    (["--profile", "cpu-tiny", "--set", "max_num_seqs=4"], "a sweep needs at least two configurations"),
    (["--profile", "cpu-tiny", "--set", "max_num_seqs=4,0"], "--set: configuration 'max_num_seqs=0': setting max_num_seqs=0: "),
    (["--profile", "cpu-tiny", "--set", "max_num_seqs"], "--set max_num_seqs: expected KEY=VALUE"),
    (["--profile", "cpu-tiny", "--set", "name=a,b"], "setting name: cannot be overridden"),
    (["--profile", "cpu-tiny", "--set", "max_model_len=100,4096"], "max_model_len"),
    (["--profile", "no-such-profile", "--set", "max_num_seqs=4,8"], "unknown server profile 'no-such-profile'"),
    (["--host", "http://127.0.0.1:9"], "needs at least two --host URLs"),
    (["--host", "http://a:1", "--host", "http://b:1", "--set", "max_num_seqs=4,8"], "--set and --configs apply"),
    (["--profile", "cpu-tiny", "--set", "max_num_seqs=4,8", "--usd-per-hour", "-1"],
     "--usd-per-hour must be a positive number"),
])
def test_bad_input_is_one_line_and_nothing_starts(tmp_path, args, expect):
    code, out, err = _sweep(tmp_path, *args)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("envelope: ") and expect in err, err
    assert not (tmp_path / "sweeps").exists()


def test_a_config_file_error_names_its_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- {max_num_seqs: 4}\n- {max_num_seqs: -3}\n")
    code, _, err = _sweep(tmp_path, "--profile", "cpu-tiny", "--configs", str(path))
    assert code == 2 and err.count("\n") == 1 and f"{path}:2: configuration 'max_num_seqs=-3': setting max_num_seqs=-3: " in err, err
    code, _, err = _sweep(tmp_path, "--profile", "cpu-tiny", "--configs", str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml: file not found" in err


def test_hosts_that_do_not_answer_are_refused_before_the_sweep_starts(tmp_path):
    code, _, err = _sweep(tmp_path, "--host", "http://127.0.0.1:9", "--host", "http://127.0.0.1:11")
    assert code == 2 and err.count("\n") == 1 and "--host http://127.0.0.1:9: cannot reach the server" in err, err
    assert not (tmp_path / "sweeps").exists()
