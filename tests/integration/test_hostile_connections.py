"""Hostile clients at the front door, HTTP and gRPC, with tokens on: headers too large or too
many, bodies sent where none is read, requests that never finish arriving, more connections
than the server holds. Deadlines are short settings and every wait for the server is generous
(GENEROUS_S), so no result depends on this machine's speed."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvray.cluster.asgi_server import HttpServer
from kvray.cluster.config import load
from kvray.cluster.grpc_server import start_server
from kvray.cluster.http_protocol import ConnectionLimits
from kvray.cluster.http_server import build_app
from kvray.cluster.security import TokenAuth
from tests.integration.conftest import wait_for

TOKEN = "hostile-connections-token-0123"
READ_TIMEOUT_S = 2.0  # short, yet long enough for a well-behaved client on a busy machine
GENEROUS_S = 10.0


@contextmanager
def event_loop() -> Iterator[Any]:
    """An event loop in a thread of its own; yields `run(coroutine)` for this thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield lambda coroutine: asyncio.run_coroutine_threadsafe(coroutine, loop).result(30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)


@contextmanager
def http_server(folder, **limits: Any) -> Iterator[int]:
    """The HTTP app with tokens on, before a router that is always serving; yields its port."""
    (folder / "tokens").write_text(f"{TOKEN}\n")
    router = SimpleNamespace(
        is_serving=True,
        info=None,
        config=SimpleNamespace(model_name="fake"),
        metrics=SimpleNamespace(render=lambda: b"#\n"),
    )
    app = build_app(router, auth=TokenAuth(folder / "tokens"))  # type: ignore[arg-type]
    server = HttpServer(app, host="127.0.0.1", port=0, limits=ConnectionLimits(**limits))
    with event_loop() as run:
        port = run(server.start())
        try:
            yield port
        finally:
            run(server.stop())


@pytest.fixture(scope="module")
def port(tmp_path_factory):
    folder = tmp_path_factory.mktemp("http")
    with http_server(folder, max_connections=64, read_timeout_s=READ_TIMEOUT_S) as port:
        yield port


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=GENEROUS_S)


def reply_until_closed(sock: socket.socket) -> bytes:
    """What the server sends before it closes the connection; fails if it keeps it open."""
    reply = b""
    try:
        while chunk := sock.recv(65536):
            reply += chunk
    except ConnectionResetError:  # closed with bytes of ours unread: the answer may be lost
        pass
    except TimeoutError:
        pytest.fail(f"the connection is still open after {GENEROUS_S} s; got {reply[:100]!r}")
    return reply


