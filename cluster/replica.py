"""One replica as the router sees it: its worker actor, its state, and once ready its
EngineCore and step loop. Only `ReplicaPool` changes a replica's state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from kvray.cluster.chunks import CompletionChunk
from kvray.cluster.engine import EngineCore
from kvray.cluster.stats import ReplicaState, ReplicaStats
from kvray.cluster.step_loop import StepLoop


class ReplicaHandle:
    def __init__(self, replica_id: str, actor: Any, *, started_at: float) -> None:
        self.replica_id = replica_id
        self.actor = actor  # .warmup/.step/.health remotes (a Ray actor, or a test double)
        self.state = ReplicaState.STARTING
        self.started_at = started_at
        self.engine: EngineCore | None = None
        self.loop: StepLoop | None = None
        self.has_failed = False  # set once, when the pool handles its failure
        self._task: asyncio.Task[None] | None = None

    def start(
        self,
        engine: EngineCore,
        *,
        on_chunks: Callable[[list[CompletionChunk]], None],
        on_failure: Callable[[ReplicaHandle, BaseException], None],
    ) -> None:
        """Start its step loop over `engine`, stepping the actor. A step that raises (the actor
        died, the worker failed) ends the loop and calls `on_failure`."""
        self.engine = engine
        self.loop = StepLoop(engine, self.actor.step.remote, on_chunks=on_chunks)

        async def run(loop: StepLoop) -> None:
            try:
                await loop.run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                on_failure(self, exc)

        self._task = asyncio.get_running_loop().create_task(
            run(self.loop), name=f"step-loop-{self.replica_id}"
        )

    def wake(self) -> None:
        """Tell its step loop there is work (a new, moved or aborted request)."""
        if self.loop is not None:
            self.loop.wake()

    def cancel(self) -> None:
        """Stop the step loop without waiting for it."""
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    async def stop(self) -> None:
        """Stop the step loop and wait until it has stopped."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def stats(self) -> ReplicaStats:
        engine = self.engine
        if engine is None:
            return ReplicaStats(self.replica_id, self.state)
        sched, blocks = engine.scheduler, engine.block_manager
        return ReplicaStats(
            replica_id=self.replica_id,
            state=self.state,
            device=engine.info.device,
            num_waiting=sched.num_waiting,
            num_running=sched.num_running,
            num_queued_tokens=sched.num_queued_tokens,
            max_num_batched_tokens=sched.config.max_num_batched_tokens,
            kv_blocks_used=blocks.num_blocks - blocks.num_free_blocks,
            kv_blocks_total=blocks.num_blocks,
            num_preemptions=sched.num_preemptions,
            num_finished_requests=engine.num_finished_requests,
            num_prefix_queries=blocks.num_prefix_queries,
            num_prefix_hits=blocks.num_prefix_hits,
            ranks=engine.info.ranks,
            step_seconds=engine.step_seconds,
            mask_seconds=engine.mask_seconds,
        )
