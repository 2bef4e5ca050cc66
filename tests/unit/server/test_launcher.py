import json
import os
import socket
import sys
import time
import venv
from pathlib import Path

import httpx
import psutil
import pytest

from envelope.secrets import Secret
from server.launcher import LaunchError, VllmServer, build_command, build_env, kv_cache_from_log, recorded_env
from server.process import group_members
from server.profiles import ServerProfile, load_profile

FAKE = str(Path(__file__).with_name("fake_vllm_server.py"))
KEY = "sk-unit-test-4f9a2c"


def _profile(model: str, **overrides) -> ServerProfile:
    fields = dict(name="fake", device="cpu", model=model, served_model_name="fake-model", max_model_len=2048)
    fields.update(overrides)
    return ServerProfile(**fields)


def _fake_server(tmp_path, mode="ok", **kwargs) -> VllmServer:
    profile = _profile(str(tmp_path), env={"FAKE_VLLM_MODE": mode, "FAKE_MAX_MODEL_LEN": "1234"})
    return VllmServer(profile, run_dir=tmp_path / "run", command=[sys.executable, FAKE], **kwargs)


# --- command and environment ---


def test_command_for_cpu_tiny():
    argv = build_command(load_profile("cpu-tiny"), model="/m", host="127.0.0.1", port=8123, program=["py", "-m", "x"])
    assert argv == [
        "py", "-m", "x",
        "--model", "/m", "--served-model-name", "tiny-qwen3",
        "--host", "127.0.0.1", "--port", "8123", "--max-model-len", "4096",
        "--dtype", "bfloat16", "--enforce-eager", "--max-num-seqs", "16",
        "--num-gpu-blocks-override", "128",
    ]  # fmt: skip


def test_command_for_qwen3_8b_and_dummy():
    argv = build_command(load_profile("qwen3-8b"), model="Qwen/Qwen3-8B", host="0.0.0.0", port=9000, program=["p"])
    assert argv == [
        "p", "--model", "Qwen/Qwen3-8B", "--served-model-name", "Qwen3-8B",
        "--host", "0.0.0.0", "--port", "9000", "--max-model-len", "16384",
        "--dtype", "bfloat16", "--max-num-seqs", "64", "--gpu-memory-utilization", "0.9",
    ]  # fmt: skip
    dummy = build_command(load_profile("qwen3-8b-dummy"), model="Qwen/Qwen3-8B", host="h", port=1, program=["p"])
    assert dummy[-2:] == ["--load-format", "dummy"]
    assert "--enforce-eager" not in dummy


def test_command_appends_profile_then_caller_extra_args():
    profile = _profile("/m", extra_args=["--seed", "7"])
    argv = build_command(profile, model="/m", host="h", port=1, extra_args=["--block-size", "16"], program=["p"])
    assert argv[-4:] == ["--seed", "7", "--block-size", "16"]


