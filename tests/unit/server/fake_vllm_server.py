"""A stand-in for ``python -m vllm.entrypoints.openai.api_server`` used by the launcher's unit tests.

Accepts the same flags (only --port, --host and --served-model-name matter) and
behaves according to ``FAKE_VLLM_MODE``: ``ok`` serves /health, /v1/models
(checking ``VLLM_API_KEY`` like vLLM; ``FAKE_MAX_MODEL_LEN`` overrides the reported length), /version and /metrics; ``crash`` logs a
line and exits 1; ``never-healthy`` answers /health with 503; ``ignore-term``
serves like ``ok`` but ignores SIGTERM, as does a child it forks. A POST to
/v1/chat/completions is answered when its model is the served name (the
transformers-serve launcher's warm-up).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--served-model-name", default="fake")
parser.add_argument("--max-model-len", type=int, default=1234)
args, _unknown = parser.parse_known_args()
mode = os.environ.get("FAKE_VLLM_MODE", "ok")
key = os.environ.get("VLLM_API_KEY")

print(f"fake vllm starting in mode {mode} on port {args.port}", flush=True)
if mode == "crash":
    print("RuntimeError: engine core failed to start (fake)", flush=True)
    sys.exit(1)
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(
        [sys.executable, "-c", "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"]
    )
    print(f"child pid {child.pid}", flush=True)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _send(self, code, body, ctype="application/json"):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            self._send(503 if mode == "never-healthy" else 200, {})
        elif self.path == "/v1/models":
            if key and self.headers.get("Authorization") != f"Bearer {key}":
                self._send(401, {"error": "Unauthorized"})
            else:
                self._send(200, {"object": "list", "data": [
                    {"id": args.served_model_name, "root": "/models/fake", "max_model_len": int(os.environ.get("FAKE_MAX_MODEL_LEN", args.max_model_len))}]})
        elif self.path == "/version":
            self._send(200, {"version": "0.0.fake"})
        elif self.path == "/metrics":
            self._send(200, "vllm:num_requests_running 0\n", "text/plain")
        else:
            self._send(404, {})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path != "/v1/chat/completions":
            self._send(404, {})
        elif body.get("model") != args.served_model_name:  # as transformers serve pinned to one model
            self._send(400, {"detail": f"Server is pinned to '{args.served_model_name}'"})
        else:
            self._send(200, {"object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "length"}]})


ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
