"""gRPC's accept backlog: calls that reach the server while its event loop is busy wait in gRPC
until grpc.aio takes them, one per turn of the loop. With the server's options a burst of
streams waits there and completes; with gRPC's defaults, calls past 1,000 waiting were
cancelled at random (CANCELLED, no reason, nothing logged)."""

from __future__ import annotations

import asyncio
import collections
import json
import threading
from collections.abc import Iterator

import grpc
import pytest
from grpc._cython import cygrpc

from kvray.client import AsyncKvrayClient, KvrayError
from kvray.client.connection import CHANNEL_OPTIONS
from kvray.cluster.config import ClusterConfig, load
from kvray.cluster.grpc_server import SERVER_OPTIONS, accept_backlog_options
from kvray.protos.kvray.v1 import generation_pb2 as pb
from kvray.protos.kvray.v1 import generation_pb2_grpc as pb_grpc

# More than gRPC's default soft limit (1,000 waiting calls): with gRPC's defaults about 60 of
# these calls are cancelled, and the chance that none is, is about e^-60.
BURST = 1_500
GRPC_DEFAULT_HARD_LIMIT = 3_000  # grpc.server.max_pending_requests_hard_limit's default


class OneChunk(pb_grpc.GenerationServicer):
    async def Generate(self, request, context):
        yield pb.GenerateResponse(token_ids=[1], text="a")


class BlockableServer:
    """A grpc.aio server on its own event loop, in a thread; `block()` stops that loop until
    `release()`, so meanwhile no call is taken from gRPC's backlog."""

    def __init__(self, options: list[tuple[str, int]]) -> None:
        self.loop = asyncio.new_event_loop()
        self.gate = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        others = set(channelz_servers())
        self.server, self.port = self._run(self._start(options))
        (self.channelz_id,) = set(channelz_servers()) - others

    async def _start(self, options: list[tuple[str, int]]) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(options=options)
        pb_grpc.add_GenerationServicer_to_server(OneChunk(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    @property
    def calls_started(self) -> int:
        return int(channelz_servers()[self.channelz_id]["data"].get("callsStarted", 0))

    def block(self) -> None:
        self.loop.call_soon_threadsafe(self.gate.wait)

    def release(self) -> None:
        self.gate.set()

    def stop(self) -> None:
        self.release()
        self._run(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


def channelz_servers() -> dict[int, dict]:
    """gRPC's own view of this process's servers, by id: channelz counts the calls a server has
    received in gRPC's core, where the backlog is, whether or not its loop has taken them."""
    servers = json.loads(cygrpc.channelz_get_servers(0)).get("server", [])
    return {int(server["ref"]["serverId"]): server for server in servers}


@pytest.fixture
def blockable_server() -> Iterator[BlockableServer]:
    server = BlockableServer([*SERVER_OPTIONS, *accept_backlog_options(ClusterConfig())])
    yield server
    server.stop()


def test_a_burst_of_streams_waits_in_the_backlog_and_finishes(blockable_server):
    server = blockable_server

    async def burst() -> collections.Counter[str]:
        async with AsyncKvrayClient(f"127.0.0.1:{server.port}", max_retries=0) as client:
            await client.generate("warm up")

            async def one() -> str:
                try:
                    return (await client.generate("hi")).text
                except KvrayError as exc:
                    return f"{exc.code}: {exc}"

            server.block()
            calls = [asyncio.create_task(one()) for _ in range(BURST)]
            # NOTE: no sleep decides this: every call is in gRPC's backlog before the loop that
            # takes them runs again.
            while server.calls_started < 1 + BURST:
                await asyncio.sleep(0.01)
            server.release()
            return collections.Counter(await asyncio.gather(*calls))

    assert asyncio.run(burst()) == {"a": BURST}


@pytest.mark.parametrize(
    "settings",
    [{}, {"max_num_seqs": 2000, "max_queued_requests": 8000}, {"replicas": 2, "max_replicas": 4}],
)
def test_the_backlog_holds_what_the_router_can_hold_and_more(settings):
    config = load(settings, environ={})
    options = dict(accept_backlog_options(config))
    soft = options["grpc.server.max_pending_requests"]
    _, max_replicas = config.autoscaling.bounds(config.replicas)
    held = max_replicas * config.engine.scheduler.max_num_seqs + config.max_queued_requests
    # Equal limits: no call is cancelled at random below the cap, which is never below what
    # the router can run and queue, nor below gRPC's own cap.
    assert options["grpc.server.max_pending_requests_hard_limit"] == soft
    assert soft >= held + GRPC_DEFAULT_HARD_LIMIT
    # A call waits until it is taken or its deadline passes, not gRPC's 30 s.
    assert options["grpc.server_max_unrequested_time_in_server"] >= 3600


def test_the_server_permits_the_clients_keepalive_pings():
    client, server = dict(CHANNEL_OPTIONS), dict(SERVER_OPTIONS)
    assert server["grpc.keepalive_permit_without_calls"] == 1
    assert (
        client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_ping_interval_without_data_ms"]
    )
