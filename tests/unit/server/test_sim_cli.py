"""The simulated server's config file, command line and child-process runner."""

from __future__ import annotations

import httpx
import pytest

from envelope.config import ConfigError
from server.sim import Distribution, FaultSpec, SimConfig, SimServer, load_sim_config
from server.sim.cli import main, parse_fault


def test_yaml_config_loads_and_errors_name_the_line(tmp_path):
    path = tmp_path / "sim.yaml"
    path.write_text("model: m\nttft_s: {kind: uniform, low_s: 0.01, high_s: 0.02}\nitl_s: 0.005\n"
                    "faults:\n  - kind: reset\n    after_chunks: 3\n")
    cfg = load_sim_config(path, seed=9)
    assert cfg.model == "m" and cfg.seed == 9
    assert cfg.ttft_s == Distribution(kind="uniform", low_s=0.01, high_s=0.02)
    assert cfg.itl_s == Distribution(value_s=0.005)
    assert cfg.faults == (FaultSpec(kind="reset", after_chunks=3),)
    path.write_text("model: m\nfaults:\n  - kind: http_500\n    every_nth: 0\n")
    with pytest.raises(ConfigError, match=r"sim.yaml:3: faults\[0\]: every_nth must be >= 1"):
        load_sim_config(path)
    path.write_text("model: m\nttft_s: -1\n")
    with pytest.raises(ConfigError, match=r"sim.yaml:2: "):
        load_sim_config(path)


def test_api_key_is_not_in_repr():
    assert "sk-x" not in repr(SimConfig(api_key="sk-x"))


def test_parse_fault():
    assert parse_fault("reset:after_chunks=3,every_nth=2") == FaultSpec(kind="reset", after_chunks=3, every_nth=2)
    assert parse_fault("http_500:probability=0.25") == FaultSpec(kind="http_500", probability=0.25)
    with pytest.raises(ValueError):
        parse_fault("nope")


def test_cli_bad_input_is_one_line(capsys, tmp_path):
    assert main(["--fault", "stall:stall_s"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert main(["--api-key-env", "ENVELOPE_SIM_TEST_UNSET_VAR"]) == 2
    assert "ENVELOPE_SIM_TEST_UNSET_VAR is not set" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [\n")
    assert main(["--config", str(bad)]) == 2
    assert "YAML syntax error" in capsys.readouterr().err
    assert main(["--port", "eighty"]) == 2  # argparse's own errors too: one line, not its usage block
    assert capsys.readouterr().err == ("error: argument --port: invalid int value: 'eighty' "
                                       "(see: python -m server.sim --help)\n")


def test_subprocess_serves_with_api_key_and_stops_cleanly():
    proc = SimServer(SimConfig(api_key="sk-sub", ttft_s=0.0, itl_s=0.0)).start_in_subprocess()
    try:
        with httpx.Client() as c:
            assert c.get(f"{proc.base_url}/health").status_code == 200
            assert c.get(f"{proc.base_url}/v1/models").status_code == 401
            r = c.post(f"{proc.base_url}/v1/completions", json={"prompt": "a", "max_tokens": 4},
                       headers={"Authorization": "Bearer sk-sub"})
            assert r.json()["usage"]["completion_tokens"] == 4
        assert "sk-sub" not in proc.log_path.read_text()
    finally:
        assert proc.stop() == 0
