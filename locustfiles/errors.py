"""Which :class:`~envelope.records.ErrorCategory` an exception raised by a client means.

The transports (:mod:`locustfiles.transports`) catch what geventhttpclient, the
openai SDK and the standard library raise, and record it as a category with
:func:`category_for_exception`; a transport that knows more (which deadline
expired, whether a response byte had arrived) refines it.
"""

from __future__ import annotations

import http.client
import socket

from envelope.records import ErrorCategory

__all__ = ["category_for_exception"]

# Exception class names from clients we do not import (gevent, geventhttpclient,
# httpx, openai, requests), matched anywhere in the exception's class hierarchy.
# Order matters: openai's APITimeoutError subclasses APIConnectionError.
_NAME_CATEGORIES: tuple[tuple[str, ErrorCategory], ...] = (
    ("ConnectTimeout", ErrorCategory.TIMEOUT_CONNECT),
    ("Timeout", ErrorCategory.TIMEOUT_TOTAL),  # gevent.timeout.Timeout
    ("ReadTimeout", ErrorCategory.TIMEOUT_TOTAL),
    ("TimeoutException", ErrorCategory.TIMEOUT_TOTAL),
    ("APITimeoutError", ErrorCategory.TIMEOUT_TOTAL),
    ("ConnectError", ErrorCategory.CONNECT_ERROR),
    ("IncompleteRead", ErrorCategory.CONNECTION_RESET),
    ("HTTPConnectionClosed", ErrorCategory.CONNECTION_RESET),
    ("RemoteProtocolError", ErrorCategory.CONNECTION_RESET),
    ("ChunkedEncodingError", ErrorCategory.CONNECTION_RESET),
    ("ReadError", ErrorCategory.CONNECTION_RESET),
)
# Wrappers whose cause, when known, is the better answer.
_WRAPPER_CATEGORIES: tuple[tuple[str, ErrorCategory], ...] = (("APIConnectionError", ErrorCategory.CONNECT_ERROR),)


def category_for_exception(exc: BaseException) -> ErrorCategory:
    """The category for an exception a client raised.

    Timeouts map to ``timeout_total`` (``timeout_connect`` for an explicit connect
    timeout); a caller that knows which deadline expired overrides it. Wrapped
    exceptions (``raise ... from``, geventhttpclient's ``original``) are looked
    through. Anything unrecognised is ``client_error``.
    """
    chain = _exception_chain(exc)
    for current in chain:
        category = _category_of(current)
        if category is not None:
            return category
    for current in chain:
        names = {cls.__name__ for cls in type(current).__mro__}
        for name, category in _WRAPPER_CATEGORIES:
            if name in names:
                return category
    return ErrorCategory.CLIENT_ERROR


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 8 and current not in chain:
        chain.append(current)
        original = getattr(current, "original", None)
        if isinstance(original, BaseException):
            current = original
        else:
            current = current.__cause__
    return chain


def _category_of(exc: BaseException) -> ErrorCategory | None:
    if isinstance(exc, (ConnectionRefusedError, socket.gaierror)):
        return ErrorCategory.CONNECT_ERROR
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, http.client.IncompleteRead)):
        return ErrorCategory.CONNECTION_RESET
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError
        return ErrorCategory.TIMEOUT_TOTAL
    names = {cls.__name__ for cls in type(exc).__mro__}
    for name, category in _NAME_CATEGORIES:
        if name in names:
            return category
    return None
