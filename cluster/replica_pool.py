"""The replica pool: the replicas and their lifecycle, and the only code that changes a
replica's state.

    STARTING ──warmup──► READY ──drain──► DRAINING ──► (stopped)
        │                  │                  │
        └── fails / cancelled ──► DEAD ◄──────┘ fails: its requests move; a READY one is replaced

It also learns the model's limits and tokenizer from the first replica that starts. It tells
the router (its `PoolListener`) when requests lose their replica and when the set of replicas
changes; it never touches requests itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from kvray.cluster.background import BackgroundTasks
from kvray.cluster.chunks import CompletionChunk
from kvray.cluster.config import ClusterConfig
from kvray.cluster.engine import EngineCore
from kvray.cluster.errors import UnavailableError
from kvray.cluster.placement import choose_replicas_to_remove
from kvray.cluster.replica import ReplicaHandle
from kvray.cluster.request import Request
from kvray.cluster.stats import EngineTotals, ReplicaState, ReplicaStats
from kvray.workers.protocol import WorkerInfo

if TYPE_CHECKING:
    from kvray.cluster.kv_events import KvEventPublisher, ReplicaKvEvents

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 30.0
DRAIN_POLL_S = 0.05


class PoolListener(Protocol):
    def on_chunks(self, chunks: list[CompletionChunk]) -> None:
        """A replica's step produced these chunks."""

    def on_requests_orphaned(self, requests: list[Request], *, failover: bool) -> None:
        """These requests lost their replica (it failed, or its drain timed out)."""

    def on_replicas_changed(self) -> None:
        """A replica became ready, started draining, or left the pool."""


