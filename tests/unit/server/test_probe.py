import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from envelope.secrets import Secret
from server.probe import NotReadyError, ServerExitedError, probe_server, wait_until_ready


class Stub:
    """A local HTTP server on port 0: /health answers 503 for the first ``unhealthy`` calls, then 200."""

    def __init__(self, *, unhealthy=0, key=None, healthy=True):
        self.unhealthy = unhealthy
        self.key = key
        self.healthy = healthy
        self.health_calls = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode() if not isinstance(body, str) else body.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/health":
                    stub.health_calls += 1
                    ok = stub.healthy and stub.health_calls > stub.unhealthy
                    self._send(200 if ok else 503, {})
                elif self.path == "/v1/models":
                    if stub.key and self.headers.get("Authorization") != f"Bearer {stub.key}":
                        self._send(401, {"error": "Unauthorized"})
                    else:
                        self._send(200, {"data": [{"id": "m", "root": "/p/m", "max_model_len": 777}]})
                elif self.path == "/version":
                    self._send(200, {"version": "9.9.9"})
                elif self.path == "/metrics":
                    self._send(200, "vllm:num_requests_running 0\n")
                else:
                    self._send(404, {})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_waits_through_503_until_healthy():
    with Stub(unhealthy=3) as stub:
        models = wait_until_ready(stub.url, timeout_s=10, poll_interval_s=0.01)
    assert models["data"][0]["id"] == "m"
    assert stub.health_calls == 4


def test_never_healthy_times_out_naming_the_last_answer():
    with Stub(healthy=False) as stub:
        t0 = time.monotonic()
        with pytest.raises(NotReadyError, match=r"^not ready after 0.5 s \(last: /health answered 503\)$"):
            wait_until_ready(stub.url, timeout_s=0.5, poll_interval_s=0.05)
        assert 0.5 <= time.monotonic() - t0 < 3


def test_nothing_listening_times_out_with_cannot_connect():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(NotReadyError, match=r"last: cannot connect \(ConnectError\)"):
            wait_until_ready(f"http://127.0.0.1:{port}", timeout_s=0.3, poll_interval_s=0.05)


def test_wrong_key_fails_at_once():
    with Stub(key="right") as stub:
        t0 = time.monotonic()
        with pytest.raises(NotReadyError, match="401: the API key was rejected"):
            wait_until_ready(stub.url, timeout_s=30, api_key=Secret("wrong"), poll_interval_s=0.01)
        assert time.monotonic() - t0 < 5
        assert wait_until_ready(stub.url, timeout_s=5, api_key=Secret("right"))["data"][0]["max_model_len"] == 777


def test_process_exit_is_reported():
    with Stub(healthy=False) as stub:
        codes = iter([None, None, 3])
        with pytest.raises(ServerExitedError) as err:
            wait_until_ready(stub.url, timeout_s=10, poll_interval_s=0.01, exit_code=lambda: next(codes))
    assert err.value.returncode == 3
    assert stub.health_calls == 2


def test_probe_describes_a_running_server():
    with Stub(key="k") as stub:
        info = probe_server(stub.url + "/v1/", api_key=Secret("k"))
    assert info["launched"] is False
    assert info["ok"] is True
    assert info["base_url"] == stub.url
    assert info["served_model_names"] == ["m"]
    assert info["model"] == "/p/m"
    assert info["max_model_len"] == 777
    assert info["vllm_version"] == "9.9.9"
    assert info["metrics_ok"] is True
    assert info["api_key_set"] is True
    assert isinstance(info["hardware"]["cpu_logical_cores"], int)


def test_probe_of_a_dead_url_says_so_without_raising():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        info = probe_server(f"http://127.0.0.1:{port}", timeout_s=1)
    assert info["ok"] is False
    assert info["health"] == "error: ConnectError"
    assert info["models_status"] == "error: ConnectError"  # not asked again: it would only time out too
    assert info["metrics_ok"] is False
    assert "served_model_name" not in info
