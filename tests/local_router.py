"""The router with in-process fake actors (no Ray), for tests of placement, rebalancing,
draining, failover and scaling decisions.

Each actor wraps a FakeWorker. Its warmup and steps can wait on gates, so a test decides when
replicas start and make progress and can look at the router in between; `fail` makes its next
step raise (a worker crash), and `kill` ends a pending call as Ray's `ray.kill` would.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from kvray.cluster.config import ClusterConfig
from kvray.cluster.router import Router
from kvray.cluster.streams import RequestStream
from kvray.workers.config import EngineConfig, SchedulerConfig
from kvray.workers.fake import FakeWorker
from kvray.workers.protocol import SamplingParams

MAX_TOKENS = 6
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


class ActorDiedError(RuntimeError):
    pass


class _Remote:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> asyncio.Future[Any]:
        future = asyncio.ensure_future(self.fn(*args))
        # A step still in flight at shutdown ends with ActorDiedError that nobody awaits.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future


class LocalActor:
    """A FakeWorker behind the `.remote()` calls the router makes."""

    def __init__(
        self, step_gate: asyncio.Event | None = None, warmup_gate: asyncio.Event | None = None
    ) -> None:
        self.worker = FakeWorker(num_kv_blocks=64, block_size=4)
        self.step_gate, self.warmup_gate = step_gate, warmup_gate
        self.killed = asyncio.Event()
        self.fail = False
        self.warmup = _Remote(self._warmup)
        self.step = _Remote(self._step)
        self.health = _Remote(self._health)

    def kill(self) -> None:
        self.killed.set()

    async def _wait(self, gate: asyncio.Event | None) -> None:
        if gate is not None and not self.killed.is_set():
            waits = [asyncio.ensure_future(gate.wait()), asyncio.ensure_future(self.killed.wait())]
            _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in pending:
                w.cancel()
        if self.killed.is_set():
            raise ActorDiedError("the actor was killed")

    async def _warmup(self) -> Any:
        await self._wait(self.warmup_gate)
        return self.worker.warmup()

    async def _step(self, step_input: Any) -> Any:
        await self._wait(self.step_gate)
        if self.fail:
            raise ActorDiedError("the worker process died")
        return self.worker.step(step_input)

    async def _health(self) -> bool:
        await self._wait(None)
        return True


class ManualClock:
    """A clock that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def settle(rounds: int = 50) -> None:
    """Let the event loop run everything that is ready (steps, their outputs), without waiting
    on the wall clock."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class LocalRouter:
    """A Router whose replicas are LocalActors; `actors` in launch order."""

    def __init__(
        self, *, max_num_seqs: int = 2, clock: ManualClock | None = None, **settings: Any
    ) -> None:
        self.step_gate = asyncio.Event()  # shared by every actor's steps unless a test swaps it
        self.warmup_gate: asyncio.Event | None = None  # set to hold the next launches
        self.actors: list[LocalActor] = []
        config = ClusterConfig(
            engine=EngineConfig(scheduler=SchedulerConfig(max_num_seqs=max_num_seqs)),
            **{"max_queued_requests": 100, **settings},
        )
        self.router = Router(
            config,
            self._spawn,
            kill_actor=lambda actor: actor.kill(),
            clock=clock or time.monotonic,
        )

    def _spawn(self, replica_id: str) -> LocalActor:
        actor = LocalActor(self.step_gate, self.warmup_gate)
        self.actors.append(actor)
        return actor


def expected(prompt: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
    """The fake worker's greedy output for `prompt`."""
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(FakeWorker.next_token(ids, 1000))
    return ids[len(prompt) :]


async def collect(router: Router, stream: RequestStream) -> list[int]:
    """Every token of a stream (raising its error, if it ends with one)."""
    tokens: list[int] = []
    try:
        while not stream.is_finished or not stream.queue.empty():
            item = await stream.queue.get()
            if isinstance(item, BaseException):
                raise item
            tokens += item.token_ids
    finally:
        router.abort(stream)
    return tokens


def queue_of(replica: Any) -> list[str]:
    return [req.request_id for req in replica.engine.scheduler.waiting]
