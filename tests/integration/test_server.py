"""Against a real vLLM (cpu-tiny) started by our launcher: streaming, exact lengths, metrics, the key."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from server.process import group_members

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(600)]


def _stream_chat(base_url, model, api_key, *, n_tokens):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me about the load test."}],
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "max_tokens": n_tokens,
        "min_tokens": n_tokens,
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {api_key}"}
    chunks, content = [], ""
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            chunks.append(chunk)
            for choice in chunk.get("choices") or []:
                content += choice.get("delta", {}).get("content") or ""
    return chunks, content


def test_streamed_chat_returns_exactly_n_tokens(vllm_server):
    chunks, content = _stream_chat(
        vllm_server.base_url, vllm_server.served_model_name, vllm_server.api_key.get(), n_tokens=37
    )
    assert chunks[-1]["usage"]["completion_tokens"] == 37
    assert content.strip() != ""
    # continuous usage stats: every chunk carries usage, and the counts never go down
    counts = [c["usage"]["completion_tokens"] for c in chunks if c.get("usage")]
    assert len(counts) == len(chunks)
    assert counts == sorted(counts)


def test_metrics_expose_the_gauges_envelope_reads(vllm_server):
    text = httpx.get(vllm_server.metrics_url, timeout=10).text
    for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"]:
        assert any(line.startswith(name + "{") for line in text.splitlines()), name


def test_server_json_describes_the_server_and_holds_no_key(vllm_server):
    info = vllm_server.info
    assert info["launched"] is True
    assert info["profile"] == "cpu-tiny"
    assert info["served_model_name"] == "tiny-qwen3"
    assert info["max_model_len"] == 4096
    assert info["kv_cache"]["kv_cache_tokens"] == 128 * 128  # --num-gpu-blocks-override 128, 128-token blocks
    assert info["vllm_version"] == httpx.get(f"{vllm_server.base_url}/version").json()["version"]
    assert info["env"]["VLLM_API_KEY"] == "***"
    text = (vllm_server.run_dir / "server.json").read_text()
    assert vllm_server.api_key.get() not in text
    assert json.loads(text) == info
    assert vllm_server.api_key.get() not in " ".join(psutil.Process(info["pid"]).cmdline())


def test_requests_without_the_key_are_refused(vllm_server):
    url = f"{vllm_server.base_url}/v1/models"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {vllm_server.api_key.get()}"}).status_code == 200


def _assert_engine_niced(pgid, info):
    """cpu-tiny's engine_nice: every thread of the engine processes at 19, the API server's at 0."""
    from server.cpu_arrangement import is_engine_process, snapshot_group, thread_nice

    assert info["cpu_arrangement"]["engine_nice"] == 19
    assert info["cpu_arrangement"]["threads_reniced"] > 0
    views = snapshot_group(pgid)
    engines = [v for v in views if is_engine_process(v.name, v.cmdline)]
    assert {v.name for v in engines} == {"VLLM::EngineCore", "VLLM::Worker"}
    assert {thread_nice(t) for v in engines for t in v.thread_ids} == {19}
    (api,) = [v for v in views if v.pid == pgid]
    assert {thread_nice(t) for t in api.thread_ids} == {0}


def _wait_gone(pid, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        assert time.monotonic() < deadline, f"process {pid} is still alive"
        time.sleep(0.1)


def test_envelope_server_up_status_down_with_one_run_dir(tmp_path):
    """The installed ``envelope server`` command: ``up``, ``status`` and ``down`` given only the same ``--run-dir``.

    The state file lives in the run directory, the key never reaches a file, and nothing of the
    server's process group survives ``down``. (``python -m server`` is the same code: tests/unit/server.)
    """
    key = "sk-cli-test-9b1e"
    env = {**os.environ, "CLI_TEST_KEY": key}
    run_dir = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "envelope"), "server"]
    t0 = time.monotonic()
    up = subprocess.run(
        cmd + ["up", "--profile", "cpu-tiny", "--run-dir", str(run_dir), "--api-key-env", "CLI_TEST_KEY"],
        env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert up.returncode == 0, up.stderr
    up_s = time.monotonic() - t0
    base_url, server_json = up.stdout.split()
    state = run_dir / "server-state.json"
    saved = json.loads(state.read_text())
    port = base_url.rsplit(":", 1)[1]
    try:
        assert saved["base_url"] == base_url
        assert key not in state.read_text()
        assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200
        status = subprocess.run(cmd + ["status", "--run-dir", str(run_dir), "--api-key-env", "CLI_TEST_KEY"],
                                env=env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        info = json.loads(status.stdout)
        assert info["ok"] is True and info["base_url"] == base_url and info["served_model_name"] == "tiny-qwen3"
        chunks, content = _stream_chat(base_url, "tiny-qwen3", key, n_tokens=8)
        assert chunks[-1]["usage"]["completion_tokens"] == 8
        assert group_members(saved["pgid"])  # the server and its engine processes are alive
        _assert_engine_niced(saved["pgid"], json.loads(Path(server_json).read_text()))
    finally:
        down = subprocess.run(cmd + ["down", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert group_members(saved["pgid"]) == []
    leftovers = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and f"--port {port}" in " ".join(proc.info["cmdline"] or []):
            leftovers.append(proc.pid)
    assert leftovers == []
    assert not state.exists()
    _wait_gone(saved["engine_nice_pid"])  # the keeper ends with the server's group
    assert Path(server_json).resolve() == (run_dir / "server.json").resolve()
    assert (run_dir / "server.log").stat().st_size > 0
    text = Path(server_json).read_text()
    assert key not in text
    assert json.loads(text)["base_url"] == base_url
    print(f"envelope server up took {up_s:.1f} s")
