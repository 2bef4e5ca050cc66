"""Pure helpers of the Locust side: client assignment and the per-recv body reader."""

from collections import Counter

import pytest

from locustfiles.transports import _read_some
from envelope.scenario import pick_client_name


def test_weighted_round_robin_mixes_clients_in_proportion():
    clients = [("chat", 3.0), ("eval", 1.0)]
    names = [pick_client_name(clients, n) for n in range(8)]
    assert Counter(names) == {"chat": 6, "eval": 2}
    assert names[:4].count("eval") == 1  # never a run of four of one client when weights are 3:1


def test_single_client_always_chosen():
    assert {pick_client_name([("only", 1.0)], n) for n in range(5)} == {"only"}


class FakeSocket:
    def __init__(self, pieces):
        self.pieces = list(pieces)
        self.calls = 0

    def recv(self, n):
        self.calls += 1
        return self.pieces.pop(0) if self.pieces else b""


class FakeResponse:
    """Mimics geventhttpclient's response: feed() parses into _body_buffer; end marks completion."""

    block_size = 4096

    def __init__(self, pieces, pre=b"", headers=None):
        self._sock = FakeSocket(pieces)
        self._body_buffer = bytearray(pre)
        self.message_complete = False
        self._headers = {"transfer-encoding": "chunked"} if headers is None else headers

    def get(self, key, default=None):
        return self._headers.get(key, default)

    def feed(self, data):
        if data == b"END":
            self.message_complete = True
            self._sock = None
            return
        if data != b"FRAMING":  # chunk framing alone parses to no body bytes
            self._body_buffer += data


def test_read_some_returns_each_recv_without_waiting_for_more():
    resp = FakeResponse([b"data: a\n\n", b"FRAMING", b"data: b\n\n", b"END"], pre=b"data: 0\n\n")
    assert _read_some(resp) == b"data: 0\n\n"  # already buffered with the headers: no recv
    assert resp._sock.calls == 0
    assert _read_some(resp) == b"data: a\n\n"
    assert _read_some(resp) == b"data: b\n\n"  # framing-only recv is skipped, not returned empty
    assert _read_some(resp) == b""


def test_read_some_reports_a_connection_closed_mid_stream():
    resp = FakeResponse([b"data: a\n\n"])
    assert _read_some(resp) == b"data: a\n\n"
    with pytest.raises(ConnectionResetError):
        _read_some(resp)


def test_read_some_ends_a_close_delimited_body_at_the_close():
    """Without Content-Length or chunking, the server's close is the end of the body, not a reset."""
    resp = FakeResponse([b"data: a\n\n"], headers={})
    assert _read_some(resp) == b"data: a\n\n"
    assert _read_some(resp) == b""
