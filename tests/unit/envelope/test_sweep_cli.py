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
    ([], "give --profile NAME (with --set or --configs, or repeated) or --host URL"),
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
    (["--profile", "cpu-tiny", "--profile", "cpu-tiny-transformers", "--set", "max_num_seqs=4,8"],
     "with --profile repeated the profiles are the configurations"),
    (["--profile", "cpu-tiny", "--profile", "cpu-tiny"], "--profile cpu-tiny: listed twice"),
    (["--profile", "cpu-tiny", "--profile", "no-such-profile"], "unknown server profile 'no-such-profile'"),
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


def test_a_configuration_whose_server_does_not_start_is_reported_with_its_log_and_the_sweep_goes_on(
        tmp_path, monkeypatch):
    """The launcher fails as it does when vLLM refuses a flag (exit 2 during start-up, its usage on the log):
    each configuration is recorded with the log's last lines, the next one is still tried, the report is
    written, and the sweep exits 1."""
    import json

    from server.launcher import LaunchError, VllmServer

    tried = []

    def refuse(self, timeout_s=None):
        tried.append(self.profile.extra_args)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text("usage: api_server.py [-h] ...\n"
                                 "api_server.py: error: unrecognized arguments: --no-such-vllm-flag\n")
        raise LaunchError(f"vLLM exited with code 2 during start-up (log: {self.log_path})",
                          log_tail=self.log_path.read_text())

    monkeypatch.setattr(VllmServer, "start", refuse)
    code, out, err = _sweep(tmp_path, "--profile", "cpu-tiny", "--set", "no_such_vllm_flag=1,2")
    assert code == 1, err
    assert tried == [("--no-such-vllm-flag", "1"), ("--no-such-vllm-flag", "2")]  # both tried, in order
    (sweep_dir,) = (tmp_path / "sweeps").iterdir()
    doc = json.loads((sweep_dir / "sweep.json").read_text())
    assert doc["status"] == "partial"
    assert [c["status"] for c in doc["configs"]] == ["failed_to_start", "failed_to_start"]
    for c in doc["configs"]:
        assert "unrecognized arguments: --no-such-vllm-flag" in c["log_tail"]
        assert c["failure"].startswith("vLLM exited with code 2 during start-up") and "\n" not in c["failure"]
    md = (sweep_dir / "sweep.md").read_text()
    assert "### no_such_vllm_flag=1: the server log's last lines" in md and "unrecognized arguments" in md
    assert "No configuration recorded any requests" in md
    assert "did not start; the sweep goes on" in err and "Traceback" not in err


def test_a_sweep_over_profiles_has_one_configuration_per_profile(tmp_path):
    """Engines side by side: each configuration is its profile, validated as `envelope run` would."""
    import argparse

    from envelope.sweep import config_dir_name
    from envelope.sweep_cli import _configs, _plans

    args = argparse.Namespace(profile=["cpu-tiny", "cpu-tiny-transformers", "cpu-tiny-transformers-cb"], host=[],
                              set=[], configs=None)
    configs = _configs(args)
    assert [(c.label, c.profile, c.settings) for c in configs] == [
        ("cpu-tiny", "cpu-tiny", {}), ("cpu-tiny-transformers", "cpu-tiny-transformers", {}),
        ("cpu-tiny-transformers-cb", "cpu-tiny-transformers-cb", {})]
    assert [config_dir_name(i, c) for i, c in enumerate(configs)] == [
        "01-cpu-tiny", "02-cpu-tiny-transformers", "03-cpu-tiny-transformers-cb"]
    from envelope.cli import _parser

    run_args = _parser().parse_args(["sweep", "--scenario", SCENARIO, "--out", str(tmp_path),
                                          "--profile", "cpu-tiny", "--profile", "cpu-tiny-transformers",
                                          "--profile", "cpu-tiny-transformers-cb"])
    plans = _plans(run_args, configs, tmp_path)
    assert [(p.profile.name, p.profile.engine, p.args.profile) for p in plans] == [
        ("cpu-tiny", "vllm", "cpu-tiny"), ("cpu-tiny-transformers", "transformers", "cpu-tiny-transformers"),
        ("cpu-tiny-transformers-cb", "transformers", "cpu-tiny-transformers-cb")]
