"""The HTTP connection's own bounds, held before a request reaches the app (and so before a
token is checked): header bytes and count, a deadline for a request's headers and then for its
body, and a cap on open connections. uvicorn's httptools protocol with those checks added."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024  # the request line and every header, as they arrive
MAX_HEADERS = 100
_ERROR_TYPES = {408: "timeout_error", 503: "service_unavailable_error"}


@dataclass(frozen=True)
class ConnectionLimits:
    """`max_connections`: open connections at once (a new one past it gets 503 and is closed).
    `read_timeout_s`: a request's headers must arrive within it, counted from the connection's
    start or the request's first byte, and then its body within it again (408, closed)."""

    max_connections: int = 4096
    read_timeout_s: float = 30.0


class _Refused(Exception):
    """Raised in a parser callback to stop parsing; `data_received` answers."""


class BoundedHttpProtocol(HttpToolsProtocol):
    """httptools' protocol that refuses, with the status and `Connection: close`, a head over
    MAX_HEADER_BYTES or MAX_HEADERS (431), a connection past `limits.max_connections` (503)
    and a request whose head or body is late (408). A refused connection reads nothing more.

    A head is counted in the bytes that arrive while it is incomplete; a read that also ends
    the request before it is not counted, so a head can hold up to one read (256 KiB) more."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()

    @classmethod
    def bounded_by(cls, limits: ConnectionLimits) -> type[BoundedHttpProtocol]:
        """This protocol with `limits` (uvicorn builds the protocol of each connection)."""
        return type(cls.__name__, (cls,), {"limits": limits})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._is_reading_head = True  # before a request's headers are complete
        self._num_head_bytes = 0
        self._num_headers = 0
        self._refusal: tuple[int, str] | None = None  # set by a callback that raises _Refused
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            limit = self.limits.max_connections
            self._refuse(503, f"the server holds {limit} connections, its most; try again later")
            return
        self._start_deadline()  # NOTE: a connection that never sends a byte is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():  # refused or late: the rest is not parsed
            return
        if self._is_reading_head:
            self._num_head_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # NOTE: uvicorn runs with ws="none": an upgrade is answered as a plain request
        except httptools.HttpParserError:
            self._refuse(*(self._refusal or (400, "the request is not valid HTTP/1.1")))
            return
        if self._is_reading_head and self._num_head_bytes > MAX_HEADER_BYTES:
            self._refuse(431, f"the request's headers are over {MAX_HEADER_BYTES} bytes")

    # Parser callbacks (httptools calls them from feed_data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._num_headers = 0
        if self._deadline is None:  # the request's first byte (after the connection's start)
            self._start_deadline()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._num_headers += 1
        if self._num_headers > MAX_HEADERS:
            self._refusal = (431, f"the request has more than {MAX_HEADERS} headers")
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._stop_deadline()
        super().on_headers_complete()  # starts the app (raises for a URL that does not parse)
        self._is_reading_head = False
        self._start_deadline()  # the body's (stopped at once when there is none)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._stop_deadline()
        self._is_reading_head, self._num_head_bytes = True, 0

    # Refusals

    def _start_deadline(self) -> None:
        self._stop_deadline()
        self._deadline = self.loop.call_later(self.limits.read_timeout_s, self._late)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _late(self) -> None:
        self._deadline = None
        part = "headers" if self._is_reading_head else "body"
        timeout = self.limits.read_timeout_s
        self._refuse(408, f"the request's {part} did not arrive within {timeout:g} s")

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` (unless a response is under way) and close the connection."""
        self._stop_deadline()
        if self.transport.is_closing():
            return
        logger.debug("HTTP %d to %s: %s", status, self.client, message)
        if self._can_answer():
            kind = _ERROR_TYPES.get(status, "invalid_request_error")
            error = {"message": message, "type": kind, "param": None, "code": status}
            body = json.dumps({"error": error}).encode()
            head = b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body)
            self.transport.write(STATUS_LINE[status] + head + b"connection: close\r\n\r\n" + body)
        self.transport.close()

    def _can_answer(self) -> bool:
        """Whether a response written now answers the request being read, cutting into none."""
        if self.pipeline:  # a request waits behind one whose response runs
            return False
        cycle = self.cycle
        if self._is_reading_head:
            return cycle is None or cycle.response_complete
        return not cycle.response_started  # NOTE: a 401 goes before the body: no second answer
