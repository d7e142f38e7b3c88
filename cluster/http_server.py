"""The OpenAI-compatible HTTP API on the router: `/v1/models` (and `/v1/models/{id}`),
`/v1/completions` and `/v1/chat/completions` (whole or streamed as server-sent events),
`/health` and `/metrics`.

Served by uvicorn in the router's own event loop, beside the gRPC server: the same `Router`,
scheduler and failover. Errors are OpenAI's error JSON: 400 names the parameter, 404 an
unknown model or path, 405 a wrong method, 429 a full queue, 503 no ready replica, 504 a
request past its deadline (`http_request_timeout_s`, or the `X-Request-Timeout` header in
seconds). A client that disconnects aborts its requests, which frees their KV blocks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from kvray.cluster.asgi_server import BodyLimit
from kvray.cluster.chunks import CompletionChunk
from kvray.cluster.errors import OverloadedError, UnauthenticatedError, UnavailableError
from kvray.cluster.input_processor import Prompt
from kvray.cluster.openai_api import ChatCompletionRequest, CompletionRequest
from kvray.cluster.openai_responses import SSE_DONE, Choices, Renderer, sse
from kvray.cluster.router import Router
from kvray.cluster.security import Token, TokenAuth
from kvray.cluster.streams import RequestStream
from kvray.cluster.tool_calls import ToolUse
from kvray.workers.protocol import InvalidParameterError, SamplingParams

logger = logging.getLogger(__name__)

TIMEOUT_HEADER = "x-request-timeout"
BODY_PATHS = ("/v1/completions", "/v1/chat/completions")  # POSTs with a body; no other reads one


class DeadlineExceeded(Exception):
    """The request ran past its deadline."""


class ModelNotFound(Exception):
    """The request names a model this server does not serve."""


def error_json(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """OpenAI's error body and the HTTP status for an exception."""
    param, code = None, None
    if isinstance(exc, HTTPException):  # routing's own: an unknown path, a wrong method
        status = exc.status_code
        kind = "not_found_error" if status == 404 else "invalid_request_error"
    elif isinstance(exc, UnauthenticatedError):
        status, kind = 401, "authentication_error"
    elif isinstance(exc, InvalidParameterError):
        status, kind, param = 400, "invalid_request_error", exc.param
    elif isinstance(exc, ValueError | TypeError):
        status, kind = 400, "invalid_request_error"
    elif isinstance(exc, ModelNotFound):
        status, kind, param, code = 404, "not_found_error", "model", "model_not_found"
    elif isinstance(exc, OverloadedError):
        status, kind = 429, "rate_limit_error"
    elif isinstance(exc, UnavailableError):
        status, kind = 503, "service_unavailable_error"
    elif isinstance(exc, DeadlineExceeded):
        status, kind = 504, "timeout_error"
    else:
        logger.error("internal error", exc_info=exc)
        status, kind = 500, "server_error"
    if isinstance(exc, HTTPException):
        message = exc.detail
    elif status == 500:
        message = f"internal error: {type(exc).__name__}: {exc}"
    else:
        message = str(exc)
    error = {"message": message, "type": kind, "param": param, "code": code or status}
    return status, {"error": error}


def _error_response(exc: BaseException) -> JSONResponse:
    status, body = error_json(exc)
    headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else {}  # 405's Allow
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=status, headers=headers or None)


