"""The router: replicas, placement, request streams, failover and cluster status.

Runs in one asyncio loop in the router process. Each replica has its own EngineCore (scheduler,
block manager, detokenizers) and step loop (`replica.py`); the router decides which replica a
request goes to and moves requests when a replica dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from kvray.cluster.config import ClusterConfig
from kvray.cluster.engine import CompletionChunk, EngineCore, Prompt, RequestGroup
from kvray.cluster.errors import OverloadedError, RequestFailedError, UnavailableError
from kvray.cluster.replica import ReplicaHandle, ReplicaState
from kvray.workers.protocol import SamplingParams, WorkerInfo

logger = logging.getLogger(__name__)

MAX_FAILOVERS = 3  # a request moved this many times fails instead (a worker bug, not bad luck)
MAX_SESSIONS = 100_000  # session -> replica entries kept (least recently used dropped)
SESSION_IMBALANCE = 1.0  # leave a session's replica when it has a full step more queued work


@dataclass(eq=False)
class RequestStream:
    """The router's end of one client stream: chunks of the request's n samples, in order."""

    request_id: str
    num_samples: int
    replica_id: str | None = None
    queue: asyncio.Queue[CompletionChunk | BaseException] = field(default_factory=asyncio.Queue)
    num_finished: int = 0
    num_failovers: int = 0
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def is_finished(self) -> bool:
        return self.num_finished == self.num_samples


def _coalesce(
    items: list[CompletionChunk | BaseException],
) -> list[CompletionChunk | BaseException]:
    """Merge consecutive chunks of the same sample (a slow consumer then gets fewer messages)."""
    merged: list[CompletionChunk | BaseException] = []
    for item in items:
        last = merged[-1] if merged else None
        if (
            isinstance(item, CompletionChunk)
            and isinstance(last, CompletionChunk)
            and last.index == item.index
            and last.finish_reason is None
        ):
            merged[-1] = last.merge(item)
        else:
            merged.append(item)
    return merged


class Router:
    def __init__(
        self,
        config: ClusterConfig,
        spawn_actor: Callable[[str], Any],
        *,
        load_tokenizer: Callable[[WorkerInfo], Any | None] = lambda info: None,
    ) -> None:
        """`spawn_actor(replica_id)` creates a worker actor (with .warmup/.step/.health remotes)."""
        self.config = config
        self._spawn_actor = spawn_actor
        self._load_tokenizer = load_tokenizer
        self.replicas: dict[str, ReplicaHandle] = {}
        self.info: WorkerInfo | None = None
        self.tokenizer: Any | None = None
        self._streams: dict[str, RequestStream] = {}
        self._unassigned: deque[RequestGroup] = deque()  # moved requests waiting for a replica
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._replica_ids = itertools.count()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._first_ready = asyncio.Lock()
        self.num_moved_requests = 0  # requests continued on another replica after a failure
        self.on_ready_change: Callable[[bool], None] = lambda ready: None

    # ------------------------------------------------------------------ replicas

    async def start(self) -> None:
        """Launch the configured replicas; returns once every one is ready (or failed)."""
        launches = [self.launch_replica() for _ in range(self.config.replicas)]
        results = await asyncio.gather(*launches, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if len(failures) == len(results):
            raise failures[0]
        self._background(self._health_loop())

    async def launch_replica(self) -> ReplicaHandle:
        """Create a worker actor, wait for its warmup, then let it take requests."""
        replica_id = f"replica-{next(self._replica_ids)}"
        handle = ReplicaHandle(
            replica_id,
            self._spawn_actor(replica_id),
            publish=self._publish,
            on_failure=self._on_replica_failure,
        )
        self.replicas[replica_id] = handle
        logger.info("%s: starting", replica_id)
        try:
            info = await handle.actor.warmup.remote()
            async with self._first_ready:  # the first ready replica loads the tokenizer
                if self.info is None:
                    self.tokenizer = await asyncio.get_running_loop().run_in_executor(
                        None, self._load_tokenizer, info
                    )
                    self.info = info
        except Exception:
            handle.state = ReplicaState.DEAD
            self.replicas.pop(replica_id, None)
            self._kill(handle)
            logger.exception("%s: failed to start", replica_id)
            raise
        handle.start_loop(EngineCore(info, self.config.engine.scheduler, self.tokenizer))
        logger.info(
            "%s: ready on %s, %d KV blocks of %d tokens, started in %.1fs",
            replica_id,
            info.device,
            info.num_kv_blocks,
            info.block_size,
            time.monotonic() - handle.started_at,
        )
        self._assign_unassigned()
        self.on_ready_change(True)
        return handle

    def ready_replicas(self) -> list[ReplicaHandle]:
        return [r for r in self.replicas.values() if r.state is ReplicaState.READY]

    def _on_replica_failure(self, replica: ReplicaHandle, exc: BaseException) -> None:
        """A replica's actor died or a step failed: move its requests, then replace it."""
        if self._closing or replica.has_failed or replica.engine is None:
            return  # shutting down, or already handled (the step loop and a health check both saw it)
        replica.has_failed = True
        logger.error(
            "%s failed (%s: %s); moving its requests", replica.replica_id, type(exc).__name__, exc
        )
        replica.state = ReplicaState.DEAD
        replica.cancel()
        self._kill(replica)
        moved = replica.engine.take_unfinished()
        for group in moved:
            stream = self._streams.get(group.request_id)
            if stream is None:
                continue
            stream.num_failovers += 1
            if stream.num_failovers > MAX_FAILOVERS:
                self._fail(
                    stream, RequestFailedError(f"request failed on {MAX_FAILOVERS} replicas")
                )
            else:
                self._unassigned.append(group)
        self.replicas.pop(replica.replica_id, None)
        self._assign_unassigned()
        if not self.ready_replicas():
            self.on_ready_change(False)
        self._background(self._replace(replica))

    async def _replace(self, dead: ReplicaHandle) -> None:
        with contextlib.suppress(Exception):
            await self.launch_replica()
        if not self.ready_replicas():
            # Nothing came back: the moved requests cannot continue anywhere.
            while self._unassigned:
                group = self._unassigned.popleft()
                stream = self._streams.get(group.request_id)
                if stream is not None:
                    self._fail(
                        stream, UnavailableError("no healthy replica to continue the request")
                    )

    def _assign_unassigned(self) -> None:
        while self._unassigned:
            replica = self._pick(None)
            if replica is None:
                return
            group = self._unassigned.popleft()
            stream = self._streams.get(group.request_id)
            if stream is None or group.is_finished:
                continue
            assert replica.engine is not None
            replica.engine.adopt(group)
            self.num_moved_requests += 1
            stream.replica_id = replica.replica_id
            replica.wake()
            logger.info("%s continues on %s", group.request_id, replica.replica_id)

    def _kill(self, replica: ReplicaHandle) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.kill(replica.actor, no_restart=True)

    async def _health_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.config.health_check_period_s)
            for replica in self.ready_replicas():
                try:
                    await asyncio.wait_for(replica.actor.health.remote(), timeout=30)
                except Exception as exc:
                    self._on_replica_failure(replica, exc)

    # ------------------------------------------------------------------ requests

    def validate(self, prompt: Prompt, params: SamplingParams) -> list[int]:
        """Token ids of a valid prompt. Raises ValueError (bad input) or UnavailableError."""
        engine = next((r.engine for r in self.ready_replicas() if r.engine is not None), None)
        if engine is None:
            raise UnavailableError("no replica is ready; retry shortly")
        token_ids = engine.tokenize(prompt)
        engine.check_params(params)
        return token_ids

    def submit(
        self,
        prompt: Prompt,
        params: SamplingParams,
        *,
        request_id: str | None = None,
        session_id: str | None = None,
    ) -> RequestStream:
        """Validate and queue a request on a replica. Nothing is queued when this raises.

        Raises:
            ValueError: invalid prompt or parameters.
            OverloadedError: the queue is full.
            UnavailableError: no replica is ready.
        """
        token_ids = self.validate(prompt, params)
        if self.num_waiting >= self.config.max_queued_requests:
            raise OverloadedError(
                f"{self.num_waiting} requests are queued (max_queued_requests="
                f"{self.config.max_queued_requests}); retry later"
            )
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        replica = self._pick(session_id)
        if replica is None or replica.engine is None:
            raise UnavailableError("no replica is ready; retry shortly")
        stream = RequestStream(request_id, params.n, replica.replica_id)
        replica.engine.add_request(token_ids, params, request_id=request_id)
        self._streams[request_id] = stream
        replica.wake()
        return stream

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams,
        *,
        request_id: str | None = None,
        session_id: str | None = None,
    ) -> AsyncIterator[CompletionChunk]:
        """Submit a request and yield its chunks. Leaving early (cancel, error) aborts it."""
        stream = self.submit(prompt, params, request_id=request_id, session_id=session_id)
        try:
            while not stream.is_finished or not stream.queue.empty():
                items = [await stream.queue.get()]
                while not stream.queue.empty():  # fell behind: send what piled up as one chunk
                    items.append(stream.queue.get_nowait())
                for item in _coalesce(items):
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            self.abort(stream.request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request wherever it is; its blocks are freed now. Idempotent."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        replica = self.replicas.get(stream.replica_id or "")
        if replica is not None and replica.engine is not None:
            replica.engine.abort(request_id)
            replica.wake()
        self._unassigned = deque(g for g in self._unassigned if g.request_id != request_id)

    def _publish(self, replica: ReplicaHandle, chunks: list[CompletionChunk]) -> None:
        for chunk in chunks:
            stream = self._streams.get(chunk.request_id)
            if stream is None:
                continue
            stream.queue.put_nowait(chunk)
            if chunk.finish_reason is not None:
                stream.num_finished += 1
                if stream.is_finished:
                    del self._streams[chunk.request_id]

    def _fail(self, stream: RequestStream, exc: BaseException) -> None:
        self._streams.pop(stream.request_id, None)
        stream.queue.put_nowait(exc)

    def _pick(self, session_id: str | None) -> ReplicaHandle | None:
        """The least loaded ready replica, or the session's replica unless it is much busier."""
        ready = self.ready_replicas()
        if not ready:
            return None
        best = min(ready, key=lambda r: r.load)
        if session_id is None:
            return best
        current = self.replicas.get(self._sessions.get(session_id, ""))
        if (
            current is not None
            and current.state is ReplicaState.READY
            and current.load[0] - best.load[0] <= SESSION_IMBALANCE
        ):
            best = current
        self._sessions[session_id] = best.replica_id
        self._sessions.move_to_end(session_id)
        if len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return best

    # ------------------------------------------------------------------ status

    @property
    def num_waiting(self) -> int:
        waiting = sum(r.engine.scheduler.num_waiting for r in self.ready_replicas() if r.engine)
        return waiting + len(self._unassigned)

    def status(self) -> dict[str, Any]:
        replicas = []
        for r in self.replicas.values():
            engine = r.engine
            replicas.append(
                {
                    "replica_id": r.replica_id,
                    "state": r.state.value,
                    "device": r.info.device if r.info else "",
                    "num_waiting": engine.scheduler.num_waiting if engine else 0,
                    "num_running": engine.scheduler.num_running if engine else 0,
                    "kv_blocks_used": (
                        engine.block_manager.num_blocks - engine.block_manager.num_free_blocks
                        if engine
                        else 0
                    ),
                    "kv_blocks_total": engine.block_manager.num_blocks if engine else 0,
                    "num_preemptions": engine.scheduler.num_preemptions if engine else 0,
                    "num_finished_requests": engine.num_finished_requests if engine else 0,
                }
            )
        return {
            "replicas": replicas,
            "queue_depth": len(self._unassigned),
            "num_running": sum(r["num_running"] for r in replicas),
        }

    # ------------------------------------------------------------------ shutdown

    async def drain(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for running streams to finish, then abort the rest."""
        deadline = time.monotonic() + timeout_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self._streams):
            stream = self._streams[request_id]
            self.abort(request_id)
            stream.queue.put_nowait(UnavailableError("the server is shutting down"))

    async def shutdown(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        for replica in list(self.replicas.values()):
            await replica.stop()
            self._kill(replica)
        self.replicas.clear()

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