class ReplicaPool:
    def __init__(
        self,
        config: ClusterConfig,
        spawn_actor: Callable[[str], Any],
        *,
        kill_actor: Callable[[Any], None],
        load_tokenizer: Callable[[WorkerInfo], Any | None],
        listener: PoolListener,
        clock: Callable[[], float],
    ) -> None:
        """`spawn_actor(replica_id)` creates a worker actor (with .warmup/.step/.health
        remotes); `kill_actor(actor)` stops one."""
        self.config = config
        self.clock = clock
        self.replicas: dict[str, ReplicaHandle] = {}  # in launch order
        self.info: WorkerInfo | None = None  # the model's limits, from the first ready replica
        self.tokenizer: Any | None = None
        self.is_closing = False
        self.retired = EngineTotals()  # counters of the replicas that have left the pool
        self._spawn_actor = spawn_actor
        self._kill_actor = kill_actor
        self._load_tokenizer = load_tokenizer
        self._listener = listener
        self._ids = itertools.count()
        self._first_ready = asyncio.Lock()
        self._tasks = BackgroundTasks()
        self.kv_events = _kv_event_publisher(config)  # None: off
        self._kv_streams: dict[str, ReplicaKvEvents] = {}  # by replica id, while it has a cache

    # ------------------------------------------------------------------ views

    def ready(self) -> list[ReplicaHandle]:
        return [r for r in self.replicas.values() if r.state is ReplicaState.READY]

    def is_starting(self) -> bool:
        return any(r.state is ReplicaState.STARTING for r in self.replicas.values())

    def stats(self) -> list[ReplicaStats]:
        return [r.stats() for r in self.replicas.values()]

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        """Launch the configured replicas; returns once each is ready or has failed.

        Raises:
            Exception: what the first failed launch raised, when every launch failed.
        """
        launches = [self.launch() for _ in range(self.config.replicas)]
        results = await asyncio.gather(*launches, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if len(failures) == len(results):
            raise failures[0]
        self._tasks.spawn(self._health_loop())

    async def launch(self) -> ReplicaHandle:
        """Start one replica and wait until it is ready. Raises when its start failed."""
        return await self._warm_up(self._spawn())

    def add(self, count: int) -> None:
        """Start `count` replicas in the background. An actor that cannot even be created
        (Ray unreachable, say) is logged and skipped: the caller's work goes on."""
        for _ in range(count):
            try:
                replica = self._spawn()
            except Exception:
                logger.exception("could not create a replica's actor")
                continue
            self._tasks.spawn(self._warm_up_quietly(replica))

    def remove(self, count: int, *, drain_timeout_s: float) -> None:
        """Scale down by `count`: cancel replicas still starting, then drain ready ones."""
        for replica_id in choose_replicas_to_remove(self.stats(), count):
            replica = self.replicas[replica_id]
            if replica.state is ReplicaState.STARTING:
                self.cancel_start(replica)
            else:
                self._tasks.spawn(self.drain(replica, drain_timeout_s))

    def _spawn(self) -> ReplicaHandle:
        """Create a worker actor and register it as STARTING (synchronously, so that the
        router counts it as capacity that is coming)."""
        replica_id = f"replica-{next(self._ids)}"
        replica = ReplicaHandle(replica_id, self._spawn_actor(replica_id), started_at=self.clock())
        self.replicas[replica_id] = replica
        logger.info("%s: starting", replica_id)
        return replica

    async def _warm_up(self, replica: ReplicaHandle) -> ReplicaHandle:
        try:
            info = await replica.actor.warmup.remote()
            await self._learn_model(info)
        except Exception:
            if replica.replica_id not in self.replicas:  # cancelled while starting (scale-down)
                raise UnavailableError(
                    f"{replica.replica_id} was cancelled while starting"
                ) from None
            logger.exception("%s: failed to start", replica.replica_id)
            self._retire(replica)
            self._listener.on_replicas_changed()
            raise
        if self.is_closing or replica.replica_id not in self.replicas:
            self._kill(replica)  # shut down (or given up on) while it was starting
            raise UnavailableError(f"{replica.replica_id} is no longer wanted")
        replica.state = ReplicaState.READY
        engine = EngineCore(info, self.config.engine.scheduler, clock=self.clock)
        replica.start(engine, on_chunks=self._step_listener(replica, engine), on_failure=self.fail)
        logger.info(
            "%s: ready on %s, %d KV blocks of %d tokens, started in %.1fs",
            replica.replica_id,
            info.device,
            info.num_kv_blocks,
            info.block_size,
            self.clock() - replica.started_at,
        )
        self._listener.on_replicas_changed()
        return replica

    def _step_listener(
        self, replica: ReplicaHandle, engine: EngineCore
    ) -> Callable[[list[CompletionChunk]], None]:
        """What the replica's step loop calls after each step: with KV cache events on, publish
        the step's changes to its prefix cache, then pass its chunks on."""
        if self.kv_events is None:
            return self._listener.on_chunks
        rank = int(replica.replica_id.rpartition("-")[2])  # `_spawn` names it replica-<n>
        events = self.kv_events.attach(replica.replica_id, rank, engine.block_manager)
        self._kv_streams[replica.replica_id] = events

        def on_chunks(chunks: list[CompletionChunk]) -> None:
            events.flush()
            self._listener.on_chunks(chunks)

        return on_chunks

    async def _warm_up_quietly(self, replica: ReplicaHandle) -> None:
        with contextlib.suppress(Exception):  # _warm_up logs its failures
            await self._warm_up(replica)

    async def _learn_model(self, info: WorkerInfo) -> None:
        """The first replica to start tells the pool the model's limits; load its tokenizer."""
        async with self._first_ready:
            if self.info is None:
                loop = asyncio.get_running_loop()
                self.tokenizer = await loop.run_in_executor(None, self._load_tokenizer, info)
                self.info = info

    def cancel_start(self, replica: ReplicaHandle) -> None:
        """Give up on a replica that is still starting (its actor may wait for a node)."""
        self._retire(replica)
        logger.info("%s: start cancelled", replica.replica_id)
        self._listener.on_replicas_changed()

    # ------------------------------------------------------------------ drain and failure

    async def drain(self, replica: ReplicaHandle, timeout_s: float) -> None:
        """Scale-down: take no new requests, let running ones finish (up to `timeout_s`), hand
        the rest to the router (recomputed elsewhere from prompt + streamed tokens), stop."""
        replica.state = ReplicaState.DRAINING
        logger.info("%s: draining", replica.replica_id)
        self._listener.on_replicas_changed()  # its queued requests move now
        engine = replica.engine
        deadline = self.clock() + timeout_s
        while engine is not None and engine.has_unfinished() and self.clock() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if replica.has_failed:
            return  # its failure already moved its requests
        if engine is not None and engine.has_unfinished():
            logger.info("%s: drain timeout; moving its requests", replica.replica_id)
            self._listener.on_requests_orphaned(engine.take_unfinished(), failover=False)
        await replica.stop()
        self._retire(replica)
        logger.info("%s: stopped", replica.replica_id)
        self._listener.on_replicas_changed()

    def fail(self, replica: ReplicaHandle, exc: BaseException) -> None:
        """A replica's actor died or a step failed: its requests move and (unless it was
        draining) a replacement starts. Idempotent."""
        if (
            self.is_closing
            or replica.has_failed
            or replica.engine is None
            or replica.replica_id not in self.replicas  # stopped already (a drain finished)
        ):
            return  # shutting down, or handled already (its step loop and a health check both saw it)
        replica.has_failed = True
        was_draining = replica.state is ReplicaState.DRAINING
        logger.error(
            "%s failed (%s: %s); moving its requests", replica.replica_id, type(exc).__name__, exc
        )
        self._retire(replica)
        try:
            self._listener.on_requests_orphaned(replica.engine.take_unfinished(), failover=True)
            if not was_draining:
                self.add(1)
        finally:
            self._listener.on_replicas_changed()

    def _retire(self, replica: ReplicaHandle) -> None:
        """Mark a replica DEAD, stop its step loop, forget it and kill its actor."""
        if replica.replica_id in self.replicas:
            self.retired.add(replica.stats())
        replica.state = ReplicaState.DEAD
        replica.cancel()
        self.replicas.pop(replica.replica_id, None)
        self._kill(replica)
        self._clear_kv_events(replica)

    def _clear_kv_events(self, replica: ReplicaHandle) -> None:
        """A replica's cache is gone: tell the KV cache events' subscribers (once)."""
        events = self._kv_streams.pop(replica.replica_id, None)
        if events is not None:
            events.clear()

    def _kill(self, replica: ReplicaHandle) -> None:
        with contextlib.suppress(Exception):
            self._kill_actor(replica.actor)

    async def _health_loop(self) -> None:
        while not self.is_closing:
            await asyncio.sleep(self.config.health_check_period_s)
            for replica in self.ready():
                if replica.state is not ReplicaState.READY:
                    continue  # it started draining (or failed) while others were pinged
                try:
                    await asyncio.wait_for(replica.actor.health.remote(), timeout=HEALTH_TIMEOUT_S)
                except Exception as exc:
                    self.fail(replica, exc)

    # ------------------------------------------------------------------ shutdown

    async def shutdown(self) -> None:
        """Stop every replica (their requests are not moved)."""
        self.is_closing = True
        await self._tasks.cancel_all()
        for replica in list(self.replicas.values()):
            await replica.stop()
            self._kill(replica)
            self._clear_kv_events(replica)
        self.replicas.clear()
        if self.kv_events is not None:
            await asyncio.to_thread(self.kv_events.close)  # sends what is queued, up to 1 s


def _kv_event_publisher(config: ClusterConfig) -> KvEventPublisher | None:
    """The KV cache event publisher `kv_events_endpoint` asks for (None: off).

    Raises:
        ValueError: the `kv-events` extra (pyzmq, msgspec) is not installed.
        OSError: the endpoint cannot be bound or connected.
    """
    if config.kv_events_endpoint is None:
        return None
    try:
        from kvray.cluster.kv_events import KvEventPublisher
    except ImportError as exc:
        raise ValueError(
            f"kv_events_endpoint is set but {exc.name or 'a dependency'} is not installed: "
            "pip install 'kvray[kv-events]' (pyzmq and msgspec)"
        ) from exc
    return KvEventPublisher.from_config(config)
