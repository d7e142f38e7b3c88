"""KvrayClient and AsyncKvrayClient: kvray.v1.Generation over gRPC, with kvray's own types."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvray.client.errors import KvrayError, from_rpc_error
from kvray.protos.kvray.v1 import generation_pb2 as pb
from kvray.protos.kvray.v1 import generation_pb2_grpc as pb_grpc

_SAMPLING = tuple(f.name for f in pb.SamplingParams.DESCRIPTOR.fields)
_STOPPING = tuple(f.name for f in pb.StoppingCriteria.DESCRIPTOR.fields)
_FINISH = {1: "stop", 2: "length", 3: "abort"}


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass
class GenerationChunk:
    """New tokens of one sample since its previous chunk."""

    request_id: str
    index: int  # which of the n samples
    text: str  # text delta
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "abort" on a sample's last chunk
    stop_reason: str | int | None = None  # the stop string or stop token id that matched
    prompt_tokens: int | None = None  # on the last chunk
    completion_tokens: int | None = None  # on the last chunk


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    completion_tokens: int = 0


@dataclass
class Completion:
    """A finished request. `.text`, `.token_ids` and `.finish_reason` are sample 0's."""

    request_id: str
    choices: list[Choice]
    prompt_tokens: int = 0

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.choices[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason


@dataclass
class ReplicaStatus:
    replica_id: str
    state: str
    device: str
    num_waiting: int
    num_running: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int
    num_finished_requests: int


@dataclass
class ScalingDecision:
    time_unix: float
    from_replicas: int
    to_replicas: int
    reason: str


@dataclass
class ClusterStatus:
    replicas: list[ReplicaStatus]
    queue_depth: int
    num_running: int
    min_replicas: int = 0
    max_replicas: int = 0
    target_replicas: int = 0
    recent_decisions: list[ScalingDecision] = field(default_factory=list)
    num_moved_requests: int = 0  # continued elsewhere after a failure or drain timeout
    num_rebalanced_requests: int = 0  # queued ones moved to a less busy replica


@dataclass
class ModelInfo:
    model: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    has_tokenizer: bool
    dtype: str


def build_request(
    prompt: str | Sequence[int],
    *,
    request_id: str = "",
    session_id: str = "",
    logprobs: int | None = None,
    **params: Any,
) -> pb.GenerateRequest:
    """A GenerateRequest from a prompt and SamplingParams-style keyword arguments."""
    unknown = set(params) - set(_SAMPLING) - set(_STOPPING)
    if unknown:
        raise TypeError(
            f"unknown parameter(s) {', '.join(sorted(unknown))}; "
            f"valid: {', '.join((*_SAMPLING, *_STOPPING, 'logprobs', 'request_id', 'session_id'))}"
        )
    req = pb.GenerateRequest(request_id=request_id, session_id=session_id)
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    for name, value in params.items():
        if value is None:
            continue
        target = req.sampling if name in _SAMPLING else req.stopping
        if name in ("stop", "stop_token_ids"):
            getattr(target, name).extend([value] if isinstance(value, str) else value)
        else:
            setattr(target, name, value)
    if logprobs is not None:
        req.logprobs = logprobs
    return req


def chunk_from_proto(resp: pb.GenerateResponse) -> GenerationChunk:
    chunk = GenerationChunk(
        request_id=resp.request_id,
        index=resp.index,
        text=resp.text,
        token_ids=list(resp.token_ids),
        logprobs=[
            TokenLogprob(lp.token_id, lp.logprob, list(lp.top_token_ids), list(lp.top_logprobs))
            for lp in resp.logprobs
        ],
    )
    if resp.HasField("finish_reason"):
        chunk.finish_reason = _FINISH.get(resp.finish_reason, "abort")
        chunk.prompt_tokens = resp.usage.prompt_tokens
        chunk.completion_tokens = resp.usage.completion_tokens
        kind = resp.WhichOneof("stop_reason")
        chunk.stop_reason = getattr(resp, kind) if kind else None
    return chunk


class _Accumulator:
    def __init__(self) -> None:
        self.completion: Completion | None = None

    def add(self, chunk: GenerationChunk) -> None:
        if self.completion is None:
            self.completion = Completion(chunk.request_id, [])
        choices = self.completion.choices
        while len(choices) <= chunk.index:
            choices.append(Choice(index=len(choices)))
        choice = choices[chunk.index]
        choice.text += chunk.text
        choice.token_ids.extend(chunk.token_ids)
        choice.logprobs.extend(chunk.logprobs)
        if chunk.finish_reason is not None:
            choice.finish_reason, choice.stop_reason = chunk.finish_reason, chunk.stop_reason
            choice.completion_tokens = chunk.completion_tokens or 0
            self.completion.prompt_tokens = chunk.prompt_tokens or 0


def _status_from_proto(resp: pb.ClusterStatus) -> ClusterStatus:
    return ClusterStatus(
        replicas=[
            ReplicaStatus(
                r.replica_id,
                r.state,
                r.device,
                r.num_waiting,
                r.num_running,
                r.kv_blocks_used,
                r.kv_blocks_total,
                r.num_preemptions,
                r.num_finished_requests,
            )
            for r in resp.replicas
        ],
        queue_depth=resp.queue_depth,
        num_running=resp.num_running,
        min_replicas=resp.min_replicas,
        max_replicas=resp.max_replicas,
        target_replicas=resp.target_replicas,
        recent_decisions=[
            ScalingDecision(d.time_unix, d.from_replicas, d.to_replicas, d.reason)
            for d in resp.recent_decisions
        ],
        num_moved_requests=resp.num_moved_requests,
        num_rebalanced_requests=resp.num_rebalanced_requests,
    )


def _info_from_proto(resp: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        resp.model,
        resp.max_model_len,
        resp.vocab_size,
        list(resp.eos_token_ids),
        resp.has_tokenizer,
        resp.dtype,
    )


def _backoff(attempt: int, base_s: float) -> float:
    return base_s * (2**attempt) * (0.5 + random.random() / 2)


class KvrayClient:
    """Blocking client. `with KvrayClient("localhost:50051") as client: client.generate("Hi")`.

    Keyword arguments of `generate`/`stream` mirror `SamplingParams` (temperature, top_k, top_p,
    min_p, the penalties, seed, n, max_tokens, min_tokens, stop, stop_token_ids, ignore_eos,
    include_stop_str_in_output, logprobs) plus request_id, session_id and timeout (seconds).
    UNAVAILABLE and RESOURCE_EXHAUSTED are retried with backoff until the first token arrives.
    Every failure raises a `KvrayError` subclass.
    """

    def __init__(
        self, target: str = "localhost:50051", *, max_retries: int = 3, backoff_s: float = 0.2
    ):
        self.target = target
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._channel = grpc.insecure_channel(target)
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
        self, prompt: str | Sequence[int], *, timeout: float | None = None, **params: Any
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
                error = from_rpc_error(err)
                if received or not error.retryable or attempt >= self.max_retries:
                    raise error from None
            finally:
                call.cancel()
            time.sleep(_backoff(attempt, self.backoff_s))

    def generate(
        self, prompt: str | Sequence[int], *, timeout: float | None = None, **params: Any
    ) -> Completion:
        """Run a request to completion."""
        acc = _Accumulator()
        for chunk in self.stream(prompt, timeout=timeout, **params):
            acc.add(chunk)
        assert acc.completion is not None
        return acc.completion

    def tokenize(self, text: str, *, timeout: float | None = 30) -> list[int]:
        return list(
            self._unary(self._stub.Tokenize, pb.TokenizeRequest(text=text), timeout).token_ids
        )

    def model_info(self, *, timeout: float | None = 30) -> ModelInfo:
        return _info_from_proto(
            self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        )

    def status(self, *, timeout: float | None = 30) -> ClusterStatus:
        return _status_from_proto(
            self._unary(self._stub.GetClusterStatus, pb.GetClusterStatusRequest(), timeout)
        )

    def is_serving(self, *, timeout: float | None = 5) -> bool:
        """Whether grpc.health.v1 reports SERVING (False when unreachable)."""
        try:
            resp = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def wait_until_serving(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_serving(timeout=2):
            if time.monotonic() > deadline:
                raise KvrayError(f"{self.target} did not report SERVING within {timeout:.0f}s")
            time.sleep(0.2)

    @staticmethod
    def _unary(method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None


class AsyncKvrayClient:
    """The asyncio twin of `KvrayClient` (same arguments, same errors)."""

    def __init__(
        self, target: str = "localhost:50051", *, max_retries: int = 3, backoff_s: float = 0.2
    ):
        self.target = target
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.GenerationStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncKvrayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def stream(
        self, prompt: str | Sequence[int], *, timeout: float | None = None, **params: Any
    ) -> AsyncIterator[GenerationChunk]:
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
                error = from_rpc_error(err)
                if received or not error.retryable or attempt >= self.max_retries:
                    raise error from None
            finally:
                call.cancel()
            await asyncio.sleep(_backoff(attempt, self.backoff_s))

    async def generate(
        self, prompt: str | Sequence[int], *, timeout: float | None = None, **params: Any
    ) -> Completion:
        acc = _Accumulator()
        async for chunk in self.stream(prompt, timeout=timeout, **params):
            acc.add(chunk)
        assert acc.completion is not None
        return acc.completion

    async def status(self, *, timeout: float | None = 30) -> ClusterStatus:
        try:
            resp = await self._stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return _status_from_proto(resp)
