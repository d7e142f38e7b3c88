"""An HTTP request's deadline: `http_request_timeout_s`, shortened (never lengthened) by the
caller's `X-Request-Timeout` header."""

from __future__ import annotations

import time

import pytest
from starlette.requests import Request

from kvray.cluster.http_server import _deadline
from kvray.workers.protocol import InvalidParameterError


def request(timeout_header: str | None = None) -> Request:
    headers = [] if timeout_header is None else [(b"x-request-timeout", timeout_header.encode())]
    return Request(
        {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers}
    )


def deadline_in(timeout_header: str | None, server_timeout_s: float | None) -> tuple[float, float]:
    """The seconds from now the deadline lies within (bracketed by the clock before and after)."""
    before = time.monotonic()
    deadline = _deadline(request(timeout_header), server_timeout_s)
    after = time.monotonic()
    assert deadline is not None
    return deadline - after, deadline - before


def test_a_longer_request_timeout_header_does_not_lengthen_the_servers():
    low, high = deadline_in("3600", 10.0)
    assert low <= 10.0 <= high


def test_a_shorter_request_timeout_header_shortens_the_servers():
    low, high = deadline_in("2", 10.0)
    assert low <= 2.0 <= high


def test_without_a_server_timeout_the_header_alone_sets_the_deadline():
    low, high = deadline_in("3600", None)
    assert low <= 3600.0 <= high
    assert _deadline(request(), None) is None


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_a_request_timeout_header_that_is_no_positive_number_is_refused(value):
    with pytest.raises(InvalidParameterError, match=r"(?i)x-request-timeout"):
        _deadline(request(value), 10.0)
