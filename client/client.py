"""KvrayClient and AsyncKvrayClient: kvray.v1.Generation over gRPC, with kvray's own types.

The two have the same methods and arguments; the async one's are coroutines (`stream` is an
async iterator).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvray.client.errors import KvrayError, from_rpc_error
from kvray.client.types import (
    Accumulator,
    ClusterStatus,
    Completion,
    GenerationChunk,
    ModelInfo,
    chunk_from_proto,
    info_from_proto,
    status_from_proto,
)
from kvray.protos.kvray.v1 import generation_pb2 as pb
from kvray.protos.kvray.v1 import generation_pb2_grpc as pb_grpc
from kvray.wire import set_request_params

DEFAULT_TARGET = "localhost:50051"
# NOTE: keepalive pings notice a dead or hung server (a stopped process keeps its sockets open,
# so TCP alone never tells): a stream fails with UNAVAILABLE ~10 s after the server stops
# answering, and a call never waits more than ~10 s to connect. The server allows these pings.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.ping_timeout_ms", 5_000),  # an unanswered ping closes the connection
    ("grpc.min_reconnect_backoff_ms", 10_000),  # also the connect timeout
]
_HEALTH_CHECK = health_pb2.HealthCheckRequest(service="")  # overall: a replica can take requests


Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]


def build_request(
    prompt: Prompt,
    *,
    request_id: str = "",
    session_id: str = "",
    add_generation_prompt: bool | None = None,
    **params: Any,
) -> pb.GenerateRequest:
    """A GenerateRequest from a prompt and SamplingParams-style keyword arguments.

    A prompt is text, token ids, or a conversation: a list of {"role", "content"} messages that
    the server renders with the model's chat template (`add_generation_prompt`, default true,
    ends it with the opening of an assistant turn).

    Raises:
        TypeError: an unknown parameter (the message lists the valid ones).
    """
    req = pb.GenerateRequest(request_id=request_id, session_id=session_id)
    if isinstance(prompt, str):
        req.text = prompt
    elif prompt and isinstance(prompt[0], Mapping):
        for message in cast(Sequence[Mapping[str, str]], prompt):
            req.messages.messages.add(role=message["role"], content=message["content"])
        if add_generation_prompt is not None:
            req.messages.add_generation_prompt = add_generation_prompt
    else:
        req.token_ids.ids.extend(cast(Sequence[int], prompt))
    set_request_params(req, params)
    return req


def _retry_delay(
    err: grpc.RpcError, attempt: int, client: KvrayClient | AsyncKvrayClient, *, received: bool
) -> float:
    """Seconds to wait before retrying a failed Generate call. Raises its typed error instead
    when the call must not be retried: tokens already arrived, the status is not transient
    (only UNAVAILABLE and RESOURCE_EXHAUSTED are), or the retries are spent."""
    error = from_rpc_error(err)
    if received or not error.retryable or attempt >= client.max_retries:
        raise error from None
    return client.backoff_s * (2**attempt) * (0.5 + random.random() / 2)


def _is_serving(resp: Any) -> bool:
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


class KvrayClient:
    """Blocking client. `with KvrayClient("localhost:50051") as client: client.generate("Hi")`.

    Keyword arguments of `generate`/`stream` are the sampling parameters (`kvray.wire`:
    temperature, top_k, top_p, min_p, the penalties, seed, n, max_tokens, min_tokens, stop,
    stop_token_ids, ignore_eos, include_stop_str_in_output, logprobs) plus request_id,
    session_id and timeout (seconds). UNAVAILABLE and RESOURCE_EXHAUSTED are retried with
    backoff until the first token arrives. Every failure raises a `KvrayError` subclass.
    """

    def __init__(
        self, target: str = DEFAULT_TARGET, *, max_retries: int = 3, backoff_s: float = 0.2
    ):
        self.target = target
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.GenerationStub(self._channel)
        # NOTE: Any: typeshed's HealthStub declares no methods.
        self._health: Any = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KvrayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stream(
        self, prompt: Prompt, *, timeout: float | None = None, **params: Any
    ) -> Iterator[GenerationChunk]:
        """Yield chunks as the server produces them. Closing the iterator cancels the request."""
        request = build_request(prompt, **params)
        for attempt in itertools.count():
            call = self._stub.Generate(request, timeout=timeout)
            received = False
            try:
                for resp in call:
                    received = True
                    yield chunk_from_proto(resp)
                return
            except grpc.RpcError as err:
                delay = _retry_delay(err, attempt, self, received=received)
            finally:
                call.cancel()
            time.sleep(delay)

    def generate(
        self, prompt: Prompt, *, timeout: float | None = None, **params: Any
    ) -> Completion:
        """Run a request to completion."""
        acc = Accumulator()
        for chunk in self.stream(prompt, timeout=timeout, **params):
            acc.add(chunk)
        return acc.result()

    def tokenize(self, text: str, *, timeout: float | None = 30) -> list[int]:
        resp = self._unary(self._stub.Tokenize, pb.TokenizeRequest(text=text), timeout)
        return list(resp.token_ids)

    def model_info(self, *, timeout: float | None = 30) -> ModelInfo:
        return info_from_proto(
            self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        )

    def status(self, *, timeout: float | None = 30) -> ClusterStatus:
        return status_from_proto(
            self._unary(self._stub.GetClusterStatus, pb.GetClusterStatusRequest(), timeout)
        )

    def is_serving(self, *, timeout: float | None = 5) -> bool:
        """Whether grpc.health.v1 reports SERVING (False when unreachable)."""
        try:
            return _is_serving(self._health.Check(_HEALTH_CHECK, timeout=timeout))
        except grpc.RpcError:
            return False

    def wait_until_serving(self, timeout: float = 120) -> None:
        """Block until the server reports SERVING. Raises KvrayError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.is_serving(timeout=2):
            if time.monotonic() > deadline:
                raise KvrayError(f"{self.target} did not report SERVING within {timeout:.0f}s")
            time.sleep(0.2)

    @staticmethod
    def _unary(method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None


class AsyncKvrayClient:
    """The asyncio twin of `KvrayClient`: the same methods, arguments and errors."""

    def __init__(
        self, target: str = DEFAULT_TARGET, *, max_retries: int = 3, backoff_s: float = 0.2
    ):
        self.target = target
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._health: Any = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncKvrayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def stream(
        self, prompt: Prompt, *, timeout: float | None = None, **params: Any
    ) -> AsyncIterator[GenerationChunk]:
        """Yield chunks as the server produces them. Leaving early cancels the request."""
        request = build_request(prompt, **params)
        for attempt in itertools.count():
            call = self._stub.Generate(request, timeout=timeout)
            received = False
            try:
                async for resp in call:
                    received = True
                    yield chunk_from_proto(resp)
                return
            except grpc.RpcError as err:
                delay = _retry_delay(err, attempt, self, received=received)
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    async def generate(
        self, prompt: Prompt, *, timeout: float | None = None, **params: Any
    ) -> Completion:
        """Run a request to completion."""
        acc = Accumulator()
        async for chunk in self.stream(prompt, timeout=timeout, **params):
            acc.add(chunk)
        return acc.result()

    async def tokenize(self, text: str, *, timeout: float | None = 30) -> list[int]:
        resp = await self._unary(self._stub.Tokenize, pb.TokenizeRequest(text=text), timeout)
        return list(resp.token_ids)

    async def model_info(self, *, timeout: float | None = 30) -> ModelInfo:
        return info_from_proto(
            await self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        )

    async def status(self, *, timeout: float | None = 30) -> ClusterStatus:
        return status_from_proto(
            await self._unary(self._stub.GetClusterStatus, pb.GetClusterStatusRequest(), timeout)
        )

    async def is_serving(self, *, timeout: float | None = 5) -> bool:
        """Whether grpc.health.v1 reports SERVING (False when unreachable)."""
        try:
            return _is_serving(await self._health.Check(_HEALTH_CHECK, timeout=timeout))
        except grpc.RpcError:
            return False

    async def wait_until_serving(self, timeout: float = 120) -> None:
        """Wait until the server reports SERVING. Raises KvrayError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not await self.is_serving(timeout=2):
            if time.monotonic() > deadline:
                raise KvrayError(f"{self.target} did not report SERVING within {timeout:.0f}s")
            await asyncio.sleep(0.2)

    @staticmethod
    async def _unary(method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
