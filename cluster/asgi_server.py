"""uvicorn serving an ASGI app inside the running event loop: on a socket kvray binds itself
(a TCP socket with TCP_NODELAY), optionally with TLS reloaded in place, and without signal
handlers of its own (the launcher's SIGTERM drain stays in charge), on a protocol with the
connection bounds of `http_protocol`; `BodyLimit` caps request bodies before the app reads them,
and lets only the paths that take a body read one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Collection, Iterator
from typing import Any

import uvicorn
from fastapi.responses import JSONResponse

from kvray.cluster.background import BackgroundTasks
from kvray.cluster.http_protocol import BoundedHttpProtocol, ConnectionLimits
from kvray.cluster.input_processor import MAX_REQUEST_BYTES
from kvray.cluster.security import RELOAD_CHECK_S, HttpTls

logger = logging.getLogger(__name__)


class HttpServer:
    """uvicorn serving the app in the running event loop (no signal handlers of its own)."""

    def __init__(
        self,
        app: Any,
        *,
        host: str,
        port: int,
        tls: HttpTls | None = None,
        limits: ConnectionLimits | None = None,
    ) -> None:
        self.host, self.port = host, port
        config = uvicorn.Config(
            app,
            http=BoundedHttpProtocol.bounded_by(limits or ConnectionLimits()),
            ws="none",  # NOTE: no WebSocket: an upgraded connection would leave those bounds
            lifespan="off",
            log_level="warning",
            access_log=False,
        )
        config.load()
        self.tls = tls
        if tls is not None:
            config.ssl = tls.context  # NOTE: reloaded in place when the files change
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None
        self._reloads = BackgroundTasks()
        self.socket: socket.socket | None = None  # the listening socket, once started

    async def start(self) -> int:
        """Listen and serve; returns the bound port. Raises OSError if the port is taken."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # NOTE: IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are
        # TCP, and without it Nagle holds a response's body behind its headers for a delayed
        # ACK (~40 ms on every request of a kept-alive connection).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket = sock
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(f"HTTP: cannot listen on {self.host}:{self.port}: {exc}") from None
        self.port = sock.getsockname()[1]
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        if self.tls is not None:
            self._reloads.spawn(self._reload_tls(self.tls))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise OSError(f"HTTP: the server on port {self.port} stopped at start")
            await asyncio.sleep(0.01)
        return self.port

    async def _reload_tls(self, tls: HttpTls) -> None:
        while True:
            await asyncio.sleep(RELOAD_CHECK_S)
            tls.reload()

    async def stop(self) -> None:
        await self._reloads.cancel_all()
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self._task, timeout=10)


class _EmbeddedServer(uvicorn.Server):
    # NOTE: the process's SIGTERM/SIGINT handlers are the launcher's (graceful drain);
    # uvicorn would otherwise replace them while it serves.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before the app reads it.

    Only a POST to one of `body_paths` may carry a body. It is read here, counted as it arrives
    (chunked bodies have no Content-Length to trust), and handed to the app whole. Any other
    request is answered with its body unread (the app sees an empty one) and, when it declared
    one, `Connection: close`, so the connection reads no more of it."""

    def __init__(
        self, app: Any, *, body_paths: Collection[str], limit: int = MAX_REQUEST_BYTES
    ) -> None:
        self.app, self.body_paths, self.limit = app, frozenset(body_paths), limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if scope["method"] != "POST" or scope["path"] not in self.body_paths:
            has_body = (
                b"transfer-encoding" in headers or headers.get(b"content-length", b"0") != b"0"
            )
            await self.app(scope, _no_body(receive), _closing(send) if has_body else send)
            return
        declared = headers.get(b"content-length", b"")
        chunks: list[bytes] = []
        size = int(declared) if declared.isdigit() else 0
        if size <= self.limit:
            size = 0
            while True:
                message = await receive()
                if message["type"] != "http.request":  # the client left: nothing to answer
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > self.limit or not message.get("more_body", False):
                    break
        if size > self.limit:
            message = f"the request body is over {self.limit} bytes; send a shorter prompt"
            body = {"message": message, "type": "invalid_request_error", "param": None, "code": 413}
            response = JSONResponse(
                {"error": body}, status_code=413, headers={"Connection": "close"}
            )
            await response(scope, receive, send)
            return
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then the disconnect, when it comes

        await self.app(scope, replay, send)


def _no_body(receive: Any) -> Any:
    """`receive` for a request whose body is not read: an empty body, then what comes after
    the body (the disconnect)."""
    told = False

    async def no_body() -> Any:
        nonlocal told
        if not told:
            told = True
            return {"type": "http.request", "body": b"", "more_body": False}
        while (message := await receive())["type"] == "http.request":
            pass  # NOTE: reached only by a response that waits for the client to leave
        return message

    return no_body


def _closing(send: Any) -> Any:
    """`send` that adds `Connection: close` to the response (uvicorn then closes after it)."""

    async def closing(message: Any) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", []), (b"connection", b"close")]
            message = {**message, "headers": headers}
        await send(message)

    return closing
