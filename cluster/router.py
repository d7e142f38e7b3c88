"""The router: admits requests and owns their streams, and wires the cluster together.

Runs in one asyncio loop in the router process. Replica lifecycle is the pool's
(`replica_pool.py`), where each request runs is the dispatcher's (`dispatcher.py`, applying
the pure decisions of `placement.py`), and the replica count is the autoscaler's
(`autoscaler.py`).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from kvray.cluster.autoscaler import Autoscaler
from kvray.cluster.background import BackgroundTasks
from kvray.cluster.chunks import CompletionChunk
from kvray.cluster.config import ClusterConfig
from kvray.cluster.dispatcher import Dispatcher
from kvray.cluster.errors import OverloadedError, UnavailableError
from kvray.cluster.input_processor import InputProcessor, Prompt, Resumed, check_ids
from kvray.cluster.metrics import ServingMetrics
from kvray.cluster.replica_pool import ReplicaPool
from kvray.cluster.request import Request
from kvray.cluster.stats import ClusterStats
from kvray.cluster.streams import RequestStream, coalesce
from kvray.cluster.worker_actor import ray_kill
from kvray.workers.protocol import InvalidParameterError, SamplingParams, WorkerInfo
from kvray.workers.structured_output import CompilerStats

logger = logging.getLogger(__name__)

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
        self._streams: dict[str, RequestStream] = {}
        self.dispatcher = Dispatcher(config, self.pool, self._streams, clock=clock, fail=self._fail)
        self.autoscaler = Autoscaler(
            config.autoscaling,
            self.pool,
            replicas=config.replicas,
            num_unassigned=lambda: self.dispatcher.num_unassigned,
        )
        self.processor: InputProcessor | None = None  # once the first replica is ready
        self._tasks = BackgroundTasks()
        self._is_serving = False
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

    async def close_streams(self, timeout_s: float) -> tuple[int, int]:
        """Shutdown: wait up to `timeout_s` for running streams to finish, then end the rest
        with UNAVAILABLE. Returns the number of streams open when it began, and of those it
        ended."""
        num_open = len(self._streams)
        deadline = self.clock() + timeout_s
        while self._streams and self.clock() < deadline:
            await asyncio.sleep(0.05)
        ended = list(self._streams.values())
        for stream in ended:
            self.abort(stream)
            stream.queue.put_nowait(
                UnavailableError(
                    "the server is shutting down (its streams had shutdown_timeout_s to finish)"
                )
            )
        return num_open, len(ended)

    async def shutdown(self) -> None:
        self.pool.is_closing = True  # NOTE: first, so no failure handling starts a replacement
        await self._tasks.cancel_all()
        await self.pool.shutdown()
        if self.processor is not None:
            self.processor.close()

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
                if not stream.is_ranked:
                    self.autoscaler.record_ttft(now, now - stream.arrival_time)
            self.metrics.observe(stream, chunk, now)
            stream.queue.put_nowait(chunk)
            if chunk.finish_reason is not None:
                stream.num_finished += 1
                if stream.is_finished:
                    del self._streams[chunk.request_id]

    def on_requests_orphaned(self, requests: list[Request], *, failover: bool) -> None:
        """Requests whose replica failed or stopped draining go to another replica, or wait."""
        self.dispatcher.requeue(requests, failover=failover)

    def on_replicas_changed(self) -> None:
        if self.processor is None and self.pool.info is not None:
            self.processor = InputProcessor(self.pool.info, self.pool.tokenizer)
        self.dispatcher.assign_waiting()
        self.dispatcher.rebalance()
        if (
            not self.pool.ready()
            and not self.pool.is_starting()
            and not self.autoscaler.can_scale_from_zero
        ):
            # Nothing is coming: the requests waiting for a replica cannot run anywhere.
            self.dispatcher.fail_waiting("no healthy replica to continue the request")
        if self.is_serving != self._is_serving:
            self._is_serving = self.is_serving
            self.on_serving_change(self._is_serving)

    # ------------------------------------------------------------------ requests

    async def tokenize(self, text: str) -> list[int]:
        """Token ids of a text, as a prompt. Raises ValueError or UnavailableError."""
        processor = self._processor()
        if processor.tokenizer is None:
            raise ValueError("this model has no tokenizer")
        return await processor.tokenize_async(text)

    def submit(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams,
        *,
        request_id: str | None = None,
        session_id: str | None = None,
    ) -> RequestStream:
        """Validate and queue a request on a replica (or, with none ready, until one is),
        processing its prompt on this thread (`admit` is the front doors' way in).

        Nothing is queued when this raises.

        Raises:
            ValueError: invalid prompt, parameters or ids, or a request_id already in use.
            OverloadedError: the queue is full.
            UnavailableError: no replica is ready and none can be started.
        """
        processor = self._processor()
        request_id = check_ids(request_id, session_id)
        request = processor.process(prompt, sampling_params, request_id, arrival_time=self.clock())
        return self._enqueue(request, session_id)

    async def admit(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams,
        *,
        request_id: str | None = None,
        session_id: str | None = None,
        resume: Mapping[int, Resumed] | None = None,
    ) -> RequestStream:
        """`submit`, with a large prompt tokenized on the input thread, so that the event loop
        (every other stream) never waits for it. With `resume`, a broken stream continues
        (see `InputProcessor.process`). Raises as `submit` does."""
        processor = self._processor()
        request_id = check_ids(request_id, session_id)
        request = await processor.process_async(
            prompt, sampling_params, request_id, arrival_time=self.clock(), resume=resume
        )
        return self._enqueue(request, session_id)

    def _processor(self) -> InputProcessor:
        if self.processor is None:
            raise UnavailableError("no replica has started yet; retry shortly")
        return self.processor

    def _enqueue(self, request: Request, session_id: str | None) -> RequestStream:
        """Queue a processed request on a replica (or until one is ready)."""
        if self.num_waiting >= self.config.max_queued_requests:
            raise OverloadedError(
                f"{self.num_waiting} requests are queued (max_queued_requests="
                f"{self.config.max_queued_requests}); retry later"
            )
        if request.request_id in self._streams:
            raise InvalidParameterError(
                "request_id", f"request_id {request.request_id!r} is already in use"
            )
        replica = self.dispatcher.pick(request, session_id)
        if (
            replica is None
            and not self.autoscaler.can_scale_from_zero
            and not self.pool.is_starting()
        ):
            raise UnavailableError("no replica is ready; retry shortly")
        stream = RequestStream(
            request.request_id,
            request.num_outputs,
            arrival_time=request.arrival_time,
            is_ranked=request.sampling_params.is_ranked,
        )
        stream.num_finished = sum(s.is_finished for s in request.seqs)  # resumed, finished
        self._streams[request.request_id] = stream
        try:
            self.dispatcher.place(request, stream, replica)  # None: until a replica is ready
        except BaseException:
            del self._streams[request.request_id]
            raise
        self.metrics.observe_admitted(request.sampling_params)
        return stream

    async def generate(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams,
        *,
        request_id: str | None = None,
        session_id: str | None = None,
        resume: Mapping[int, Resumed] | None = None,
    ) -> AsyncIterator[CompletionChunk]:
        """Admit a request and yield its chunks. Leaving early (cancel, error) aborts it."""
        stream = await self.admit(
            prompt, sampling_params, request_id=request_id, session_id=session_id, resume=resume
        )
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
        self.dispatcher.forget(request_id)

    def _fail(self, stream: RequestStream, exc: BaseException) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]
        self.metrics.observe_aborted(stream.num_samples - stream.num_finished)
        stream.queue.put_nowait(exc)

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRE_PERIOD_S)
            self.dispatcher.expire(self.clock())

    async def _rebalance_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.rebalance_period_s)
            self.dispatcher.rebalance()

    # ------------------------------------------------------------------ status

    @property
    def num_waiting(self) -> int:
        """Sequences not running yet: queued on a replica or waiting for one."""
        queued = sum(r.num_waiting for r in self.pool.stats())
        return queued + self.dispatcher.num_unassigned_seqs

    def status(self) -> ClusterStats:
        replicas = self.pool.stats()
        policy = self.autoscaler.policy
        totals = copy.copy(self.pool.retired)
        for replica in replicas:
            totals.add(replica)
        grammars = self.processor.grammars if self.processor is not None else None
        compiles = grammars.stats if grammars is not None else CompilerStats()
        return ClusterStats(
            replicas=replicas,
            queue_depth=self.dispatcher.num_unassigned,
            num_running=sum(r.num_running for r in replicas),
            num_moved_requests=self.dispatcher.num_moved_requests,
            num_rebalanced_requests=self.dispatcher.num_rebalanced_requests,
            num_routing_decisions=dict(self.dispatcher.num_routing_decisions),
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
            num_grammar_compiles=compiles.num_misses,
            num_grammar_cache_hits=compiles.num_hits,
        )