def test_env_carries_key_kv_space_and_offline_but_argv_never_the_key():
    profile = load_profile("cpu-tiny")
    env = build_env(profile, api_key=Secret(KEY), base={"PATH": "/bin", "VLLM_API_KEY": "inherited"})
    assert env["VLLM_API_KEY"] == KEY
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["PATH"] == "/bin"
    argv = build_command(profile, model="/m", host="h", port=1)
    assert not any(KEY in arg for arg in argv)
    assert "--api-key" not in argv
    assert recorded_env(env, profile) == {"HF_HUB_OFFLINE": "1", "VLLM_API_KEY": "***", "VLLM_CPU_KVCACHE_SPACE": "1",
                                         "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "60"}


def test_env_without_key_drops_an_inherited_one_and_profile_env_wins():
    env = build_env(load_profile("qwen3-8b"), api_key=None, base={"VLLM_API_KEY": "inherited"})
    assert "VLLM_API_KEY" not in env
    assert env["HF_HUB_OFFLINE"] == "0"  # the profile allows downloads
    assert "VLLM_CPU_KVCACHE_SPACE" not in env


def test_kv_cache_numbers_from_the_vllm_log():
    line = "INFO [kv_cache_utils.py:2327] CPU KV cache size: 16,384 tokens, Maximum concurrency for 4,096 tokens per request: 4.00x\n"
    assert kv_cache_from_log("other\n" + line) == {"kv_cache_tokens": 16384, "max_concurrency_at_max_model_len": 4.0}
    assert kv_cache_from_log("nothing here") == {}


# --- launching the fake server ---


def test_start_writes_server_json_without_the_key_and_stop_leaves_nothing(tmp_path):
    server = _fake_server(tmp_path, api_key=Secret(KEY))
    with server:
        info = server.info
        assert info["launched"] is True
        assert info["base_url"] == f"http://127.0.0.1:{server.port}"
        assert info["served_model_name"] == "fake-model"
        assert info["max_model_len"] == 1234  # from /v1/models, not the profile's 2048
        assert info["vllm_version"] == "0.0.fake"
        assert info["env"]["VLLM_API_KEY"] == "***"
        assert info["api_key_set"] is True
        assert info["pid"] == server.pid
        assert info["command"][-2:] == ["--max-model-len", "2048"]
        text = (tmp_path / "run" / "server.json").read_text()
        assert KEY not in text
        assert json.loads(text) == info
        # the key is not in the process list either
        assert KEY not in " ".join(psutil.Process(server.pid).cmdline())
        # and the server really enforces it
        assert httpx.get(f"{server.base_url}/v1/models").status_code == 401
        pgid = server.pid
    assert group_members(pgid) == []


def test_busy_port_is_reported_before_launching(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        server = _fake_server(tmp_path, port=port)
        with pytest.raises(LaunchError) as err:
            server.start(timeout_s=5)
    assert err.value.summary == f"port {port} on 127.0.0.1 is already in use"
    assert server.pid is None


def test_missing_model_path(tmp_path):
    profile = _profile(str(tmp_path / "no-such-model"))
    server = VllmServer(profile, run_dir=tmp_path / "run", command=[sys.executable, FAKE])
    with pytest.raises(LaunchError) as err:
        server.start(timeout_s=5)
    assert err.value.summary == f"model path does not exist: {tmp_path / 'no-such-model'}"
    assert server.pid is None


def test_vllm_not_installed_in_the_given_python(tmp_path):
    venv.create(tmp_path / "bare", with_pip=False)  # stdlib only, no vllm
    python = str(tmp_path / "bare" / "bin" / "python")
    server = VllmServer(_profile(str(tmp_path)), run_dir=tmp_path / "run", python=python)
    with pytest.raises(LaunchError) as err:
        server.start(timeout_s=5)
    assert err.value.summary.startswith(f"vLLM is not installed in {python}")
    assert "\n" not in err.value.summary


def test_missing_python_interpreter(tmp_path):
    server = VllmServer(_profile(str(tmp_path)), run_dir=tmp_path / "run", python=str(tmp_path / "nope"))
    with pytest.raises(LaunchError) as err:
        server.start(timeout_s=5)
    assert err.value.summary == f"python interpreter not found: {tmp_path / 'nope'}"


def test_engine_crash_reports_exit_code_and_log_tail(tmp_path):
    server = _fake_server(tmp_path, mode="crash")
    with pytest.raises(LaunchError) as err:
        server.start(timeout_s=20)
    assert err.value.summary.startswith("vLLM exited with code 1 during start-up")
    assert "engine core failed to start (fake)" in err.value.log_tail
    assert "engine core failed to start (fake)" in str(err.value)


def test_timeout_reports_last_state_and_kills_the_server(tmp_path):
    server = _fake_server(tmp_path, mode="never-healthy")
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as err:
        server.start(timeout_s=3)
    assert 3 <= time.monotonic() - t0 < 15
    assert "not ready after 3 s" in err.value.summary
    assert "fake vllm starting in mode never-healthy" in err.value.log_tail
    assert group_members(server.pid) == []


def test_stop_escalates_to_sigkill_for_a_group_that_ignores_sigterm(tmp_path):
    server = _fake_server(tmp_path, mode="ignore-term")
    server.start(timeout_s=20)
    pgid = server.pid
    members = group_members(pgid)
    assert len(members) == 2  # the server and the child it forked
    t0 = time.monotonic()
    server.stop(grace_s=1.0)
    assert time.monotonic() - t0 >= 1.0  # waited the grace period before SIGKILL
    assert group_members(pgid) == []
    for proc in members:
        assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    assert server._proc.returncode == -9


def test_log_tail_masks_the_key(tmp_path):
    from server.launcher import log_tail

    log = tmp_path / "server.log"
    log.write_text("".join(f"line {i}\n" for i in range(30)) + f"key was {KEY}\n")
    tail = log_tail(log, secrets=[Secret(KEY)])
    assert tail.splitlines() == [f"line {i}" for i in range(11, 30)] + ["key was ***"]


def test_engine_nice_is_recorded_in_server_json_and_its_thread_stops_with_the_server(tmp_path):
    profile = _profile(str(tmp_path), engine_nice=19, env={"FAKE_VLLM_MODE": "ok"})
    server = VllmServer(profile, run_dir=tmp_path / "run", command=[sys.executable, FAKE])
    without = _fake_server(tmp_path / "plain")
    with server, without:
        # the fake server has no VLLM::EngineCore or VLLM::Worker process: nothing to renice
        assert server.info["cpu_arrangement"] == {"engine_nice": 19, "threads_reniced": 0, "engine_threads": 0}
        assert {os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(f"/proc/{server.pid}/task")} == {0}
        keeper = server._engine_nice._thread
        assert keeper.is_alive()
        assert "cpu_arrangement" not in without.info
    assert not keeper.is_alive()


# --- the transformers engine ---


def test_command_for_the_transformers_profiles():
    plain = build_command(load_profile("cpu-tiny-transformers"), model="/m", host="127.0.0.1", port=8123,
                          program=["py", "-m", "t"])
    assert plain == ["py", "-m", "t", "serve", "/m", "--host", "127.0.0.1", "--port", "8123", "--device", "cpu",
                     "--dtype", "bfloat16", "--no-continuous-batching"]
    cb = build_command(load_profile("cpu-tiny-transformers-cb"), model="/m", host="h", port=1, program=["p"])
    assert cb == ["p", "serve", "/m", "--host", "h", "--port", "1", "--device", "cpu", "--dtype", "bfloat16",
                  "--continuous-batching", "--cb-num-blocks", "512", "--cb-block-size", "32"]
    # without a program: transformers' own command-line module, in this interpreter
    assert build_command(load_profile("cpu-tiny-transformers"), model="/m", host="h", port=1)[:3] == [
        sys.executable, "-m", "transformers.cli.transformers"]


def test_a_transformers_server_is_ready_once_it_answers_a_chat_completion(tmp_path):
    """No /v1/models to wait for: /health, then one answered completion (the warm-up); server.json names the
    engine and the model name the server answers to (its model path)."""
    profile = ServerProfile(name="fake-t", engine="transformers", device="cpu", model=str(tmp_path), max_model_len=64,
                            env={"FAKE_VLLM_MODE": "ok"})
    server = VllmServer(profile, run_dir=tmp_path / "run", command=[sys.executable, FAKE, "--served-model-name",
                                                                    str(tmp_path)])
    with server:
        info = server.info
        assert (info["engine"], info["continuous_batching"], info["vllm_version"]) == ("transformers", False, None)
        assert info["served_model_name"] == str(tmp_path)
        assert info["command"][4:6] == ["serve", str(tmp_path)]
    with pytest.raises(LaunchError, match="transformers serve has no API key"):
        VllmServer(profile, run_dir=tmp_path / "run2", api_key=Secret(KEY)).start()
