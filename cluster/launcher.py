"""Launching a cluster: Ray, the router, the gRPC server, and graceful shutdown.

`serve(config)` is what `kvray serve` runs; `BackgroundCluster` runs the same thing in a thread
of the current process (tests, notebooks, benchmarks); `serve_app.py` wraps `Cluster` for Ray
Serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvray.cluster.asgi_server import HttpServer
from kvray.cluster.config import ClusterConfig
from kvray.cluster.grpc_server import start_server
from kvray.cluster.http_protocol import ConnectionLimits
from kvray.cluster.http_server import build_app
from kvray.cluster.router import Router
from kvray.cluster.security import HttpTls, TlsFiles, TokenAuth
from kvray.cluster.tokenizer import load_tokenizer
from kvray.cluster.worker_actor import ray_spawner
from kvray.workers.protocol import WorkerInfo

logger = logging.getLogger(__name__)

STOP_MARGIN_S = 5.0  # gRPC's grace beyond shutdown_timeout_s, to deliver the streams' last words


def init_ray(config: ClusterConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if config.ray_address:
        logger.info("joining the Ray cluster at %s", config.ray_address)
    else:
        logger.info("starting a local Ray cluster")
        keep_ray_token_private()  # NOTE: before ray.init, which writes the token into the folder
    ray.init(
        # NOTE: "local" starts a cluster of our own: without it, ray.init joins whatever
        # cluster RAY_ADDRESS or the last `ray start` on this machine left behind.
        address=config.ray_address or "local",
        namespace="kvray",
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=False,
    )
    if not config.ray_address:
        keep_ray_token_private()
    if ray_token_auth() is False:
        logger.warning(
            "Ray's token authentication is off (RAY_AUTH_MODE=%s): Ray's own ports listen on "
            "every interface and run any job sent to them; unset RAY_AUTH_MODE to turn it on",
            os.environ.get("RAY_AUTH_MODE", ""),
        )


def keep_ray_token_private() -> None:
    """Keep the token a local Ray generates (`~/.ray/auth_token`) to this user: the folder 0700
    (made if missing), the file 0600. Ray 2.60 writes both with the process's umask (0755 and
    0644 with the usual 022), and the token opens Ray's ports, which listen on every interface.
    Only permissions are taken away, never given; a failure is logged, not raised."""
    folder = Path.home() / ".ray"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        for path, private in ((folder, 0o700), (folder / "auth_token", 0o600)):
            mode = path.stat().st_mode & 0o777 if path.exists() else private
            if mode & ~private:
                path.chmod(mode & private)
                logger.info("%s was mode %o, now %o", path, mode, mode & private)
    except OSError as exc:
        logger.warning("cannot keep Ray's token to this user (%s): %s", folder, exc)


def ray_token_auth() -> bool | None:
    """Whether Ray answers only callers with its token (Ray 2.60's default); None when this
    Ray cannot say."""
    try:  # NOTE: Ray has no public API for this (2.60)
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:
        return None
    return bool(is_token_auth_enabled())


def _tokenizer_loader(config: ClusterConfig) -> Callable[[WorkerInfo], Any]:
    worker = config.engine.worker

    def load(info: WorkerInfo) -> Any:
        return load_tokenizer(
            info.model, revision=worker.revision, trust_remote_code=worker.trust_remote_code
        )

    return load


class Cluster:
    """A router with its gRPC server and its OpenAI-compatible HTTP server, in the running
    event loop."""

    def __init__(self, config: ClusterConfig, spawn_actor: Callable[[str], Any] | None = None):
        self.config = config
        self._spawn_actor = spawn_actor
        self.router: Router | None = None
        self.servers: list[Any] = []  # gRPC: the main server (and the health-only one)
        self.port: int | None = None
        self.http: HttpServer | None = None
        self.http_port: int | None = None  # None: HTTP is off
        self.stop_requested = asyncio.Event()  # by `kvray drain` (POST /admin/drain)
        self.streams_closed = asyncio.Event()  # every stream has finished or been ended
        self.closed_streams = {"num_streams": 0, "num_ended": 0}  # what closing them found
        self._stopping: asyncio.Task[None] | None = None

    async def start(self) -> None:
        init_ray(self.config)
        spawn = self._spawn_actor or ray_spawner(self.config)
        self.router = Router(self.config, spawn, load_tokenizer=_tokenizer_loader(self.config))
        tls, auth = tls_files(self.config), token_auth(self.config)
        self.servers, self.port = await start_server(
            self.router,
            host=self.config.host,
            port=self.config.port,
            tls=tls,
            auth=auth,
            health_port=self.config.health_port,
        )
        logger.info(
            "gRPC%s listening on %s:%d (NOT_SERVING until a replica is ready)",
            " (TLS)" if tls else "",
            self.config.host,
            self.port,
        )
        _warn_if_open(self.config, auth)
        if self.config.http_port:
            app = build_app(
                self.router,
                request_timeout_s=self.config.http_request_timeout_s,
                drain=self.drain,
                auth=auth,
            )
            self.http = HttpServer(
                app,
                host=self.config.host,
                port=self.config.http_port,
                tls=HttpTls(tls) if tls else None,
                limits=ConnectionLimits(
                    self.config.max_connections, self.config.http_read_timeout_s
                ),
            )
            self.http_port = await self.http.start()
            logger.info(
                "HTTP (OpenAI API, /metrics, /health) listening on %s:%d",
                self.config.host,
                self.http_port,
            )
        await self.router.start()
        # Objects alive now (modules, the tokenizer, configs) live as long as the server: keep
        # them out of the collector's scans, which otherwise show up as inter-token latency spikes.
        gc.collect()
        gc.freeze()
        logger.info(
            "serving %s on port %d with %d replica(s)",
            self.config.model,
            self.port,
            len(self.router.pool.ready()),
        )

    async def stop(self) -> None:
        """Stop taking requests, give running streams `shutdown_timeout_s`, then stop.
        Idempotent: a second call waits for the first."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop())
        await asyncio.shield(self._stopping)

    async def drain(self) -> dict[str, int]:
        """`kvray drain` (a Kubernetes preStop hook): begin stopping, as SIGTERM would, and
        return once every stream has finished or been ended: how many were running
        (`num_streams`) and how many of them were ended at `shutdown_timeout_s` (`num_ended`)."""
        self.stop_requested.set()
        asyncio.get_running_loop().create_task(self.stop())
        await self.streams_closed.wait()
        return self.closed_streams

    async def _stop(self) -> None:
        if self.router is None:
            return
        timeout = self.config.shutdown_timeout_s
        self.router.on_serving_change(False)
        logger.info("shutting down: running streams have %.0fs to finish", timeout)
        # NOTE: gRPC gets a longer grace than the streams: a stream cut at the deadline ends
        # with kvray's own UNAVAILABLE message, not gRPC's "Cancelling all calls".
        grpc_stopped = asyncio.gather(
            *(s.stop(grace=timeout + STOP_MARGIN_S) for s in self.servers)
        )
        num_streams, num_ended = await self.router.close_streams(timeout)
        self.closed_streams = {"num_streams": num_streams, "num_ended": num_ended}
        self.streams_closed.set()
        await grpc_stopped
        if self.http is not None:
            await self.http.stop()
        await self.router.shutdown()


async def serve(config: ClusterConfig) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    cluster = Cluster(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    init_ray(config)  # NOTE: before our handlers: ray.init installs its own SIGTERM handler
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    start = loop.create_task(cluster.start())
    stopped = loop.create_task(_first_of(stop, cluster.stop_requested))
    await asyncio.wait([start, stopped], return_when=asyncio.FIRST_COMPLETED)
    error = start.exception() if start.done() else None
    if error is not None:
        raise error
    await stopped
    start.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await start
    await cluster.stop()


def tls_files(config: ClusterConfig) -> TlsFiles | None:
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    tls = TlsFiles(
        Path(config.tls_cert_file),
        Path(config.tls_key_file),
        Path(config.tls_client_ca_file) if config.tls_client_ca_file else None,
    )
    tls.stamp()  # NOTE: a missing file fails the start, not the first handshake
    return tls


def token_auth(config: ClusterConfig) -> TokenAuth | None:
    return TokenAuth(config.auth_token_file) if config.auth_token_file else None


def _warn_if_open(config: ClusterConfig, auth: TokenAuth | None) -> None:
    try:
        loopback = ipaddress.ip_address(config.host).is_loopback
    except ValueError:
        loopback = config.host == "localhost"
    if auth is None and not loopback:
        logger.warning(
            "serving without authentication on %s: anyone who reaches the port can generate "
            "(set auth_token_file, and TLS for traffic that leaves the machine)",
            config.host,
        )


async def _first_of(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for wait in pending:
        wait.cancel()


class BackgroundCluster:
    """A Cluster running in its own thread and event loop. `with BackgroundCluster(cfg) as c:`."""

    def __init__(self, config: ClusterConfig, spawn_actor: Callable[[str], Any] | None = None):
        self.cluster = Cluster(config, spawn_actor)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="kvray-cluster", daemon=True
        )

    def __enter__(self) -> BackgroundCluster:
        init_ray(
            self.cluster.config
        )  # NOTE: from the calling thread; Ray must not start in a worker thread
        self._thread.start()
        try:
            self.call(self.cluster.start(), timeout=600)
        except BaseException:
            self.__exit__()  # NOTE: a failed start leaves no server or thread behind
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.call(self.cluster.stop(), timeout=120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine in the cluster's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Callable[[], Any], timeout: float = 60) -> Any:
        """Run a plain function in the cluster's loop (to read router state safely)."""

        async def wrapper() -> Any:
            return fn()

        return self.call(wrapper(), timeout)

    @property
    def router(self) -> Router:
        assert self.cluster.router is not None
        return self.cluster.router

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.cluster.port}"

    @property
    def http_url(self) -> str:
        """The OpenAI-compatible API's base URL (`.../v1`)."""
        assert self.cluster.http_port is not None, "HTTP is off (http_port: 0)"
        return f"http://127.0.0.1:{self.cluster.http_port}/v1"
