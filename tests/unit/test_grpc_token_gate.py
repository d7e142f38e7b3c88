"""With tokens on, a gRPC call without a valid token is refused on its metadata alone: before
its request message arrives (gRPC would otherwise read up to 4 MiB of it first)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvray.cluster.config import load
from kvray.cluster.grpc_server import SERVICE_NAME, start_server
from kvray.cluster.security import TokenAuth

TOKEN = "gate-token-0123456789abcdef"


async def call_without_sending(port: int, metadata: tuple, timeout: float = 20) -> grpc.StatusCode:
    """A Generate call that sends its metadata and never its request: the status it ends with
    (DEADLINE_EXCEEDED when the server waits for the request)."""
    never = asyncio.Event()

    async def no_request():
        await never.wait()
        yield b""  # pragma: no cover

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(f"/{SERVICE_NAME}/Generate")(
            no_request(), metadata=metadata, timeout=timeout
        )
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def on_server(auth: TokenAuth, probe):
    router = SimpleNamespace(is_serving=False, on_serving_change=None, config=load({}, environ={}))
    servers, port = await start_server(router, host="127.0.0.1", port=0, auth=auth)
    try:
        return await probe(port)
    finally:
        await asyncio.gather(*(s.stop(None) for s in servers))


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer not-the-token"),)])
def test_a_call_without_a_valid_token_is_refused_before_its_request_arrives(tmp_path, metadata):
    (tmp_path / "tokens").write_text(f"{TOKEN}\n")
    auth = TokenAuth(tmp_path / "tokens")
    code = asyncio.run(on_server(auth, lambda port: call_without_sending(port, metadata)))
    assert code is grpc.StatusCode.UNAUTHENTICATED


def test_a_call_with_the_token_reaches_the_servicer_and_waits_for_its_request(tmp_path):
    (tmp_path / "tokens").write_text(f"{TOKEN}\n")
    auth = TokenAuth(tmp_path / "tokens")
    metadata = (("authorization", f"Bearer {TOKEN}"),)

    # a short deadline: the servicer waits for the request the call never sends
    code = asyncio.run(on_server(auth, lambda port: call_without_sending(port, metadata, 1)))
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED


def test_health_answers_without_a_token(tmp_path):
    (tmp_path / "tokens").write_text(f"{TOKEN}\n")
    auth = TokenAuth(tmp_path / "tokens")

    async def probe(port: int) -> int:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=20)
            return reply.status

    assert asyncio.run(on_server(auth, probe)) == health_pb2.HealthCheckResponse.NOT_SERVING