def build_app(
    router: Router,
    *,
    request_timeout_s: float | None = None,
    drain: Callable[[], Awaitable[Mapping[str, int] | None]] | None = None,
    auth: TokenAuth | None = None,
) -> FastAPI:
    """The HTTP app. `drain()` begins a graceful shutdown and returns once the streams are
    done, with counts of them for the answer (`POST /admin/drain`, from loopback only:
    Kubernetes' preStop hook calls it). With `auth`, every `/v1/` path needs `Authorization:
    Bearer <token>` (401 without, before the path is looked up: an unknown one is 401 too);
    `/health` and `/metrics` stay open for probes and Prometheus. Only `BODY_PATHS` read a
    request body; any other request is answered with its body unread (`BodyLimit`)."""
    app = FastAPI(title="kvray", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, body_paths=BODY_PATHS)
    app.add_middleware(TokenGate, auth=auth)  # NOTE: added last, runs first: before the body
    started = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = loc[0] if loc and not loc[0].isdigit() else None
        where = ".".join(loc) or "body"
        return _error_response(InvalidParameterError(param or "", f"{where}: {first['msg']}"))

    @app.exception_handler(HTTPException)
    async def no_route(request: Request, exc: HTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        return _error_response(
            HTTPException(exc.status_code, f"{exc.detail}: {where}", exc.headers)
        )

    @app.get("/health")
    async def health() -> Response:
        if router.is_serving:
            return JSONResponse({"status": "ok"})
        return _error_response(UnavailableError("no replica is ready"))

    @app.post("/admin/drain")
    async def admin_drain(request: Request) -> Response:
        client = request.client.host if request.client else ""
        if drain is None or not _is_loopback(client):
            raise HTTPException(404)
        closed = await drain()
        return JSONResponse({"drained": True, **(closed or {})})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(router.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model() -> dict[str, Any]:
        info = router.info
        return {
            "id": router.config.model_name,
            "object": "model",
            "created": started,
            "owned_by": "kvray",
            "max_model_len": info.max_model_len if info else None,
        }

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [model()]})

    @app.get("/v1/models/{model_id:path}")  # NOTE: a path: served names hold slashes
    async def retrieve_model(model_id: str) -> Response:
        if model_id != router.config.model_name:
            return _error_response(_model_not_found(router, model_id))
        return JSONResponse(model())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        try:
            prompts, params = body.prompts(), body.sampling_params()
        except ValueError as exc:
            return _error_response(exc)
        return await _generate(
            router, request, body, prompts, params, "completion", request_timeout_s, auth
        )

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        try:
            prompts: list[Prompt] = [body.prompt()]
            params = body.sampling_params()
            await _check_tool_parameters(router, body.tool_use)
        except ValueError as exc:
            return _error_response(exc)
        return await _generate(
            router, request, body, prompts, params, "chat", request_timeout_s, auth
        )

    return app


async def _generate(
    router: Router,
    request: Request,
    body: CompletionRequest | ChatCompletionRequest,
    prompts: list[Prompt],
    params: SamplingParams,
    kind: str,
    request_timeout_s: float | None,
    auth: TokenAuth | None,
) -> Response:
    streams: list[RequestStream] = []
    held = contextlib.ExitStack()  # the caller's token's slot, until the response ends
    try:
        token: Token | None = getattr(request.state, "token", None)  # set by TokenGate
        if auth is not None and token is not None:
            held.enter_context(auth.slot(token))
        if body.model != router.config.model_name:
            raise _model_not_found(router, body.model)
        deadline = _deadline(request, request_timeout_s)
        for prompt in prompts:
            streams.append(await router.admit(prompt, params))
        renderer = Renderer(
            kind,
            router.config.model_name,
            router.tokenizer,
            include_usage=body.include_usage,
            continuous_usage=body.continuous_usage,
            tools=body.tool_use if isinstance(body, ChatCompletionRequest) else None,
        )
        choices = Choices(len(prompts), params.n)
        chunks = _merged(router, streams)
        if not body.stream:
            with held:
                await _collect(chunks, choices, request, deadline)
            return JSONResponse(renderer.response(choices))
        first = await _first(chunks, deadline)
    except Exception as exc:
        held.close()
        for stream in streams:
            router.abort(stream)
        if isinstance(exc, InvalidParameterError):  # from the router's checks (the context)
            exc = body.as_callers(exc)
        return _error_response(exc)
    events = _events(first, chunks, choices, renderer, deadline, held)

    async def release() -> None:
        await events.aclose()  # type: ignore[attr-defined]
        held.close()  # NOTE: again, for an events generator cancelled before it started
        await chunks.aclose()  # type: ignore[attr-defined]

    return EventStream(events, release)


