"""The router: admits requests, places them on replicas, owns their streams, and moves them
when their replica fails, drains or is busier than another.

Runs in one asyncio loop in the router process. Replica lifecycle is the pool's
(`replica_pool.py`), placement decisions are pure functions (`placement.py`), and the replica
count is the autoscaler's (`autoscaler.py`); the router wires them together.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from kvray.cluster.autoscaler import Autoscaler
from kvray.cluster.background import BackgroundTasks
from kvray.cluster.config import ClusterConfig
from kvray.cluster.engine import CompletionChunk
from kvray.cluster.errors import OverloadedError, RequestFailedError, UnavailableError
from kvray.cluster.input_processor import InputProcessor, Prompt
from kvray.cluster.metrics import ServingMetrics
from kvray.cluster.placement import QueuedRequest, pick_replica, plan_rebalance
from kvray.cluster.replica import ReplicaHandle
from kvray.cluster.replica_pool import ReplicaPool
from kvray.cluster.request import Request
from kvray.cluster.stats import ClusterStats, ReplicaState
from kvray.cluster.streams import RequestStream, coalesce
from kvray.cluster.worker_actor import ray_kill
from kvray.workers.protocol import SamplingParams, WorkerInfo

logger = logging.getLogger(__name__)

MAX_FAILOVERS = 3  # a request moved this many times fails instead (a worker bug, not bad luck)
MAX_SESSIONS = 100_000  # session -> replica entries kept (least recently used dropped)
EXPIRE_PERIOD_S = 1.0  # how often requests waiting for a replica are checked for their timeout


class Router:
    def __init__(
        self,
        config: ClusterConfig,
        spawn_actor: Callable[[str], Any],
        *,
        load_tokenizer: Callable[[WorkerInfo], Any | None] = lambda info: None,
        kill_actor: Callable[[Any], None] = ray_kill,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`spawn_actor(replica_id)` creates a worker actor (.warmup/.step/.health remotes);
        `kill_actor(actor)` stops one; `clock` is the router's monotonic clock (tests pass a
        fake one)."""
        self.config = config
        self.clock = clock
        self.pool = ReplicaPool(
            config,
            spawn_actor,
            kill_actor=kill_actor,
            load_tokenizer=load_tokenizer,
            listener=self,
            clock=clock,
        )
        self.autoscaler = Autoscaler(
            config.autoscaling,
            self.pool,
            replicas=config.replicas,
            num_unassigned=lambda: len(self._unassigned),
        )
        self.processor: InputProcessor | None = None  # once the first replica is ready
        self._streams: dict[str, RequestStream] = {}
        self._unassigned: deque[Request] = deque()  # requests waiting for a replica
        self._sessions: OrderedDict[str, str] = OrderedDict()  # session_id -> replica_id
        self._tasks = BackgroundTasks()
        self._is_serving = False
        self.num_moved_requests = 0  # requests continued on another replica
        self.num_rebalanced_requests = 0  # queued requests moved to a less busy replica
        self.on_serving_change: Callable[[bool], None] = lambda serving: None
        self.metrics = ServingMetrics(config.model_name, self.status)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Launch the configured replicas; returns once every one is ready (or failed)."""
        await self.pool.start()
        self._tasks.spawn(self._expire_loop())
        if self.config.rebalance_period_s > 0:
            self._tasks.spawn(self._rebalance_loop())
        if self.autoscaler.is_enabled:
            self._tasks.spawn(self.autoscaler.run())

    async def close_streams(self, timeout_s: float) -> None:
        """Shutdown: wait up to `timeout_s` for running streams to finish, then end the rest
        with UNAVAILABLE."""
        deadline = self.clock() + timeout_s
        while self._streams and self.clock() < deadline:
            await asyncio.sleep(0.05)
        for stream in list(self._streams.values()):
            self.abort(stream)
            stream.queue.put_nowait(UnavailableError("the server is shutting down"))

    async def shutdown(self) -> None:
        self.pool.is_closing = True  # NOTE: first, so no failure handling starts a replacement
        await self._tasks.cancel_all()
        await self.pool.shutdown()

    @property
    def is_closing(self) -> bool:
        return self.pool.is_closing

    @property
    def is_serving(self) -> bool:
        """Whether a request can be taken now: a replica is ready, or one can be started for it."""
        if self.pool.ready():
            return True
        return self.processor is not None and self.autoscaler.can_scale_from_zero

    @property
    def info(self) -> WorkerInfo | None:
        return self.pool.info

    @property
    def tokenizer(self) -> Any | None:
        return self.pool.tokenizer

    # ------------------------------------------------------------------ the pool's events

    def on_chunks(self, chunks: list[CompletionChunk]) -> None:
        now = self.clock()
        for chunk in chunks:
            stream = self._streams.get(chunk.request_id)
            if stream is None:
                continue
            if stream.first_token_time is None:
                stream.first_token_time = now
                self.autoscaler.record_ttft(now, now - stream.arrival_time)
            self.metrics.observe(stream, chunk, now)
            stream.queue.put_nowait(chunk)
            if chunk.finish_reason is not None:
                stream.num_finished += 1
                if stream.is_finished:
                    del self._streams[chunk.request_id]

    def on_requests_orphaned(self, requests: list[Request], *, failover: bool) -> None:
        """Requests whose replica failed or stopped draining go to another replica, or wait."""
        for request in requests:
            stream = self._streams.get(request.request_id)
            if stream is None:
                continue
            stream.replica_id = None
            stream.num_failovers += failover
            if stream.num_failovers > MAX_FAILOVERS:
                self._fail(
                    stream, RequestFailedError(f"request failed on {MAX_FAILOVERS} replicas")
                )
            else:
                self._wait_for_replica(request, stream)
                self.num_moved_requests += 1
        self._assign_unassigned()

    def on_replicas_changed(self) -> None:
        if self.processor is None and self.pool.info is not None:
            self.processor = InputProcessor(self.pool.info, self.pool.tokenizer)
        self._assign_unassigned()
        self.rebalance()
        if (
            not self.pool.ready()
            and not self.pool.is_starting()
            and not self.autoscaler.can_scale_from_zero
        ):
            # Nothing is coming: the requests waiting for a replica cannot run anywhere.
            self.fail_unassigned(lambda stream: True, "no healthy replica to continue the request")
        if self.is_serving != self._is_serving:
            self._is_serving = self.is_serving
            self.on_serving_change(self._is_serving)

    # ------------------------------------------------------------------ requests

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a text, as a prompt. Raises ValueError or UnavailableError."""
        if self.processor is None:
            raise UnavailableError("no replica has started yet; retry shortly")
        if self.processor.tokenizer is None:
            raise ValueError("this model has no tokenizer")
        return self.processor.tokenize(text)

    def submit(
        self,
        prompt: Prompt,
        params: SamplingParams,
        *,
        request_id: str | None = None,
        session_id: str | None = None,
    ) -> RequestStream:
        """Validate and queue a request on a replica (or, with none ready, until one is).

        Nothing is queued when this raises.

        Raises:
            ValueError: invalid prompt or parameters, or a request_id already in use.
            OverloadedError: the queue is full.
            UnavailableError: no replica is ready and none can be started.
        """
        if self.processor is None:
            raise UnavailableError("no replica has started yet; retry shortly")
        request_id = request_id or uuid.uuid4().hex
        request = self.processor.process(prompt, params, request_id, arrival_time=self.clock())
        if self.num_waiting >= self.config.max_queued_requests:
            raise OverloadedError(
                f"{self.num_waiting} requests are queued (max_queued_requests="
                f"{self.config.max_queued_requests}); retry later"
            )
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        replica = self._pick(session_id)
        if (
            replica is None
            and not self.autoscaler.can_scale_from_zero
            and not self.pool.is_starting()
        ):
            raise UnavailableError("no replica is ready; retry shortly")
        stream = RequestStream(request_id, params.n, arrival_time=request.arrival_time)
        self._streams[request_id] = stream
        if replica is None:
            self._wait_for_replica(request, stream)  # a replica is starting, or one will be
        else:
            self._place(request, stream, replica)
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
        async for chunk in self.chunks(stream):
            yield chunk

    async def chunks(self, stream: RequestStream) -> AsyncIterator[CompletionChunk]:
        """A submitted request's chunks, as they come; chunks that piled up for a slow reader
        arrive merged. Raises the request's error, if it fails. Leaving early aborts it."""
        try:
            while not stream.is_finished or not stream.queue.empty():
                items = [await stream.queue.get()]
                while not stream.queue.empty():  # fell behind: send what piled up as one chunk
                    items.append(stream.queue.get_nowait())
                for item in coalesce(items):
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            self.abort(stream)

    def abort(self, stream: RequestStream) -> None:
        """Abort a stream's request wherever it is; its blocks are freed now. Idempotent.

        NOTE: by stream, not by id: once a request has finished its id may be reused, and the
        old stream's cleanup must not touch the newer request.
        """
        request_id = stream.request_id
        if self._streams.get(request_id) is not stream:
            return  # finished (or failed) already
        del self._streams[request_id]
        replica = self.pool.replicas.get(stream.replica_id or "")
        if replica is not None and replica.engine is not None:
            now = self.clock()
            for chunk in replica.engine.abort(request_id):
                self.metrics.observe(stream, chunk, now)
            replica.wake()
        else:
            self.metrics.observe_aborted(stream.num_samples - stream.num_finished)
        self._unassigned = deque(r for r in self._unassigned if r.request_id != request_id)

    def _fail(self, stream: RequestStream, exc: BaseException) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]
        self.metrics.observe_aborted(stream.num_samples - stream.num_finished)
        stream.queue.put_nowait(exc)

    # ------------------------------------------------------------------ placement

    def _pick(self, session_id: str | None) -> ReplicaHandle | None:
        session_replica = self._sessions.get(session_id) if session_id is not None else None
        replica_id = pick_replica(self.pool.stats(), session_replica_id=session_replica)
        if replica_id is None:
            return None
        if session_id is not None:
            self._sessions[session_id] = replica_id
            self._sessions.move_to_end(session_id)
            if len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return self.pool.replicas[replica_id]

    def _place(self, request: Request, stream: RequestStream, replica: ReplicaHandle) -> None:
        assert replica.engine is not None
        replica.engine.add(request)
        stream.replica_id = replica.replica_id
        stream.unassigned_since = None
        replica.wake()

    def _wait_for_replica(self, request: Request, stream: RequestStream) -> None:
        stream.unassigned_since = self.clock()
        self._unassigned.append(request)

    def _assign_unassigned(self) -> None:
        while self._unassigned:
            replica = self._pick(None)
            if replica is None:
                return
            request = self._unassigned.popleft()
            stream = self._streams.get(request.request_id)
            if stream is not None and not request.is_finished:
                self._place(request, stream, replica)

    def rebalance(self) -> int:
        """Move queued requests to less busy replicas (`placement.plan_rebalance`); returns how
        many moved. Only requests that hold nothing on their replica move, so a move is free."""
        if self.config.rebalance_period_s == 0:
            return 0
        queued: list[QueuedRequest] = []
        requests: dict[str, Request] = {}
        for replica in self.pool.replicas.values():
            if replica.engine is None or replica.state not in (
                ReplicaState.READY,
                ReplicaState.DRAINING,
            ):
                continue
            for request in replica.engine.queued_requests():
                queued.append(
                    QueuedRequest(
                        request.request_id,
                        replica.replica_id,
                        request.num_unfinished_tokens,
                        request.arrival_time,
                    )
                )
                requests[request.request_id] = request
        woken: set[str] = set()
        num_moved = 0
        for move in plan_rebalance(self.pool.stats(), queued):
            stream = self._streams.get(move.request_id)
            source, dest = self.pool.replicas[move.source_id], self.pool.replicas[move.dest_id]
            if stream is None or source.engine is None or dest.engine is None:
                continue
            dest.engine.add(source.engine.release(requests[move.request_id]))
            stream.replica_id = dest.replica_id
            woken.add(dest.replica_id)
            num_moved += 1
        for replica_id in woken:
            self.pool.replicas[replica_id].wake()
        if num_moved:
            self.num_rebalanced_requests += num_moved
            logger.debug("rebalanced %d queued requests", num_moved)
        return num_moved

    def expire_unassigned(self, now: float) -> None:
        """Fail requests that have waited for a replica longer than `cold_start_timeout_s`."""
        timeout = self.config.autoscaling.cold_start_timeout_s
        self.fail_unassigned(
            lambda stream: now - (stream.unassigned_since or now) > timeout,
            f"no replica became ready within {timeout:.0f}s",
        )

    def fail_unassigned(self, should_fail: Callable[[RequestStream], bool], message: str) -> None:
        """End waiting-for-a-replica requests whose stream `should_fail` selects (UNAVAILABLE)."""
        keep: deque[Request] = deque()
        for request in self._unassigned:
            stream = self._streams.get(request.request_id)
            if stream is not None and should_fail(stream):
                self._fail(stream, UnavailableError(message))
            elif stream is not None:
                keep.append(request)
        self._unassigned = keep

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRE_PERIOD_S)
            self.expire_unassigned(self.clock())

    async def _rebalance_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.rebalance_period_s)
            self.rebalance()

    # ------------------------------------------------------------------ status

    @property
    def num_waiting(self) -> int:
        """Sequences not running yet: queued on a replica or waiting for one."""
        queued = sum(r.num_waiting for r in self.pool.stats())
        return queued + sum(1 for r in self._unassigned for s in r.seqs if not s.is_finished)

    @property
    def num_unassigned(self) -> int:
        """Requests waiting for a replica (none ready, or moved from a failed/drained one)."""
        return len(self._unassigned)

    def status(self) -> ClusterStats:
        replicas = self.pool.stats()
        policy = self.autoscaler.policy
        totals = copy.copy(self.pool.retired)
        for replica in replicas:
            totals.add(replica)
        return ClusterStats(
            replicas=replicas,
            queue_depth=len(self._unassigned),
            num_running=sum(r.num_running for r in replicas),
            num_moved_requests=self.num_moved_requests,
            num_rebalanced_requests=self.num_rebalanced_requests,
            min_replicas=policy.min_replicas,
            max_replicas=policy.max_replicas,
            target_replicas=self.autoscaler.target_replicas,
            recent_decisions=list(self.autoscaler.decisions),
            num_preemptions=totals.num_preemptions,
            num_prefix_queries=totals.num_prefix_queries,
            num_prefix_hits=totals.num_prefix_hits,
            num_scale_ups=self.autoscaler.num_scale_ups,
            num_scale_downs=self.autoscaler.num_scale_downs,
            block_size=self.pool.info.block_size if self.pool.info else 0,
        )
