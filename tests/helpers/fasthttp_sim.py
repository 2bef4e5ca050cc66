"""The one streamed chat request that the fasthttp-transport tests send to the simulator, and their pool.

Imported inside fresh interpreters (after ``import locust``, which monkey-patches the standard library),
from the repository root with ``tests`` on ``sys.path``.
"""

from __future__ import annotations

from geventhttpclient.client import HTTPClientPool

from locustfiles.transports import RequestSpec


def chat_spec() -> RequestSpec:
    """A 4-token streamed chat completion for the simulator's model."""
    body = {"model": "sim-model", "messages": [{"role": "user", "content": " a b c"}], "stream": True,
            "max_tokens": 4}
    return RequestSpec(path="/v1/chat/completions", body=body, headers={}, connect_timeout_s=5,
                       first_token_timeout_s=10, total_timeout_s=20)


def client_pool() -> HTTPClientPool:
    return HTTPClientPool(connection_timeout=5, network_timeout=30)