class EventStream(StreamingResponse):
    """Server-sent events that run `release` when the response ends, however it ends: a
    client gone before the first event cancels the response without ever starting the events
    generator, whose own cleanup would then wait for the garbage collector."""

    def __init__(self, events: AsyncIterator[str], release: Callable[[], Awaitable[None]]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self._release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._release()


class TokenGate:
    """ASGI middleware: with `auth`, a `/v1/` request without a valid bearer token gets 401
    before its body is read; the handlers find the token in `request.state.token`."""

    def __init__(self, app: Any, auth: TokenAuth | None) -> None:
        self.app, self.auth = app, auth

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.auth is not None and scope["type"] == "http" and scope["path"].startswith("/v1/"):
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            try:
                token = self.auth.authenticate(header or None)
            except UnauthenticatedError as exc:
                await _error_response(exc)(scope, receive, send)
                return
            scope.setdefault("state", {})["token"] = token
        await self.app(scope, receive, send)


async def _check_tool_parameters(router: Router, tools: ToolUse | None) -> None:
    """Each tool's parameters schema compiles (off the loop; compiled once, then cached), so
    that a schema the grammar engine refuses is a 400 naming its tool whatever the choice. A
    model that cannot constrain its output takes them as given (a forced choice then fails).

    Raises:
        InvalidParameterError: naming `tools[i].function.parameters`.
    """
    grammars = router.processor.grammars if router.processor is not None else None
    if tools is None or grammars is None:
        return
    for spec in tools.parameter_specs():
        await grammars.check(spec)


def _model_not_found(router: Router, name: str) -> ModelNotFound:
    served = router.config.model_name
    return ModelNotFound(f"the model {name!r} is not served here; it is {served!r}")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _deadline(request: Request, default_s: float | None) -> float | None:
    """The request's deadline on the monotonic clock, or None. `X-Request-Timeout` may only
    shorten the server's `http_request_timeout_s` (`default_s`), never lengthen it."""
    header = request.headers.get(TIMEOUT_HEADER)
    seconds = default_s
    if header is not None:
        try:
            seconds = float(header)
        except ValueError:
            seconds = -1.0
        if not seconds > 0:  # NOTE: also NaN
            raise InvalidParameterError(TIMEOUT_HEADER, f"{TIMEOUT_HEADER} must be seconds > 0")
        if default_s is not None:
            seconds = min(seconds, default_s)
    return None if seconds is None else time.monotonic() + seconds


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


async def _merged(
    router: Router, streams: list[RequestStream]
) -> AsyncIterator[tuple[int, CompletionChunk]]:
    """The chunks of every stream as they come, each with its prompt's index. Leaving early
    aborts every request."""
    if len(streams) == 1:
        async for chunk in router.chunks(streams[0]):
            yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, CompletionChunk | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for chunk in router.chunks(stream):
                queue.put_nowait((index, chunk))
            queue.put_nowait((index, None))
        except Exception as exc:
            queue.put_nowait((index, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        for _ in range(len(tasks)):
            while True:
                index, item = await queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _collect(
    chunks: AsyncIterator[tuple[int, CompletionChunk]],
    choices: Choices,
    request: Request,
    deadline: float | None,
) -> None:
    """Fold every chunk into `choices`. Stops early (aborting the requests) if the client
    disconnects; raises DeadlineExceeded past the deadline."""

    async def collect() -> None:
        async for index, chunk in chunks:
            choices.add(index, chunk)

    work = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait(
            {work, gone}, timeout=_remaining(deadline), return_when=asyncio.FIRST_COMPLETED
        )
        if work in done:
            work.result()
        elif gone not in done:
            raise DeadlineExceeded("the request ran past its deadline")
    finally:
        for task in (work, gone):
            task.cancel()
        await asyncio.gather(work, gone, return_exceptions=True)
        await chunks.aclose()  # type: ignore[attr-defined]


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the request body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _first(
    chunks: AsyncIterator[tuple[int, CompletionChunk]], deadline: float | None
) -> tuple[int, CompletionChunk] | None:
    """The first chunk, awaited before the response starts, so that an error (or the deadline)
    still gets its own HTTP status."""
    try:
        return await asyncio.wait_for(anext(chunks), timeout=_remaining(deadline))
    except StopAsyncIteration:
        return None
    except asyncio.TimeoutError:
        raise DeadlineExceeded("no token before the request's deadline") from None


async def _events(
    first: tuple[int, CompletionChunk] | None,
    chunks: AsyncIterator[tuple[int, CompletionChunk]],
    choices: Choices,
    renderer: Renderer,
    deadline: float | None,
    held: contextlib.ExitStack,
) -> AsyncIterator[str]:
    """The server-sent events of a streamed response. A client that goes away cancels this,
    which aborts the requests (their KV blocks are freed at once)."""
    try:
        item = first
        while item is not None:
            index, chunk = item
            event = renderer.chunk(choices.add(index, chunk), chunk)
            if event is not None:
                yield event
            try:
                item = await asyncio.wait_for(anext(chunks), _remaining(deadline))
            except StopAsyncIteration:
                item = None
            except asyncio.TimeoutError:
                raise DeadlineExceeded("the request ran past its deadline") from None
        if renderer.include_usage:
            yield renderer.usage_chunk(choices)
    except Exception as exc:
        yield sse(error_json(exc)[1])
    finally:
        held.close()
        await chunks.aclose()  # type: ignore[attr-defined]
    yield SSE_DONE
