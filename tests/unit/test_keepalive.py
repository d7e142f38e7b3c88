"""Keepalive: a client notices a server that stops answering (a hung process, a partition: its
sockets stay open, so TCP alone never tells) in the time the README states, and the server
permits the clients' pings."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from kvray.client import KvrayClient, UnavailableError
from kvray.client.connection import CHANNEL_OPTIONS
from kvray.cluster.chunks import CompletionChunk
from kvray.cluster.config import load
from kvray.cluster.grpc_server import SERVER_OPTIONS, start_server

README = Path(__file__).resolve().parents[2] / "README.md"


def option(options: list[tuple[str, Any]], name: str) -> Any:
    return dict(options)[name]


def documented_seconds() -> float:
    """What the README says a stream waits on a server that stopped answering."""
    text = " ".join(README.read_text().split())
    found = re.search(r"a stream fails with `UNAVAILABLE` after ([\d.]+) s of silence", text)
    assert found, "the README no longer states how soon a hung server is noticed"
    return float(found.group(1))


def test_the_readme_states_how_long_keepalive_takes_to_notice_a_hung_server():
    # NOTE: the client's keepalive timer restarts with every byte it reads, so a stream that
    # goes silent sends a ping keepalive_time after the last byte and gives up when it is
    # unanswered: after keepalive_timeout, or after ping_timeout (which gRPC 1.85 applies to
    # keepalive pings too, and to the flow-control pings a stream receiving tokens sends), so
    # the two must agree.
    wait_ms = option(CHANNEL_OPTIONS, "grpc.keepalive_timeout_ms")
    assert option(CHANNEL_OPTIONS, "grpc.http2.ping_timeout_ms") == wait_ms
    silence_ms = option(CHANNEL_OPTIONS, "grpc.keepalive_time_ms") + wait_ms
    assert documented_seconds() * 1000 == silence_ms


def test_the_server_permits_the_clients_pings():
    # Pings closer together than this count as strikes; the client's come keepalive_time apart
    # at the closest (network jitter aside, hence the margin).
    closest_ms = option(SERVER_OPTIONS, "grpc.http2.min_ping_interval_without_data_ms")
    assert closest_ms <= 0.8 * option(CHANNEL_OPTIONS, "grpc.keepalive_time_ms")
    assert option(SERVER_OPTIONS, "grpc.keepalive_permit_without_calls") == 1  # idle channels too
    assert option(CHANNEL_OPTIONS, "grpc.keepalive_permit_without_calls") == 1


class QuietRouter:
    """What the gRPC server reads of a router: a stream that sends one token, then waits (as a
    request queued behind others would). No flow-control ping is out when it goes quiet, so
    only keepalive can tell that the server stopped."""

    is_serving = True
    on_serving_change = None
    config = load({}, environ={})

    async def generate(self, *args: Any, **kwargs: Any) -> AsyncIterator[CompletionChunk]:
        yield CompletionChunk("r", 0, [1], "a")
        await asyncio.Event().wait()


@contextlib.contextmanager
def serving() -> Iterator[int]:
    """A gRPC server over a QuietRouter, in a thread of its own; yields its port."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    start = start_server(QuietRouter(), host="127.0.0.1", port=0)  # type: ignore[arg-type]
    servers, port = asyncio.run_coroutine_threadsafe(start, loop).result(30)
    try:
        yield port
    finally:

        async def stop() -> None:
            await asyncio.gather(*(s.stop(None) for s in servers))

        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


class FreezingProxy:
    """A TCP proxy on loopback that, once frozen, passes no byte more either way and keeps both
    connections open: a hung server, as its client sees it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frozen = threading.Event()
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1", self.target_port))
                self.sockets += [client, server]
                for source, sink in ((client, server), (server, client)):
                    threading.Thread(target=self._pass, args=(source, sink), daemon=True).start()

    def _pass(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if self.frozen.is_set():
                    return  # stop reading; the sockets stay open
                sink.sendall(data)

    def close(self) -> None:
        for s in self.sockets:
            s.close()


def test_a_quiet_stream_from_a_server_that_stops_answering_fails_unavailable():
    outcome: list[BaseException] = []
    with serving() as port:
        proxy = FreezingProxy(port)
        try:
            with KvrayClient(f"127.0.0.1:{proxy.port}", max_retries=0) as client:
                stream = client.stream("Hello", max_tokens=4)
                next(stream)

                def read_to_the_end() -> None:
                    try:
                        for _ in stream:
                            pass
                    except BaseException as exc:
                        outcome.append(exc)

                proxy.frozen.set()
                reader = threading.Thread(target=read_to_the_end, daemon=True)
                started = time.monotonic()
                reader.start()
                # NOTE: a bound many times the documented time, so that no machine is too slow;
                # the stream without keepalive would wait forever.
                reader.join(timeout=12 * documented_seconds())
                waited = time.monotonic() - started
                assert not reader.is_alive(), f"the stream still waits after {waited:.0f} s"
                assert isinstance(outcome[0], UnavailableError), outcome
        finally:
            proxy.close()
