"""Which error category an exception a client raised means (locustfiles.errors)."""

import http.client
import socket

import pytest

from envelope.records import ErrorCategory
from locustfiles.errors import category_for_exception


class Timeout(BaseException):
    """Stands in for gevent.timeout.Timeout, matched by class name."""


class APIConnectionError(Exception):
    pass


class RemoteProtocolError(Exception):
    pass


def _wrapped(outer, inner):
    try:
        try:
            raise inner
        except BaseException as e:
            raise outer from e
    except BaseException as e:
        return e


@pytest.mark.parametrize(
    ("exc", "category"),
    [
        (ConnectionRefusedError(), "connect_error"),
        (socket.gaierror(), "connect_error"),
        (ConnectionResetError(), "connection_reset"),
        (BrokenPipeError(), "connection_reset"),
        (http.client.IncompleteRead(b"x"), "connection_reset"),
        (socket.timeout(), "timeout_total"),
        (TimeoutError(), "timeout_total"),
        (Timeout(), "timeout_total"),
        (ValueError("bug"), "client_error"),
        (KeyError("bug"), "client_error"),
        (APIConnectionError(), "connect_error"),
        (_wrapped(APIConnectionError(), RemoteProtocolError()), "connection_reset"),
        (_wrapped(RuntimeError(), ConnectionRefusedError()), "connect_error"),
    ],
)
def test_category_for_exception(exc, category):
    assert category_for_exception(exc) == category


def test_category_for_real_client_exceptions():
    httpx = pytest.importorskip("httpx")
    openai = pytest.importorskip("openai")
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    assert category_for_exception(httpx.ConnectTimeout("t")) == "timeout_connect"
    assert category_for_exception(httpx.ReadTimeout("t")) == "timeout_total"
    assert category_for_exception(httpx.ConnectError("c")) == "connect_error"
    assert category_for_exception(httpx.RemoteProtocolError("peer closed")) == "connection_reset"
    # APITimeoutError subclasses APIConnectionError: it must still be a timeout
    assert category_for_exception(openai.APITimeoutError(request=request)) == "timeout_total"
    assert category_for_exception(openai.APIConnectionError(request=request)) == "connect_error"


def test_categories_are_error_category_members():
    assert category_for_exception(ConnectionRefusedError()) is ErrorCategory.CONNECT_ERROR
    assert category_for_exception(ValueError("bug")) is ErrorCategory.CLIENT_ERROR
