"""Server reflection: open without tokens, and with tokens on, for callers with one (as every
call but health)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvray.cluster.config import load
from kvray.cluster.grpc_server import SERVICE_NAME, start_server
from kvray.cluster.security import TokenAuth

TOKEN = "reflection-token-0123456789"


async def list_services(auth: TokenAuth | None, metadata: tuple = ()) -> list[str]:
    """The services a reflection call lists, on a server started with `auth`; a failed call
    raises its grpc.aio.AioRpcError."""
    # what the server reads
    router = SimpleNamespace(is_serving=False, on_serving_change=None, config=load({}, environ={}))
    servers, port = await start_server(router, host="127.0.0.1", port=0, auth=auth)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                metadata=metadata,
                timeout=30,
            )
            return [
                service.name
                async for response in call
                for service in response.list_services_response.service
            ]
    finally:
        await asyncio.gather(*(s.stop(None) for s in servers))


def test_without_tokens_reflection_answers_anyone():
    assert SERVICE_NAME in asyncio.run(list_services(None))


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer not-the-token"),)])
def test_with_tokens_on_reflection_without_a_valid_token_is_unauthenticated(tmp_path, metadata):
    (tmp_path / "tokens").write_text(f"{TOKEN}\n")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(list_services(TokenAuth(tmp_path / "tokens"), metadata))
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_with_tokens_on_reflection_answers_a_caller_with_a_token(tmp_path):
    (tmp_path / "tokens").write_text(f"{TOKEN}\n")
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    assert SERVICE_NAME in asyncio.run(list_services(TokenAuth(tmp_path / "tokens"), metadata))