def health(port: int) -> int:
    """A well-behaved client's GET /health: the status."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=GENEROUS_S) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.parametrize("path", ["/health", "/v1/models"])  # open, and behind the token
def test_a_head_over_64_kib_is_refused_with_or_without_a_token(port, path):
    with connect(port) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: kvray\r\nX-Pad: ".encode() + b"a" * 80_000)
        reply = reply_until_closed(sock)
    assert not reply or reply.startswith(b"HTTP/1.1 431 ")  # nothing: reset, 431 unread


def test_a_40_mib_head_cannot_be_sent_whole(port):
    """The server stops reading at the bound: the client's sends fail long before 40 MiB."""
    sent, piece = 0, b"a" * 65536
    with connect(port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: kvray\r\nX-Pad: ")
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            while sent < 40 * 2**20:
                sock.sendall(piece)
                sent += len(piece)
    assert sent < 20 * 2**20  # the bound, and what the sockets' buffers took


@pytest.mark.parametrize("path", ["/health", "/v1/models"])
def test_more_than_100_headers_are_refused(port, path):
    headers = b"".join(b"X-Header-%d: 1\r\n" % i for i in range(101))
    with connect(port) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: kvray\r\n".encode() + headers + b"\r\n")
        assert reply_until_closed(sock).startswith(b"HTTP/1.1 431 ")


def test_100_headers_pass(port):
    headers = b"".join(b"X-Header-%d: 1\r\n" % i for i in range(98))
    with connect(port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: kvray\r\nConnection: close\r\n" + headers)
        sock.sendall(b"\r\n")
        assert reply_until_closed(sock).startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(
    ("request_line", "framing", "status"),
    [
        ("GET /health", "Content-Length: 4194304", 200),
        ("GET /health", "Transfer-Encoding: chunked", 200),
        ("GET /metrics", "Content-Length: 4194304", 200),
        ("POST /health", "Content-Length: 4194304", 405),
        ("POST /unknown", "Content-Length: 4194304", 404),
        ("POST /v1/unknown", "Content-Length: 4194304", 404),
        ("GET /v1/models", "Content-Length: 4194304", 200),
    ],
)
def test_a_body_where_none_is_read_is_answered_unread_and_closed(
    port, request_line, framing, status
):
    head = f"{request_line} HTTP/1.1\r\nHost: kvray\r\nAuthorization: Bearer {TOKEN}\r\n{framing}\r\n\r\n"
    with connect(port) as sock:
        sock.sendall(
            head.encode() + b"1000\r\n" + b"x" * 1000
        )  # then nothing: the rest never comes
        reply = reply_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 %d " % status), reply[:200]
    assert b"connection: close" in reply.lower()


def test_a_caller_without_a_token_is_refused_before_its_body_arrives(port):
    head = "POST /v1/completions HTTP/1.1\r\nHost: kvray\r\nContent-Length: 4194304\r\n\r\n"
    with connect(port) as sock:
        sock.sendall(head.encode())  # no body at all
        assert sock.recv(65536).startswith(b"HTTP/1.1 401 ")


@pytest.mark.parametrize(
    "sent",
    [b"", b"G", b"GET /health HTTP/1.1\r\nHost: kvray\r\n"],
    ids=["nothing", "one-byte", "no-end-of-head"],
)
def test_a_head_that_stalls_is_closed_at_the_deadline(port, sent):
    slow = [connect(port) for _ in range(3)]
    start = time.monotonic()
    for sock in slow:
        sock.sendall(sent)
    assert health(port) == 200  # a well-behaved client meanwhile
    for sock in slow:
        with sock:
            assert reply_until_closed(sock).startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - start >= READ_TIMEOUT_S  # not before the deadline


def test_a_kept_alive_connection_gives_each_request_its_own_deadline(port):
    with connect(port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: kvray\r\n\r\n")
        first = b""
        while not first.endswith(b'{"status":"ok"}'):  # the whole first response
            chunk = sock.recv(65536)
            assert chunk, f"closed after {first!r}"
            first += chunk
        assert first.startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /hea")  # the next request stalls
        assert reply_until_closed(sock).startswith(b"HTTP/1.1 408 ")


def test_a_body_that_stalls_is_closed_at_the_deadline(port):
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: kvray\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    start = time.monotonic()
    with connect(port) as sock:
        sock.sendall(head.encode() + b'{"model": ')  # 10 of 1,000 bytes, then nothing
        assert health(port) == 200
        assert reply_until_closed(sock).startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - start >= READ_TIMEOUT_S


def test_connections_past_max_connections_get_503_and_are_closed(tmp_path):
    with http_server(tmp_path, max_connections=2, read_timeout_s=60) as port:
        held = [connect(port), connect(port)]
        with connect(port) as third:
            assert reply_until_closed(third).startswith(b"HTTP/1.1 503 ")
        held.pop().close()
        wait_for(lambda: health(port) == 200, timeout=GENEROUS_S)  # a place is free again
        held[0].close()


@contextmanager
def grpc_target(**settings: Any) -> Iterator[str]:
    """kvray's gRPC server before a router that is always serving; yields its address."""
    config = load({"host": "127.0.0.1", "port": 0, **settings}, environ={})
    router = SimpleNamespace(config=config, is_serving=True, on_serving_change=None)
    with event_loop() as run:
        servers, port = run(start_server(router, host="127.0.0.1", port=0))  # type: ignore[arg-type]
        try:
            yield f"127.0.0.1:{port}"
        finally:
            run(servers[0].stop(None))


def check(channel: grpc.Channel, **metadata: str) -> None:
    health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
        health_pb2.HealthCheckRequest(), metadata=list(metadata.items()), timeout=GENEROUS_S
    )


def test_grpc_metadata_up_to_16_kib_passes_and_more_is_refused():
    with grpc_target() as target, grpc.insecure_channel(target) as channel:
        for _ in range(20):  # gRPC's default would refuse about half of these, at random
            check(channel, x_pad="a" * 12_000)
        with pytest.raises(grpc.RpcError) as err:
            check(channel, x_pad="a" * 20_000)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_grpc_connections_past_max_connections_cannot_connect():
    own = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own each
    with grpc_target(max_connections=2) as target:
        channels = [grpc.insecure_channel(target, options=own) for _ in range(3)]
        try:
            check(channels[0])
            check(channels[1])
            with pytest.raises(grpc.RpcError) as err:
                check(channels[2])
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        finally:
            for channel in channels:
                channel.close()
