"""KvrayClient and AsyncKvrayClient: kvray.v1.Generation over gRPC, with kvray's own types.

The two have the same methods and arguments; the async one's are coroutines (`stream` is an
async iterator). Both take one router address or several, a bearer token and TLS options
(`connection.ClientBase`).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvray.client.connection import (
    CHANNEL_OPTIONS,
    DEFAULT_TARGET,
    ClientBase,
    Progress,
    Prompt,
    build_request,
)
from kvray.client.errors import UnavailableError, from_rpc_error
from kvray.client.types import (
    ClusterStatus,
    ModelInfo,
    chunk_from_proto,
    completion_of,
    info_from_proto,
    status_from_proto,
)
from kvray.outputs import Accumulator, Completion, GenerationChunk
from kvray.protos.kvray.v1 import generation_pb2 as pb
from kvray.protos.kvray.v1 import generation_pb2_grpc as pb_grpc

__all__ = ["DEFAULT_TARGET", "AsyncKvrayClient", "KvrayClient", "build_request"]

_HEALTH_CHECK = health_pb2.HealthCheckRequest(service="")  # overall: a replica can take requests


def _is_serving(resp: Any) -> bool:
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


class KvrayClient(ClientBase):
    """Blocking client. `with KvrayClient("localhost:50051") as client: client.generate("Hi")`.

    Keyword arguments of `generate`/`stream` are the sampling parameters (`kvray.wire`:
    temperature, top_k, top_p, min_p, the penalties, seed, n, max_tokens, min_tokens, stop,
    stop_token_ids, ignore_eos, include_stop_str_in_output, skip_special_tokens, logprobs,
    logit_bias as {token_id: bias}, allowed_token_ids, bad_words, ...), a structured output
    (one of `structured_output=` a `kvray.GrammarSpec` or vLLM's {"json": schema} form,
    `response_format=` OpenAI's dict, or `json_schema=` a schema or pydantic model, `regex=`,
    `choice=[...]`, `grammar=`, `json_object=True`), plus request_id, session_id, add_generation_prompt, timeout (seconds) and resume.
    UNAVAILABLE and RESOURCE_EXHAUSTED are retried with backoff until the first token arrives
    (on the next router, given several); with `resume=True` a stream whose router goes away
    continues on the next one with no gap and no repeat. Every failure raises a `KvrayError`.
    """

    def __init__(self, target: str | list[str] = DEFAULT_TARGET, **options: Any) -> None:
        super().__init__(target, **options)
        self._channels: dict[str, Any] = {}

    def _channel(self) -> Any:
        target = self.target
        if target not in self._channels:
            channel = (
                grpc.secure_channel(target, self.credentials, options=CHANNEL_OPTIONS)
                if self.credentials
                else grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
            )
            # NOTE: Any: typeshed's HealthStub declares no methods.
            health: Any = health_pb2_grpc.HealthStub(channel)
            self._channels[target] = (channel, pb_grpc.GenerationStub(channel), health)
        return self._channels[target]

    def close(self) -> None:
        for channel, _, _ in self._channels.values():
            channel.close()
        self._channels.clear()

    def __enter__(self) -> KvrayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stream(
        self, prompt: Prompt, *, timeout: float | None = None, resume: bool = False, **params: Any
    ) -> Iterator[GenerationChunk]:
        """Yield chunks as the server produces them. Closing the iterator cancels the request."""
        request, progress = build_request(prompt, **params), Progress.of(params)
        for attempt in itertools.count():
            _, stub, _ = self._channel()
            call = stub.Generate(progress.resumed(request), timeout=timeout, metadata=self.metadata)
            try:
                for resp in call:
                    chunk = chunk_from_proto(resp)
                    if progress.add(chunk):
                        yield chunk
                return
            except grpc.RpcError as err:
                if resume and progress.done:
                    return  # every sample had its last chunk: nothing is missing
                delay = self.retry_delay(err, attempt, progress, resume=resume)
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
        return completion_of(acc)

    def tokenize(self, text: str, *, timeout: float | None = 30) -> list[int]:
        resp = self._unary("Tokenize", pb.TokenizeRequest(text=text), timeout)
        return list(resp.token_ids)

    def model_info(self, *, timeout: float | None = 30) -> ModelInfo:
        return info_from_proto(self._unary("GetModelInfo", pb.GetModelInfoRequest(), timeout))

    def status(self, *, timeout: float | None = 30) -> ClusterStatus:
        return status_from_proto(
            self._unary("GetClusterStatus", pb.GetClusterStatusRequest(), timeout)
        )

    def is_serving(self, *, timeout: float | None = 5) -> bool:
        """Whether the current router's grpc.health.v1 reports SERVING (False if unreachable)."""
        try:
            return _is_serving(self._channel()[2].Check(_HEALTH_CHECK, timeout=timeout))
        except grpc.RpcError:
            return False

    def wait_until_serving(self, timeout: float = 120) -> None:
        """Block until a router reports SERVING (trying each in turn); it becomes the current
        one. Raises KvrayError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.is_serving(timeout=2):
            if time.monotonic() > deadline:
                raise self.not_serving(timeout)
            self.next_target()
            time.sleep(0.2 / len(self.targets))

    def _unary(self, method: str, request: Any, timeout: float | None) -> Any:
        for attempt in range(len(self.targets)):
            try:
                return getattr(self._channel()[1], method)(
                    request, timeout=timeout, metadata=self.metadata
                )
            except grpc.RpcError as err:
                error = from_rpc_error(err)
                if not isinstance(error, UnavailableError) or attempt == len(self.targets) - 1:
                    raise error from None
                self.next_target()
        raise AssertionError("unreachable")


class AsyncKvrayClient(ClientBase):
    """The asyncio twin of `KvrayClient`: the same methods, arguments and errors."""

    def __init__(self, target: str | list[str] = DEFAULT_TARGET, **options: Any) -> None:
        super().__init__(target, **options)
        self._channels: dict[str, Any] = {}

    def _channel(self) -> Any:
        target = self.target
        if target not in self._channels:
            channel = (
                grpc.aio.secure_channel(target, self.credentials, options=CHANNEL_OPTIONS)
                if self.credentials
                else grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
            )
            health: Any = health_pb2_grpc.HealthStub(channel)
            self._channels[target] = (channel, pb_grpc.GenerationStub(channel), health)
        return self._channels[target]

    async def close(self) -> None:
        for channel, _, _ in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def __aenter__(self) -> AsyncKvrayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def stream(
        self, prompt: Prompt, *, timeout: float | None = None, resume: bool = False, **params: Any
    ) -> AsyncIterator[GenerationChunk]:
        """Yield chunks as the server produces them. Leaving early cancels the request."""
        request, progress = build_request(prompt, **params), Progress.of(params)
        for attempt in itertools.count():
            _, stub, _ = self._channel()
            call = stub.Generate(progress.resumed(request), timeout=timeout, metadata=self.metadata)
            try:
                async for resp in call:
                    chunk = chunk_from_proto(resp)
                    if progress.add(chunk):
                        yield chunk
                return
            except grpc.RpcError as err:
                if resume and progress.done:
                    return  # every sample had its last chunk: nothing is missing
                delay = self.retry_delay(err, attempt, progress, resume=resume)
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
        return completion_of(acc)

    async def tokenize(self, text: str, *, timeout: float | None = 30) -> list[int]:
        resp = await self._unary("Tokenize", pb.TokenizeRequest(text=text), timeout)
        return list(resp.token_ids)

    async def model_info(self, *, timeout: float | None = 30) -> ModelInfo:
        return info_from_proto(await self._unary("GetModelInfo", pb.GetModelInfoRequest(), timeout))

    async def status(self, *, timeout: float | None = 30) -> ClusterStatus:
        return status_from_proto(
            await self._unary("GetClusterStatus", pb.GetClusterStatusRequest(), timeout)
        )

    async def is_serving(self, *, timeout: float | None = 5) -> bool:
        """Whether the current router's grpc.health.v1 reports SERVING (False if unreachable)."""
        try:
            return _is_serving(await self._channel()[2].Check(_HEALTH_CHECK, timeout=timeout))
        except grpc.RpcError:
            return False

    async def wait_until_serving(self, timeout: float = 120) -> None:
        """Wait until a router reports SERVING (trying each in turn); it becomes the current
        one. Raises KvrayError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not await self.is_serving(timeout=2):
            if time.monotonic() > deadline:
                raise self.not_serving(timeout)
            self.next_target()
            await asyncio.sleep(0.2 / len(self.targets))

    async def _unary(self, method: str, request: Any, timeout: float | None) -> Any:
        for attempt in range(len(self.targets)):
            try:
                return await getattr(self._channel()[1], method)(
                    request, timeout=timeout, metadata=self.metadata
                )
            except grpc.RpcError as err:
                error = from_rpc_error(err)
                if not isinstance(error, UnavailableError) or attempt == len(self.targets) - 1:
                    raise error from None
                self.next_target()
        raise AssertionError("unreachable")
