"""Bad input through the real command lines: one clear line naming the file:line or the flag, a non-zero
exit, no traceback, and no load sent (the simulated server's request counter does not move)."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.sim.config import FaultSpec, SimConfig
from server.sim.server import SimServer

REPO = Path(__file__).resolve().parents[2]
LOCUSTFILE = REPO / "locustfiles" / "llm.py"
MAX_MODEL_LEN = 512

pytestmark = [pytest.mark.e2e]

GOOD = """\
name: good
defaults:
  client: fasthttp
  timeouts: {connect_s: 5, first_token_s: 10, total_s: 10}
  workload: {prompt_tokens: 16, output_tokens: 8, fixed_output: true}
passes:
  - name: p
    stages:
      - {users: 1, duration_s: 5}
      - {users: 2, duration_s: 5}
"""


@pytest.fixture(scope="module")
def sim():
    """``python -m server.sim`` (max_model_len 512, API key required) in a child process: (base_url, key)."""
    key = "sk-bad-" + secrets.token_hex(12)
    proc = SimServer(SimConfig(api_key=key, max_model_len=MAX_MODEL_LEN, ttft_s=0.01, itl_s=0.002)).start_in_subprocess()
    try:
        yield proc.base_url, key
    finally:
        proc.stop()


def served(base_url: str) -> int:
    """Completion requests the simulated server has accepted so far (all of them, faulted or not)."""
    return httpx.get(f"{base_url}/sim/faults", timeout=10).json()["requests"]


def scenario(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def envelope(tmp_path: Path, *args: str, key: str | None = None, extra_env: dict | None = None,
             timeout_s: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVELOPE_")}
    if key is not None:
        env["ENVELOPE_API_KEY"] = key
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "envelope.cli", "run", *args, "--out", str(tmp_path / "runs")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)


def assert_one_line(proc: subprocess.CompletedProcess, pattern: str, tmp_path: Path) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert proc.stdout == ""
    assert not (tmp_path / "runs").exists()  # no run directory: nothing was started
    return lines[0]


# --------------------------------------------------------------------------- the scenario file


@pytest.mark.parametrize("text, pattern", [
    ("name: x\npasses: [\n", r":3: YAML syntax error"),
    (GOOD.replace("{users: 2, duration_s: 5}", "{users: 2, duration_s: 5, colour: red}"),
     r":10: passes\[0\]\.stages\[1\]\.colour: unknown key 'colour'"),
    (GOOD.replace("name: good\n", "name: good\nrecord_txt: true\n"), r":2: record_txt: unknown key 'record_txt'"),
    (GOOD.replace("users: 2,", "users: ten,"), r":10: passes\[0\]\.stages\[1\]\.users: .*valid integer .*'ten'"),
    (GOOD.replace("duration_s: 5}\n      - {users: 2", "duration_s: five}\n      - {users: 2"),
     r":9: passes\[0\]\.stages\[0\]\.duration_s: .*valid number"),
    (GOOD.replace("users: 2,", "users: 0,"), r":10: passes\[0\]\.stages\[1\]\.users: .*greater than 0 \(got 0\)"),
    (GOOD.replace("users: 1,", "users: -3,"), r":9: passes\[0\]\.stages\[0\]\.users: .*greater than 0 \(got -3\)"),
], ids=["invalid-yaml", "unknown-stage-key", "unknown-top-key", "users-wrong-type", "duration-wrong-type",
        "zero-users", "negative-users"])
def test_bad_scenario_names_file_and_line(tmp_path, sim, text, pattern):
    url, key = sim
    path = scenario(tmp_path, text)
    before = served(url)
    proc = envelope(tmp_path, "--scenario", str(path), "--host", url, key=key)
    line = assert_one_line(proc, rf"^envelope: {re.escape(str(path))}{pattern}", tmp_path)
    assert served(url) == before, line


@pytest.mark.parametrize("name, content, line, what", [
    ("d.jsonl", '{"prompt": "hello"}\n{"prompt": ""}\n', 2, "prompt"),
    ("d.json", '[{"conversations": [{"from": "human", "value": "hi"}]},\n {"conversations": [{"from": "human"}]}]\n',
     2, "value"),
    ("t.jsonl", '{"t_s": 0, "prompt_tokens": 8, "output_tokens": 4}\n{"t_s": -2, "prompt_tokens": 8, "output_tokens": 4}\n',
     2, "negative"),
    ("t.jsonl", "", 1, "empty"),
])
def test_bad_dataset_or_trace_file_names_its_line_before_any_load(tmp_path, sim, name, content, line, what):
    url, key = sim
    (tmp_path / name).write_text(content)
    stage = ("{trace: {path: t.jsonl}}" if name.startswith("t")
             else "{name: ds, users: 1, duration_s: 5, workload: {dataset: {path: %s}}}" % name)
    path = scenario(tmp_path, GOOD.replace("      - {users: 2, duration_s: 5}\n", f"      - {stage}\n"))
    before = served(url)
    proc = envelope(tmp_path, "--scenario", str(path), "--host", url, key=key)
    text = assert_one_line(proc, rf"^envelope: {re.escape(str(tmp_path / name))}:{line}: ", tmp_path)
    assert what in text.lower(), text
    assert served(url) == before


def test_stage_longer_than_the_servers_max_model_len(tmp_path, sim):
    url, key = sim
    text = GOOD.replace("      - {users: 2, duration_s: 5}\n",
                        "      - {users: 2, duration_s: 5, workload: {prompt_tokens: 600}}\n")
    path = scenario(tmp_path, text)
    before = served(url)
    proc = envelope(tmp_path, "--scenario", str(path), "--host", url, key=key)
    assert_one_line(proc, rf"^envelope: {re.escape(str(path))}:10: pass 'p', stage 'p-2u': prompt_tokens up to 600 "
                          rf"\+ output_tokens up to 8 = 608 exceeds the server's max_model_len {MAX_MODEL_LEN}", tmp_path)
    assert served(url) == before


def test_stage_longer_than_the_profiles_max_model_len_fails_before_launching(tmp_path):
    # cpu-tiny serves 4096 tokens: found from the profile, without starting vLLM
    path = scenario(tmp_path, GOOD.replace("prompt_tokens: 16", "prompt_tokens: 5000"))
    proc = envelope(tmp_path, "--scenario", str(path), "--profile", "cpu-tiny")
    assert_one_line(proc, rf"^envelope: {re.escape(str(path))}:9: pass 'p', stage 'p-1u': .*max_model_len 4096 "
                          r"\(profile cpu-tiny\) \(and 1 more\)$", tmp_path)


# --------------------------------------------------------------------------- the server


def test_unreachable_host(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        proc = envelope(tmp_path, "--scenario", str(scenario(tmp_path, GOOD)), "--host", f"http://127.0.0.1:{port}")
    assert_one_line(proc, rf"^envelope: --host http://127\.0\.0\.1:{port}: cannot reach the server \(ConnectError\)$",
                    tmp_path)


def test_wrong_model_name_by_flag(tmp_path, sim):
    url, key = sim
    before = served(url)
    proc = envelope(tmp_path, "--scenario", str(scenario(tmp_path, GOOD)), "--host", url, "--model", "nope", key=key)
    assert_one_line(proc, r"^envelope: --model nope: not served by .* \(it serves: sim-model\)$", tmp_path)
    assert served(url) == before


def test_wrong_model_name_in_the_scenario(tmp_path, sim):
    url, key = sim
    path = scenario(tmp_path, GOOD.replace("name: good\n", "name: good\nseed: 1\nmodel: nope\n"))
    before = served(url)
    proc = envelope(tmp_path, "--scenario", str(path), "--host", url, key=key)
    assert_one_line(proc, rf"^envelope: {re.escape(str(path))}:3: model 'nope' is not served by", tmp_path)
    assert served(url) == before


def test_wrong_model_name_for_the_profile_fails_before_launching(tmp_path):
    proc = envelope(tmp_path, "--scenario", str(scenario(tmp_path, GOOD)), "--profile", "cpu-tiny", "--model", "nope")
    assert_one_line(proc, r"^envelope: --model nope: not served by profile cpu-tiny \(it serves: tiny-qwen3\)$",
                    tmp_path)


def test_wrong_api_key_from_the_environment(tmp_path, sim):
    url, _ = sim
    before = served(url)
    proc = envelope(tmp_path, "--scenario", str(scenario(tmp_path, GOOD)), "--host", url, key="sk-wrong")
    assert_one_line(proc, r"^envelope: --host .*: the server rejected the API key from ENVELOPE_API_KEY "
                          r"\(GET /v1/models answered HTTP 401\)$", tmp_path)
    assert "sk-wrong" not in proc.stderr
    assert served(url) == before


def test_wrong_api_key_from_a_file(tmp_path, sim):
    url, _ = sim
    key_file = tmp_path / "key.txt"
    key_file.write_text("sk-wrong-from-file\n")
    before = served(url)
    proc = envelope(tmp_path, "--scenario", str(scenario(tmp_path, GOOD)), "--host", url,
                    "--api-key-file", str(key_file))
    assert_one_line(proc, rf"the server rejected the API key from --api-key-file {re.escape(str(key_file))} ", tmp_path)
    assert "sk-wrong-from-file" not in proc.stderr
    assert served(url) == before


def test_missing_api_key(tmp_path, sim):
    url, _ = sim
    proc = envelope(tmp_path, "--scenario", str(scenario(tmp_path, GOOD)), "--host", url)
    assert_one_line(proc, r"the server wants an API key .*HTTP 401.*set ENVELOPE_API_KEY", tmp_path)


def test_profile_that_does_not_exist(tmp_path):
    proc = envelope(tmp_path, "--scenario", str(scenario(tmp_path, GOOD)), "--profile", "no-such-profile")
    assert_one_line(proc, r"^envelope: unknown server profile 'no-such-profile'; available: .*cpu-tiny", tmp_path)
    proc = envelope(tmp_path, "--scenario", str(scenario(tmp_path, GOOD)), "--profile", str(tmp_path / "nope.yaml"))
    assert_one_line(proc, r"nope\.yaml: file not found$", tmp_path)


def test_invalid_profile_file_names_its_line(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("name: p\ndevice: cpu\nmodel: org/m\nserved_model_name: m\nmax_model_len: -1\n")
    proc = envelope(tmp_path, "--scenario", str(scenario(tmp_path, GOOD)), "--profile", str(profile))
    assert_one_line(proc, rf"^envelope: {re.escape(str(profile))}:5: max_model_len: .*greater than 0", tmp_path)


@pytest.mark.parametrize("args, pattern", [
    (["--processes", "0"], r"--processes must be at least 1 \(got 0\)"),
    (["--processes", "two"], r"argument --processes: invalid value 'two': a number of processes or 'auto'"),
    (["--duration-scale", "-1"], r"--duration-scale must be positive \(got -1\)"),
    (["--api-key-env", "ENVELOPE_TEST_NEVER_SET"], r"--api-key-env ENVELOPE_TEST_NEVER_SET: the variable is not set"),
    (["--colour", "red"], r"unrecognized arguments: --colour red"),
], ids=["zero-processes", "processes-type", "negative-scale", "unset-key-variable", "unknown-flag"])
def test_bad_flags_are_named(tmp_path, sim, args, pattern):
    url, key = sim
    proc = envelope(tmp_path, "--scenario", str(scenario(tmp_path, GOOD)), "--host", url, *args, key=key)
    assert_one_line(proc, rf"^envelope: .*{pattern}", tmp_path)


def test_server_cli_unknown_profile_and_bad_flag(tmp_path):
    for args, pattern in ((["up", "--profile", "no-such-profile"], r"^error: unknown server profile 'no-such-profile'"),
                          (["up"], r"^error: the following arguments are required: --profile"),
                          (["up", "--profile", "cpu-tiny", "--port", "abc"], r"argument --port: invalid int")):
        proc = subprocess.run([sys.executable, "-m", "server", *args, "--state", str(tmp_path / "state.json")],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.splitlines()) == 1 and re.search(pattern, proc.stderr), proc.stderr
        assert not (tmp_path / "state.json").exists()


# --------------------------------------------------------------------------- Locust on its own


def locust(tmp_path: Path, scenario_path: Path, host: str, key: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVELOPE_")}
    if key:
        env["ENVELOPE_API_KEY"] = key
    run_dir = tmp_path / "locust-run"
    return subprocess.run([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
                           "--scenario", str(scenario_path), "--host", host, "--run-dir", str(run_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["invalid-yaml", "zero-users", "too-long", "wrong-model", "wrong-key"])
def test_locust_alone_refuses_bad_input_without_load(tmp_path, sim, case):
    url, key = sim
    text, pattern = {
        "invalid-yaml": ("name: x\npasses: [\n", r"s\.yaml:3: YAML syntax error"),
        "zero-users": (GOOD.replace("users: 2,", "users: 0,"), r"s\.yaml:10: .*greater than 0"),
        "too-long": (GOOD.replace("prompt_tokens: 16", "prompt_tokens: 600"), r"exceeds the server's max_model_len 512"),
        "wrong-model": (GOOD.replace("name: good\n", "name: good\nmodel: nope\n"), r"model 'nope' is not served"),
        "wrong-key": (GOOD, r"rejected the API key \(HTTP 401\)"),
    }[case]
    before = served(url)
    proc = locust(tmp_path, scenario(tmp_path, text), url, "sk-wrong" if case == "wrong-key" else key)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    ours = [line for line in proc.stderr.splitlines() if line.startswith("envelope: ")]
    assert ours and re.search(pattern, ours[0]), proc.stderr[-2000:]
    assert served(url) == before
    assert not list((tmp_path / "locust-run").glob("records/*.jsonl"))


# --------------------------------------------------------------------------- 401 / 404 once the load runs


@pytest.fixture
def faulty_sim(request):
    """A simulated server whose /v1/models is fine but every completion answers the given fault."""
    key = "sk-f-" + secrets.token_hex(8)
    config = SimConfig(api_key=key, ttft_s=0.01, itl_s=0.002, faults=(FaultSpec(kind=request.param),))
    proc = SimServer(config).start_in_subprocess()
    try:
        yield proc.base_url, key, request.param
    finally:
        proc.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("faulty_sim", ["http_401", "http_404"], indirect=True)
def test_401_or_404_on_the_first_requests_stops_the_run_early(tmp_path, faulty_sim):
    url, key, kind = faulty_sim
    status = kind.removeprefix("http_")
    text = GOOD.replace("duration_s: 5}", "duration_s: 10}")
    proc = envelope(tmp_path, "--scenario", str(scenario(tmp_path, text)), "--host", url, "--no-analysis",
                    key=key, timeout_s=100)
    served_n = served(url)
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr
    ours = [line for line in proc.stderr.splitlines() if line.startswith("envelope: ")]
    assert any(f"HTTP {status}" in line and "Stopped early" in line for line in ours), proc.stderr
    # a handful of identical failures, not the thousands that 20 s against an instant 401 would give
    assert 0 < served_n < 20, served_n
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "run.json").read_text())["status"] != "complete"


# --------------------------------------------------------------------------- a server that does not stream


@pytest.fixture
def plain_json_server():
    """An OpenAI-looking server that answers every completion, streaming or not, with one JSON body."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    posts: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                self._send(200, {})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": "plain", "max_model_len": 4096}]})
            else:
                self._send(404, {"detail": "Not Found"})

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path in ("/v1/chat/completions", "/v1/completions"):
                posts.append(self.path)
                self._send(200, {"id": "x", "object": "chat.completion", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})
            else:
                self._send(404, {"detail": "Not Found"})

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", posts
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.timeout(120)
def test_a_server_that_answers_a_stream_with_one_json_body_is_stopped_before_any_load(tmp_path, plain_json_server):
    """Such a server once took 687 requests in 25 s, each recorded as incomplete_stream: now the probe says it
    in one line and no load is sent (the probe's one request is all the server saw)."""
    url, posts = plain_json_server
    proc = envelope(tmp_path, "--scenario", str(scenario(tmp_path, GOOD)), "--host", url, timeout_s=90)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    ours = [line for line in proc.stderr.splitlines() if "plain JSON body" in line]
    assert len(ours) == 1, proc.stderr[-2000:]
    assert ("POST /v1/chat/completions answered a streaming request (stream: true) with one plain JSON body, "
            "not server-sent events") in ours[0]
    assert posts == ["/v1/chat/completions"]
    assert not list((tmp_path / "runs").glob("*/records/*.jsonl"))
