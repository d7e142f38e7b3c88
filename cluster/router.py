"""The router: replicas, placement, request streams, failover and cluster status.

Runs in one asyncio loop in the router process. Each replica has its own EngineCore (scheduler,
block manager, detokenizers) and step loop (`replica.py`); the router decides which replica a
request goes to, moves requests when a replica dies or drains, and (with `scaling.py`) how many
replicas run.
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
from typing import Any

from kvray.cluster.config import ClusterConfig
from kvray.cluster.engine import CompletionChunk, EngineCore, Prompt, RequestGroup
from kvray.cluster.errors import OverloadedError, RequestFailedError, UnavailableError
from kvray.cluster.replica import ReplicaHandle, ReplicaState
from kvray.cluster.scaling import ScalingController
from kvray.cluster.streams import RequestStream, coalesce
from kvray.workers.protocol import SamplingParams, WorkerInfo

logger = logging.getLogger(__name__)

MAX_FAILOVERS = 3  # a request moved this many times fails instead (a worker bug, not bad luck)
MAX_SESSIONS = 100_000  # session -> replica entries kept (least recently used dropped)
SESSION_IMBALANCE = 1.0  # leave a session's replica when it has a full step more queued work


class Router:
    def __init__(
        self,
        config: ClusterConfig,
        spawn_actor: Callable[[str], Any],
        *,
        load_tokenizer: Callable[[WorkerInfo], Any | None] = lambda info: None,
        kill_actor: Callable[[Any], None] | None = None,
    ) -> None:
        """`spawn_actor(replica_id)` creates a worker actor (with .warmup/.step/.health remotes);
        `kill_actor(actor)` stops one (default: `ray.kill`)."""
        self.config = config
        self._spawn_actor = spawn_actor
        self._kill_actor = kill_actor or _ray_kill
        self._load_tokenizer = load_tokenizer
        self.replicas: dict[str, ReplicaHandle] = {}
        self.info: WorkerInfo | None = None
        self.tokenizer: Any | None = None
        # Validates and builds requests when no replica is ready (scale from zero).
        self._template: EngineCore | None = None
        self._streams: dict[str, RequestStream] = {}
        self._unassigned: deque[RequestGroup] = deque()  # requests waiting for a replica
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._replica_ids = itertools.count()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._first_ready = asyncio.Lock()
        self.num_moved_requests = 0  # requests continued on another replica
        self.num_rebalanced_requests = 0  # queued requests moved to a less busy replica
        self.scaling = ScalingController(self)
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
        if self.config.rebalance_period_s > 0:
            self._background(self._rebalance_loop())
        if self.scaling.is_enabled:
            self._background(self.scaling.run())

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
                    self._template = EngineCore(info, self.config.engine.scheduler, self.tokenizer)
        except Exception:
            if replica_id not in self.replicas:  # cancelled while starting (scale-down)
                raise UnavailableError(f"{replica_id} was cancelled while starting") from None
            handle.state = ReplicaState.DEAD
            self.replicas.pop(replica_id, None)
            self._kill(handle)
            logger.exception("%s: failed to start", replica_id)
            raise
        if self._closing or replica_id not in self.replicas:
            self._kill(handle)  # shut down (or given up on) while it was starting
            raise UnavailableError(f"{replica_id} is no longer wanted")
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
        self.rebalance()
        self._update_ready()
        return handle

    def cancel_start(self, replica: ReplicaHandle) -> None:
        """Give up on a replica that is still starting (its actor may wait for a node)."""
        self.replicas.pop(replica.replica_id, None)
        replica.state = ReplicaState.DEAD
        self._kill(replica)
        logger.info("%s: start cancelled", replica.replica_id)

    def ready_replicas(self) -> list[ReplicaHandle]:
        return [r for r in self.replicas.values() if r.state is ReplicaState.READY]

    @property
    def is_closing(self) -> bool:
        return self._closing

    @property
    def is_serving(self) -> bool:
        """Whether a request can be taken now: a replica is ready, or one can be started for it."""
        if self.ready_replicas():
            return True
        return self._template is not None and self.scaling.can_scale_from_zero

    def _update_ready(self) -> None:
        self.on_ready_change(self.is_serving)

    def _on_replica_failure(self, replica: ReplicaHandle, exc: BaseException) -> None:
        """A replica's actor died or a step failed: move its requests, then replace it."""
        if self._closing or replica.has_failed or replica.engine is None:
            return  # shutting down, or already handled (the step loop and a health check both saw it)
        replica.has_failed = True
        was_draining = replica.state is ReplicaState.DRAINING
        logger.error(
            "%s failed (%s: %s); moving its requests", replica.replica_id, type(exc).__name__, exc
        )
        replica.state = ReplicaState.DEAD
        replica.cancel()
        self._kill(replica)
        self.replicas.pop(replica.replica_id, None)
        self._requeue(replica.engine.take_unfinished(), count_failover=True)
        self._update_ready()
        if not was_draining:
            self._background(self._replace())

    async def _replace(self) -> None:
        with contextlib.suppress(Exception):
            await self.launch_replica()
        if (
            not self.ready_replicas()
            and not self._is_starting()
            and not self.scaling.can_scale_from_zero
        ):
            # Nothing came back: the moved requests cannot continue anywhere.
            self.fail_unassigned(lambda stream: True, "no healthy replica to continue the request")

    async def drain_replica(self, replica: ReplicaHandle, timeout_s: float) -> None:
        """Take no new requests, let running ones finish (up to `timeout_s`), move the rest
        to other replicas (recomputed from prompt + streamed tokens), then stop the actor."""
        replica.state = ReplicaState.DRAINING
        logger.info("%s: draining", replica.replica_id)
        self.rebalance()  # its queued requests go now; only running ones have to finish
        deadline = time.monotonic() + timeout_s
        engine = replica.engine
        while engine is not None and engine.has_unfinished() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if replica.has_failed:
            return  # its failure handling already moved its requests
        if engine is not None and engine.has_unfinished():
            logger.info("%s: drain timeout; moving its requests", replica.replica_id)
            self._requeue(engine.take_unfinished(), count_failover=False)
        self.replicas.pop(replica.replica_id, None)
        await replica.stop()
        self._kill(replica)
        logger.info("%s: stopped", replica.replica_id)
        self._update_ready()

    def _requeue(self, groups: list[RequestGroup], *, count_failover: bool) -> None:
        for group in groups:
            stream = self._streams.get(group.request_id)
            if stream is None:
                continue
            stream.replica_id = None
            stream.num_failovers += count_failover
            if stream.num_failovers > MAX_FAILOVERS:
                self._fail(
                    stream, RequestFailedError(f"request failed on {MAX_FAILOVERS} replicas")
                )
            else:
                self._wait_for_replica(group, stream)
                self.num_moved_requests += 1
        self._assign_unassigned()

    def _wait_for_replica(self, group: RequestGroup, stream: RequestStream) -> None:
        stream.unassigned_since = time.monotonic()
        self._unassigned.append(group)

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
            stream.replica_id = replica.replica_id
            stream.unassigned_since = None
            replica.wake()

    def rebalance(self) -> int:
        """Spread queued requests over the ready replicas; returns how many moved.

        Only requests that hold nothing on their replica move (see `EngineCore.queued_groups`),
        so a move costs nothing. They are dealt oldest first to the replica with the least
        work (queued prompt tokens + running sequences, as placement counts it), and move only
        when their replica, without them, would still have more work than that one with them
        (no back and forth between near-equal replicas). After a burst, a replica that becomes ready takes its share of the queue instead of
        only new arrivals, and a draining replica hands its queue over at once.
        """
        ready = self.ready_replicas()
        if not ready or self.config.rebalance_period_s == 0:
            return 0
        work: dict[str, int] = {}  # per ready replica, not counting what may move
        movable: list[tuple[RequestGroup, ReplicaHandle]] = []
        for replica in self.replicas.values():
            if replica.engine is None or replica.state not in (
                ReplicaState.READY,
                ReplicaState.DRAINING,
            ):
                continue
            groups = replica.engine.queued_groups()
            movable += [(group, replica) for group in groups]
            if replica.state is ReplicaState.READY:
                sched = replica.engine.scheduler
                work[replica.replica_id] = (
                    sched.num_queued_tokens + sched.num_running - sum(map(_queued_tokens, groups))
                )
        if len(ready) < 2 and all(source in ready for _, source in movable):
            return 0  # nowhere else to go
        movable.sort(key=lambda item: item[0].seqs[0].arrival_time)
        moved: set[ReplicaHandle] = set()
        num_moved = 0
        for group, source in movable:
            tokens = _queued_tokens(group)
            dest = min(ready, key=lambda r: work[r.replica_id])
            if (
                source.state is ReplicaState.READY
                and work[source.replica_id] - work[dest.replica_id] <= tokens
            ):
                work[source.replica_id] += tokens  # no better place: it stays
                continue
            stream = self._streams.get(group.request_id)
            if stream is None:
                continue
            assert source.engine is not None and dest.engine is not None
            dest.engine.adopt(source.engine.release(group))
            stream.replica_id = dest.replica_id
            work[dest.replica_id] += tokens
            moved.add(dest)
            num_moved += 1
        for replica in moved:
            replica.wake()
        if num_moved:
            self.num_rebalanced_requests += num_moved
            logger.debug("rebalanced %d queued requests", num_moved)
        return num_moved

    async def _rebalance_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.config.rebalance_period_s)
            self.rebalance()

    def expire_unassigned(self, now: float) -> None:
        """Fail requests that have waited for a replica longer than `cold_start_timeout_s`."""
        timeout = self.config.autoscaling.cold_start_timeout_s
        self.fail_unassigned(
            lambda stream: now - (stream.unassigned_since or now) > timeout,
            f"no replica became ready within {timeout:.0f}s",
        )

    def fail_unassigned(self, should_fail: Callable[[RequestStream], bool], message: str) -> None:
        """End waiting-for-a-replica requests whose stream `should_fail` selects (UNAVAILABLE)."""
        keep: deque[RequestGroup] = deque()
        for group in self._unassigned:
            stream = self._streams.get(group.request_id)
            if stream is not None and should_fail(stream):
                self._fail(stream, UnavailableError(message))
            elif stream is not None:
                keep.append(group)
        self._unassigned = keep

    def _kill(self, replica: ReplicaHandle) -> None:
        with contextlib.suppress(Exception):
            self._kill_actor(replica.actor)

    async def _health_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.config.health_check_period_s)
            self.expire_unassigned(time.monotonic())
            for replica in self.ready_replicas():
                try:
                    await asyncio.wait_for(replica.actor.health.remote(), timeout=30)
                except Exception as exc:
                    self._on_replica_failure(replica, exc)

    # ------------------------------------------------------------------ requests

    def validate(self, prompt: Prompt, params: SamplingParams) -> list[int]:
        """Token ids of a valid prompt. Raises ValueError (bad input) or UnavailableError."""
        if self._template is None:
            raise UnavailableError("no replica has started yet; retry shortly")
        token_ids = self._template.tokenize(prompt)
        self._template.check_params(params)
        return token_ids

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
            ValueError: invalid prompt or parameters.
            OverloadedError: the queue is full.
            UnavailableError: no replica is ready and none can be started.
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
        if replica is None and not self.scaling.can_scale_from_zero and not self._is_starting():
            raise UnavailableError("no replica is ready; retry shortly")
        assert self._template is not None
        group = self._template.make_group(token_ids, params, request_id)
        stream = RequestStream(request_id, params.n)
        self._streams[request_id] = stream
        if replica is None:
            self._wait_for_replica(group, stream)  # a replica is starting, or scaling starts one
        else:
            assert replica.engine is not None
            replica.engine.adopt(group)
            stream.replica_id = replica.replica_id
            replica.wake()
        return stream

    def _is_starting(self) -> bool:
        return any(r.state is ReplicaState.STARTING for r in self.replicas.values())

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
                for item in coalesce(items):
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
        now = time.monotonic()
        for chunk in chunks:
            stream = self._streams.get(chunk.request_id)
            if stream is None:
                continue
            if stream.first_token_time is None:
                stream.first_token_time = now
                self.scaling.record_ttft(now, now - stream.arrival_time)
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
        """Requests not running yet: queued on a replica or waiting for one."""
        waiting = sum(r.engine.scheduler.num_waiting for r in self.replicas.values() if r.engine)
        return waiting + len(self._unassigned)

    @property
    def num_unassigned(self) -> int:
        """Requests waiting for a replica (none ready, or moved from a failed/drained one)."""
        return len(self._unassigned)

    def status(self) -> dict[str, Any]:
        replicas = [_replica_status(r) for r in self.replicas.values()]
        return {
            "replicas": replicas,
            "queue_depth": len(self._unassigned),
            "num_running": sum(r.get("num_running", 0) for r in replicas),
            "num_moved_requests": self.num_moved_requests,
            "num_rebalanced_requests": self.num_rebalanced_requests,
            **self.scaling.status(),
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

    def background(self, coro: Any) -> None:
        """Run `coro` as a task the router owns (cancelled at shutdown)."""
        self._background(coro)

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _ray_kill(actor: Any) -> None:
    import ray

    ray.kill(actor, no_restart=True)


def _queued_tokens(group: RequestGroup) -> int:
    """The group's share of its scheduler's `num_queued_tokens`."""
    return sum(s.num_known_tokens for s in group.seqs if not s.is_finished)


def _replica_status(r: ReplicaHandle) -> dict[str, Any]:
    engine = r.engine
    if engine is None:
        return {"replica_id": r.replica_id, "state": r.state.value, "device": ""}
    blocks = engine.block_manager
    return {
        "replica_id": r.replica_id,
        "state": r.state.value,
        "device": r.info.device if r.info else "",
        "num_waiting": engine.scheduler.num_waiting,
        "num_running": engine.scheduler.num_running,
        "kv_blocks_used": blocks.num_blocks - blocks.num_free_blocks,
        "kv_blocks_total": blocks.num_blocks,
        "num_preemptions": engine.scheduler.num_preemptions,
        "num_finished_requests": engine.num_finished_requests,
    }
