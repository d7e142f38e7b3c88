"""The gRPC server: kvray.v1.Generation, grpc.health.v1 and server reflection.

Translates protobuf to kvray types at the edge (parameters through `kvray.wire`); every error
leaves through `errors.status_for`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from kvray.cluster.background import BackgroundTasks
from kvray.cluster.chat_prompt import check_num_messages
from kvray.cluster.chunks import CompletionChunk
from kvray.cluster.config import ClusterConfig
from kvray.cluster.errors import UnauthenticatedError, status_for
from kvray.cluster.input_processor import MAX_REQUEST_BYTES, ChatPrompt, Prompt, Resumed
from kvray.cluster.router import Router
from kvray.cluster.security import TlsFiles, Token, TokenAuth, grpc_credentials
from kvray.cluster.sequence import FinishReason
from kvray.cluster.stats import ClusterStats
from kvray.protos.kvray.v1 import generation_pb2 as pb
from kvray.protos.kvray.v1 import generation_pb2_grpc as pb_grpc
from kvray.wire import params_from_request
from kvray.workers.protocol import InvalidParameterError, Logprobs, SamplingParams

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
LIVENESS_SERVICE = "kvray.liveness"  # grpc.health.v1 service name for liveness probes
MAX_METADATA_BYTES = 16 * 1024
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    # Clients ping after 2 s without a byte to notice a hung server (kvray.client's
    # CHANNEL_OPTIONS): allow it.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 1_500),
    ("grpc.http2.max_ping_strikes", 0),
    # And the server pings idle connections: a client gone without a word (a partition, a
    # NAT that forgot it) releases its streams and its token's slots within ~30 s.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Hostile clients: a connection must finish its handshake (TLS, HTTP/2's preface) in 30 s,
    # and one with no call for 5 minutes is sent away (GOAWAY: the client reconnects on its next
    # call). A call whose metadata is over 16 KiB gets RESOURCE_EXHAUSTED; gRPC's own default
    # refuses at random between 8 and 16 KiB.
    ("grpc.server_handshake_timeout_ms", 30_000),
    ("grpc.max_connection_idle_ms", 300_000),
    ("grpc.max_metadata_size", MAX_METADATA_BYTES),
    ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
    # NOTE: no grpc.max_connection_age_ms: with a finite grace it would cut a long stream (a
    # 30,000-token generation at 20 ms a step runs 10 minutes), and with an endless one it
    # bounds nothing a hostile client holds.
]
# The accept backlog (`accept_backlog_options`): room beside the streams the router can hold
# (gRPC's own cap, so the cap is never below gRPC's), for unary calls, health checks and
# streams the router will refuse; and how long a call may wait there (in effect no limit: a
# call's deadline bounds its wait).
BACKLOG_ROOM = 3_000
BACKLOG_WAIT_LIMIT_S = 24 * 3600
UNARY_CALLS_PER_CONNECTION = 1_000  # room for Tokenize, GetModelInfo, ... beside the streams
_FINISH = {
    FinishReason.STOP: pb.GenerateResponse.STOP,
    FinishReason.LENGTH: pb.GenerateResponse.LENGTH,
    FinishReason.ABORT: pb.GenerateResponse.ABORT,
}


def sampling_params_from_proto(req: pb.GenerateRequest) -> SamplingParams:
    """SamplingParams from a request; unset optional fields take SamplingParams' defaults.

    Raises:
        ValueError: a field out of range (the message names it).
    """
    return SamplingParams(**params_from_request(req))


def prompt_from_proto(req: pb.GenerateRequest) -> Prompt:
    kind = req.WhichOneof("prompt")
    if kind == "text":
        return req.text
    if kind == "token_ids":
        return list(req.token_ids.ids)
    if kind == "messages":
        chat = req.messages
        check_num_messages(len(chat.messages))  # before a dict is made per message
        return ChatPrompt(
            tuple({"role": m.role, "content": m.content} for m in chat.messages),
            add_generation_prompt=(
                chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
            ),
        )
    raise ValueError("prompt is missing: set text, token_ids or messages")


def resume_from_proto(req: pb.GenerateRequest) -> dict[int, Resumed]:
    """What each sample of a broken stream had received, by sample index."""
    resume: dict[int, Resumed] = {}
    for sample in req.resume:
        if sample.index in resume:
            raise InvalidParameterError("resume", f"resume names sample {sample.index} twice")
        resume[sample.index] = Resumed(
            tuple(sample.token_ids), sample.num_text_chars, sample.finished
        )
    return resume


def chunk_to_proto(chunk: CompletionChunk) -> pb.GenerateResponse:
    response = pb.GenerateResponse(
        request_id=chunk.request_id, index=chunk.index, token_ids=chunk.token_ids, text=chunk.text
    )
    for lp in chunk.logprobs or ():
        if lp is not None:
            _add_logprob(response.logprobs, lp)
    for lp in (chunk.prompt_logprobs or [None])[1:]:
        assert lp is not None
        _add_logprob(response.prompt_logprobs, lp)
    if chunk.cumulative_logprob is not None:
        response.cumulative_logprob = chunk.cumulative_logprob
    if chunk.finish_reason is not None:
        response.finish_reason = _FINISH[chunk.finish_reason]
        response.usage.prompt_tokens = chunk.num_prompt_tokens
        response.usage.completion_tokens = chunk.num_output_tokens
        response.usage.cached_tokens = chunk.num_cached_tokens
        if isinstance(chunk.stop_reason, str):
            response.stop_string = chunk.stop_reason
        elif isinstance(chunk.stop_reason, int):
            response.stop_token_id = chunk.stop_reason
    return response


def _add_logprob(field: Any, lp: Logprobs) -> None:
    field.add(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top_token_ids=lp.top_token_ids,
        top_logprobs=lp.top_logprobs,
    )


@dataclass(frozen=True)
class MalformedRequest:
    """What the server got instead of a request it could parse (garbage bytes, invalid UTF-8)."""

    message_type: str
    error: str


def add_servicer(servicer: GenerationServicer, server: grpc.aio.Server) -> None:
    """Register kvray.v1.Generation with deserializers that never raise: bytes that do not
    parse reach the method as a `MalformedRequest`, which answers INVALID_ARGUMENT (grpc would
    answer UNKNOWN and log a traceback per call)."""

    def parse(message_class: Any) -> Callable[[bytes], Any]:
        def deserialize(data: bytes) -> Any:
            try:
                return message_class.FromString(data)
            except Exception as exc:  # DecodeError, invalid UTF-8 in a string field
                return MalformedRequest(message_class.DESCRIPTOR.full_name, str(exc))

        return deserialize

    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Generation"].methods:
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=parse(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


async def _reject_malformed(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, MalformedRequest):
        logger.info("rejected a malformed %s from %s", request.message_type, context.peer())
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a valid {request.message_type} (bytes that do not parse, or "
            f"strings that are not UTF-8): {request.error}",
        )


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, router: Router, auth: TokenAuth | None = None) -> None:
        """`auth`: with it, every call needs `authorization: Bearer <token>` metadata."""
        self.router = router
        self.auth = auth

    async def _check(self, request: Any, context: grpc.aio.ServicerContext) -> Token | None:
        """Refuse malformed bytes and calls without a valid token; returns the caller's token."""
        await _reject_malformed(request, context)
        return None if self.auth is None else await _authenticate(self.auth, context)

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        token = await self._check(request, context)
        try:
            sampling_params = sampling_params_from_proto(request)
            prompt = prompt_from_proto(request)
            with self.auth.slot(token) if self.auth and token else contextlib.nullcontext():
                chunks = self.router.generate(
                    prompt,
                    sampling_params,
                    request_id=request.request_id or None,
                    session_id=request.session_id or None,
                    resume=resume_from_proto(request),
                )
                async for chunk in chunks:
                    yield chunk_to_proto(chunk)
        except asyncio.CancelledError:
            raise  # client gone or deadline passed; router.generate aborted the request
        except Exception as exc:
            await _abort(context, exc)

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        await self._check(request, context)
        try:
            return pb.TokenizeResponse(token_ids=await self.router.tokenize(request.text))
        except Exception as exc:
            await _abort(context, exc)
            raise  # unreachable: abort raises

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        await self._check(request, context)
        info = self.router.info
        if info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no replica is ready yet")
        assert info is not None
        return pb.ModelInfo(
            model=self.router.config.model,
            max_model_len=info.max_model_len,
            vocab_size=info.vocab_size,
            eos_token_ids=list(info.eos_token_ids),
            has_tokenizer=self.router.tokenizer is not None,
            dtype=info.dtype,
            has_chat_template=bool(getattr(self.router.tokenizer, "chat_template", None)),
            quantization=info.quantization or "",
            decode_graph_batch_sizes=list(info.decode_graph_batch_sizes),
            sampling_defaults=info.sampling_defaults,
            implementation=info.implementation,
            execution_plan=info.execution_plan,
            tensor_parallel_size=info.tensor_parallel_size,
            pipeline_parallel_size=info.pipeline_parallel_size,
            ranks=[pb.RankInfo(**dataclasses.asdict(rank)) for rank in info.ranks],
        )

    async def GetClusterStatus(
        self, request: pb.GetClusterStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClusterStatus:
        await self._check(request, context)
        return status_to_proto(self.router.status())


def status_to_proto(status: ClusterStats) -> pb.ClusterStatus:
    """The proto's fields, read by name from the stats objects (a test keeps names in step)."""

    def fill(message: Any, source: object) -> Any:
        for f in message.DESCRIPTOR.fields:
            if f.message_type is None:
                value = getattr(source, f.name)
                setattr(message, f.name, value.value if isinstance(value, enum.Enum) else value)
        return message

    proto = fill(pb.ClusterStatus(), status)
    for replica in status.replicas:
        message = fill(proto.replicas.add(), replica)
        for rank in replica.ranks:
            fill(message.ranks.add(), rank)
    for decision in status.recent_decisions:
        fill(proto.recent_decisions.add(), decision)
    return proto


async def _authenticate(auth: TokenAuth, context: grpc.aio.ServicerContext) -> Token:
    """The caller's token, from its `authorization: Bearer` metadata; aborts UNAUTHENTICATED."""
    header = dict(context.invocation_metadata() or ()).get("authorization")
    try:
        return auth.authenticate(header if isinstance(header, str) else None)
    except UnauthenticatedError as exc:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        raise  # unreachable: abort raises


class ReflectionServicer(reflection.aio.ReflectionServicer):
    """Server reflection, which with tokens on wants a token as every call but health does.

    NOTE: the schema it tells is public (protos/), but an open reflection stream is one more
    thing a caller without a token could hold and feed; generic tools send the token with
    their reflection requests (grpcurl's -H).
    """

    def __init__(self, service_names: list[str], auth: TokenAuth | None) -> None:
        super().__init__(service_names)
        self.auth = auth

    async def ServerReflectionInfo(  # type: ignore[override]
        self,
        request_iterator: AsyncIterable[reflection_pb2.ServerReflectionRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        if self.auth is not None:
            await _authenticate(self.auth, context)
        # NOTE: typeshed declares the parent's method a coroutine (hence the ignore and the
        # cast); it is an async generator, as this one.
        responses = cast(
            AsyncIterable[Any], super().ServerReflectionInfo(request_iterator, context)
        )
        async for response in responses:
            yield response


class TokenGateInterceptor(grpc.aio.ServerInterceptor):
    """With tokens on, a call without a valid token is refused before its request is read.

    NOTE: gRPC reads a unary request whole (up to 4 MiB) before a handler runs, and a
    handler's own check comes after that; this runs on the call's metadata alone and answers
    with a streaming handler, which gRPC starts at once: UNAUTHENTICATED, the request unread.
    Health stays open (probes carry no token); the servicers still check the token they are
    given, and count its running requests."""

    def __init__(self, auth: TokenAuth) -> None:
        self.auth = auth

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method = handler_call_details.method or ""
        if method.startswith(f"/{health.SERVICE_NAME}/"):
            return await continuation(handler_call_details)
        header = dict(handler_call_details.invocation_metadata or ()).get("authorization")
        try:
            self.auth.authenticate(header if isinstance(header, str) else None)
        except UnauthenticatedError as exc:
            return _refusal(str(exc))
        return await continuation(handler_call_details)


def _refusal(message: str) -> grpc.RpcMethodHandler:
    async def refuse(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.stream_stream_rpc_method_handler(refuse)


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        logger.exception("internal error", exc_info=exc)
    await context.abort(code, message)


def _router_capacity(config: ClusterConfig) -> int:
    """The streams the router can run and queue at once, at its largest."""
    _, max_replicas = config.autoscaling.bounds(config.replicas)
    return max_replicas * config.engine.scheduler.max_num_seqs + config.max_queued_requests


def accept_backlog_options(config: ClusterConfig) -> list[tuple[str, int]]:
    """gRPC's backlog of calls that arrived but that the server has not taken yet: it holds as
    many as the router can run and queue at once (past that the router refuses them itself,
    with RESOURCE_EXHAUSTED and a reason) plus `BACKLOG_ROOM`, for as long as they wait.

    NOTE: grpc.aio takes one call from this backlog per turn of the event loop, so a burst of
    streams, or a busy loop, fills it. gRPC's defaults cancel calls at random once more than
    1,000 wait, every one past 3,000, and any that waited 30 s: the client gets CANCELLED with
    no reason and the server logs nothing. Past this cap a call is still cancelled that way
    (gRPC has no other answer there)."""
    held = _router_capacity(config)
    return [
        # Equal soft and hard limits: no call is dropped at random below the cap.
        ("grpc.server.max_pending_requests", held + BACKLOG_ROOM),
        ("grpc.server.max_pending_requests_hard_limit", held + BACKLOG_ROOM),
        ("grpc.server_max_unrequested_time_in_server", BACKLOG_WAIT_LIMIT_S),
    ]


def connection_options(config: ClusterConfig) -> list[tuple[str, int]]:
    """The main port's caps: `max_connections` connections, and on each as many streams as
    the router can run and queue at once (more would be refused anyway) plus unary calls.

    NOTE: a connection asking for more streams than that gets UNAVAILABLE for the extra ones
    (not a wait), so the cap must stay above what one client may rightly run."""
    streams = _router_capacity(config)
    return [
        ("grpc.max_allowed_incoming_connections", config.max_connections),
        ("grpc.max_concurrent_streams", streams + UNARY_CALLS_PER_CONNECTION),
    ]


async def start_server(
    router: Router,
    *,
    host: str,
    port: int,
    tls: TlsFiles | None = None,
    auth: TokenAuth | None = None,
    health_port: int | None = None,
) -> tuple[list[grpc.aio.Server], int]:
    """Start serving; health reports SERVING only while a replica can take requests.

    With `tls`, the port speaks TLS (mutual TLS with a client CA); with `health_port`, a
    second, plaintext server answers grpc.health.v1 alone (Kubernetes' gRPC probes cannot speak
    TLS). Returns (the servers, the main port).

    Raises:
        OSError: a port cannot be bound.
    """
    options = [
        *SERVER_OPTIONS,
        *connection_options(router.config),
        *accept_backlog_options(router.config),
    ]
    interceptors = [TokenGateInterceptor(auth)] if auth is not None else []
    server = grpc.aio.server(options=options, interceptors=interceptors)
    add_servicer(GenerationServicer(router, auth), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        ReflectionServicer([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], auth),
        server,
    )
    address = f"{host}:{port}"
    bound = (
        server.add_secure_port(address, grpc_credentials(tls))
        if tls is not None
        else server.add_insecure_port(address)
    )
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    servers = [server]
    if health_port is not None:
        probes = grpc.aio.server(options=SERVER_OPTIONS)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probes)
        if probes.add_insecure_port(f"{host}:{health_port}") == 0:
            raise OSError(f"cannot listen on {host}:{health_port} (health_port)")
        servers.append(probes)

    # Liveness: SERVING while this server runs, whatever the replicas do (a probe on it must not
    # restart a router that is only waiting for workers).
    await health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)

    async def set_ready(ready: bool) -> None:
        state = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, state)

    health_updates = BackgroundTasks()

    def on_serving_change(ready: bool) -> None:
        health_updates.spawn(set_ready(ready))

    router.on_serving_change = on_serving_change
    await set_ready(router.is_serving)
    for s in servers:
        await s.start()
    return servers, bound
