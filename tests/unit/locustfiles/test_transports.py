"""The fasthttp transport against the simulated server: timeouts and HTTP errors become categories."""

from __future__ import annotations

import time
from contextlib import contextmanager

import pytest
from geventhttpclient.client import HTTPClientPool

from envelope.records import ErrorCategory
from envelope.stream import StreamObserver
from locustfiles.transports import RequestSpec, stream_fasthttp
from server.sim import FaultSpec, SimConfig, SimServer


def _request(base_url: str, *, first_token_s: float = 5.0, total_s: float = 10.0, model: str = "sim-model"):
    body = {"model": model, "messages": [{"role": "user", "content": " a b c"}], "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}, "max_tokens": 8}
    spec = RequestSpec(path="/v1/chat/completions", body=body, headers={}, connect_timeout_s=2,
                       first_token_timeout_s=first_token_s, total_timeout_s=total_s)
    pool = HTTPClientPool(connection_timeout=2, network_timeout=30)
    obs = StreamObserver(time.perf_counter())
    try:
        out = stream_fasthttp(pool, base_url, spec, obs)
    finally:
        pool.close()
    return out, obs.finish(time.perf_counter(), error_category=out.error_category,
                           error_detail=out.error_detail, http_status=out.http_status)


@contextmanager
def _sim(*faults: FaultSpec):
    """A simulated server on a free port, its base URL yielded."""
    server = SimServer(SimConfig(ttft_s=0.01, itl_s=0.005, faults=faults))
    base_url = server.start_in_thread()
    try:
        yield base_url
    finally:
        server.stop()


def test_a_clean_stream_is_recorded_whole():
    with _sim() as base:
        out, rec = _request(base)
    assert out.http_status == 200 and rec["error_category"] is None
    assert rec["output_tokens"] == 8 and len(rec["chunk_offsets_s"]) == 8


def test_a_stall_before_the_first_token_is_a_first_token_timeout():
    with _sim(FaultSpec(kind="stall", after_chunks=0, stall_s=3.0)) as base:
        out, rec = _request(base, first_token_s=0.3)
    assert rec["error_category"] == ErrorCategory.TIMEOUT_FIRST_TOKEN
    assert rec["t_first_token_s"] is None


def test_a_stall_mid_stream_is_a_total_timeout_and_keeps_the_tokens_seen():
    with _sim(FaultSpec(kind="stall", after_chunks=3, stall_s=3.0)) as base:
        out, rec = _request(base, first_token_s=1.0, total_s=0.6)
    assert rec["error_category"] == ErrorCategory.TIMEOUT_TOTAL
    assert len(rec["chunk_offsets_s"]) == 3


@pytest.mark.parametrize("kind,category", [("http_500", "http_500"), ("http_503", "http_503"),
                                           ("http_429", "http_429")])
def test_http_errors_carry_their_status(kind, category):
    with _sim(FaultSpec(kind=kind)) as base:
        out, rec = _request(base)
    assert rec["error_category"] == category
    assert out.http_status == int(category.split("_")[1])


def test_a_wrong_model_is_a_404_with_the_server_message():
    with _sim() as base:
        out, rec = _request(base, model="no-such-model")
    assert rec["error_category"] == ErrorCategory.HTTP_404
    assert "no-such-model" in (rec["error_detail"] or "")


def test_a_closed_port_is_a_connect_error():
    with _sim() as base:
        pass
    out, rec = _request(base)  # the server is stopped: nothing listens there now
    assert rec["error_category"] == ErrorCategory.CONNECT_ERROR
