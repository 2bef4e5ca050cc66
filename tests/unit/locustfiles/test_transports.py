"""The transports against the simulated server: timeouts, HTTP errors and cut streams become categories."""

from __future__ import annotations

import time
from contextlib import contextmanager

import pytest
from geventhttpclient.client import HTTPClientPool

from envelope.records import ErrorCategory
from envelope.stream import StreamObserver
from locustfiles.transports import RequestSpec, openai_client, stream_fasthttp, stream_openai
from server.sim import FaultSpec, SimConfig, SimServer


def _request(base_url: str, *, first_token_s: float = 5.0, total_s: float = 10.0, model: str = "sim-model",
             transport: str = "fasthttp"):
    body = {"model": model, "messages": [{"role": "user", "content": " a b c"}], "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}, "max_tokens": 8}
    spec = RequestSpec(path="/v1/chat/completions", body=body, headers={}, connect_timeout_s=2,
                       first_token_timeout_s=first_token_s, total_timeout_s=total_s)
    obs = StreamObserver(time.perf_counter())
    if transport.startswith("openai"):
        # the clients the users (one connection) and the open-loop dispatcher (a pool) make
        pool = 4 if transport == "openai-pool" else None
        with openai_client(base_url, "EMPTY", spec.connect_timeout_s, max_connections=pool) as client:
            out = stream_openai(client, spec, obs)
    else:
        pool = HTTPClientPool(connection_timeout=2, network_timeout=30)
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


@pytest.mark.parametrize("transport", ["fasthttp", "openai", "openai-pool"])
def test_a_clean_stream_is_recorded_whole(transport):
    with _sim() as base:
        out, rec = _request(base, transport=transport)
    assert out.http_status == 200 and rec["error_category"] is None
    assert rec["output_tokens"] == 8 and len(rec["chunk_offsets_s"]) == 8


@pytest.mark.parametrize("transport", ["fasthttp", "openai"])
def test_a_stream_cut_without_done_is_incomplete(transport):
    # every token, the finish chunk and the usage arrive; only [DONE] is missing
    with _sim(FaultSpec(kind="no_done")) as base:
        out, rec = _request(base, transport=transport)
    assert out.http_status == 200
    assert rec["error_category"] == ErrorCategory.INCOMPLETE_STREAM
    assert rec["output_tokens"] == 8 and len(rec["chunk_offsets_s"]) == 8  # what arrived is kept


def test_the_openai_transport_without_the_sdks_decoder_needs_a_finish_reason():
    """Should a later SDK lose the decoder the transport watches, a stream that ended before any
    finish_reason still reads as cut (a cut after it would then pass as a success)."""
    from types import SimpleNamespace

    class Chunk:
        def __init__(self, data):
            self.data = data

        def model_dump(self, exclude_unset=True):
            return self.data

    class FakeStream(list):
        def close(self):
            pass

    def client_streaming(*chunks):
        create = lambda **kwargs: FakeStream(Chunk(c) for c in chunks)  # noqa: E731
        return SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create)))

    spec = RequestSpec(path="/v1/chat/completions", body={"model": "m", "messages": [], "stream": True},
                       headers={}, connect_timeout_s=1, first_token_timeout_s=5, total_timeout_s=5)
    token = {"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None}]}
    finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
    for chunks, category in (((token,), ErrorCategory.INCOMPLETE_STREAM), ((token, finish), None)):
        obs = StreamObserver(time.perf_counter())
        out = stream_openai(client_streaming(*chunks), spec, obs)
        rec = obs.finish(time.perf_counter(), error_category=out.error_category, error_detail=out.error_detail)
        assert rec["error_category"] == category
        assert rec["output_tokens_client_estimate"] == 1


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


def test_multi_token_chunks_match_the_servers_truth():
    config = SimConfig(ttft_s=0.005, itl_s=0.002, multi_token_chunk_probability=0.3, multi_token_chunk_tokens=3)
    server = SimServer(config)
    base = server.start_in_thread()
    try:
        body = {"model": "sim-model", "messages": [{"role": "user", "content": " a b c"}], "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}, "max_tokens": 60}
        spec = RequestSpec(path="/v1/chat/completions", body=body, headers={}, connect_timeout_s=2,
                           first_token_timeout_s=5, total_timeout_s=10)
        pool = HTTPClientPool(connection_timeout=2, network_timeout=30)
        obs = StreamObserver(time.perf_counter())
        out = stream_fasthttp(pool, base, spec, obs)
        rec = obs.finish(time.perf_counter(), error_category=out.error_category, http_status=out.http_status)
        pool.close()
        truth = server.app.truth.since(0)
    finally:
        server.stop()
    assert rec["error_category"] is None and len(truth) == 1
    assert rec["chunk_tokens"] == tuple(truth[0]["chunk_tokens"])
    assert 3 in rec["chunk_tokens"] and rec["output_tokens"] == 60
    # every chunk arrived after the server wrote it (one clock: perf_counter in both)
    t = truth[0]
    for client_off, server_off in zip(rec["chunk_offsets_s"], t["chunk_offsets_s"]):
        assert obs.t_start_s + client_off >= t["t_arrival_s"] + server_off


def test_a_backlog_yields_to_other_streams_and_loses_nothing(monkeypatch):
    import locustfiles.transports as transports

    yields = []
    real_yield = transports._yield
    monkeypatch.setattr(transports, "_RECV_BYTES", 512)  # small reads: the backlog fills each one
    monkeypatch.setattr(transports, "_yield", lambda: (yields.append(1), real_yield()))
    server = SimServer(SimConfig(ttft_s=0.0, itl_s=0.0))  # every chunk written at once
    base = server.start_in_thread()
    try:
        body = {"model": "sim-model", "messages": [{"role": "user", "content": " a"}], "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}, "max_tokens": 300}
        spec = RequestSpec(path="/v1/chat/completions", body=body, headers={}, connect_timeout_s=2,
                           first_token_timeout_s=5, total_timeout_s=10)
        pool = HTTPClientPool(connection_timeout=2, network_timeout=30)
        obs = StreamObserver(time.perf_counter())
        out = stream_fasthttp(pool, base, spec, obs)
        rec = obs.finish(time.perf_counter(), error_category=out.error_category)
        # the socket went back to the pool with its network timeout restored
        sock = pool.get_client(transports._url(base, spec.path))._connection_pool._socket_queue.get(block=False)
        timeout = sock.timeout
        sock.close()
        pool.close()
    finally:
        server.stop()
    assert timeout == 30
    assert rec["error_category"] is None and rec["chunk_tokens"] == (1,) * 300
    assert len(yields) > 10


class _Sock:
    """A socket whose recv hands out pieces; ``_wait`` (gevent's) is recorded."""

    def __init__(self, pieces):
        self.pieces, self.log = list(pieces), []
        self._read_event = object()

    def _wait(self, event):
        assert event is self._read_event
        self.log.append("wait")

    def recv(self, n):
        self.log.append("recv")
        return self.pieces.pop(0)[:n] if self.pieces else b""


class _Resp:
    def __init__(self, pieces):
        self._sock = _Sock(pieces)
        self._body_buffer = bytearray()
        self.message_complete = False

    def get(self, key, default=None):
        return {"transfer-encoding": "chunked"}.get(key, default)

    def feed(self, data):
        self._body_buffer += data


def test_reader_waits_before_recv_only_after_the_socket_was_emptied():
    from locustfiles.transports import _BodyReader

    resp = _Resp([b"x" * 8, b"y" * 3, b"z" * 8])
    reader = _BodyReader(resp, recv_bytes=8)
    assert reader.read() == b"x" * 8 and reader.backlog  # a full buffer: more is probably waiting
    assert reader.read() == b"y" * 3 and not reader.backlog  # a short read emptied the socket...
    assert reader.read() == b"z" * 8  # ...so the next read waits for data before its recv
    assert resp._sock.log == ["recv", "recv", "wait", "recv"]
