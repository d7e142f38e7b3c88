"""The step loop: drives one EngineCore, step after step, through an executor.

Schedule → execute → process. `execute(step)` sends a step to a worker and returns an awaitable
of its output: a Ray actor call for a replica, or an in-process call (benchmarks, tests). While
steps are short the loop keeps one step in flight: it sends the next step before it applies the
previous output, so the executor's round trip (a Ray call: ~1-2 ms) is hidden
(docs/adr/0001-adaptive-step-pipelining.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from kvray.cluster.chunks import CompletionChunk
from kvray.cluster.engine import EngineCore
from kvray.workers.protocol import StepInput, StepOutput

PIPELINE_MAX_STEP_S = 0.025  # keep a step in flight only while steps are shorter than this
IDLE_POLL_S = 0.05  # with requests queued that cannot run, look again this often

Execute = Callable[[StepInput], Awaitable[StepOutput]]


class StepLoop:
    def __init__(
        self,
        engine: EngineCore,
        execute: Execute,
        *,
        on_chunks: Callable[[list[CompletionChunk]], None],
        max_pipelined_step_s: float = PIPELINE_MAX_STEP_S,
    ) -> None:
        """`max_pipelined_step_s`: keep a step in flight only while steps take less than this
        (0: never, for an executor with no round trip to hide)."""
        self.engine = engine
        self._execute = execute
        self._on_chunks = on_chunks
        self._wake = asyncio.Event()
        self.max_pipelined_step_s = max_pipelined_step_s
        self.step_seconds = 0.0  # moving average of the worker's time per step

    def wake(self) -> None:
        """Tell the loop there is work (a new, moved or aborted request)."""
        self._wake.set()

    @property
    def is_pipelined(self) -> bool:
        """Whether to keep the next step in flight while the last one's output is applied.

        NOTE: pipelining hides the round trip but a request that arrives while two steps are
        queued waits for both. With short steps the round trip is a large share of each step;
        with long ones (a big model on CPU) it is not, and the extra step of time to first token
        is not worth it.
        """
        return self.step_seconds < self.max_pipelined_step_s

    async def run(self, *, until_idle: bool = False) -> None:
        """Step while there is work; with `until_idle`, return once every request has finished,
        otherwise wait for `wake` and go on until cancelled. Raises what `execute` raises."""
        engine = self.engine
        in_flight: Awaitable[StepOutput] | None = None
        while True:
            if in_flight is None and not engine.has_unfinished():
                if until_idle:
                    return
                self._wake.clear()
                await self._wake.wait()
            if in_flight is not None and not self.is_pipelined:
                self._apply(await in_flight)  # long steps: schedule with the newest state
                in_flight = None
                continue
            step = engine.schedule() if engine.has_unfinished() else None
            sent = self._execute(step) if step is not None and _has_work(step) else None
            if in_flight is not None:
                self._apply(await in_flight)
            elif sent is None:
                # Requests are queued but none can run now: wait for a change, briefly.
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=IDLE_POLL_S)
            in_flight = sent

    def _apply(self, output: StepOutput) -> None:
        self.step_seconds += 0.2 * (output.forward_s - self.step_seconds)
        self._on_chunks(self.engine.process(output))


def in_process(step: Callable[[StepInput], StepOutput]) -> Execute:
    """An executor that calls a worker's `step` in this thread, as a task of the running loop
    (steps run in the order they were sent)."""

    def execute(step_input: StepInput) -> Awaitable[StepOutput]:
        async def run() -> StepOutput:
            return step(step_input)

        future: asyncio.Future[Any] = asyncio.ensure_future(run())
        return future

    return execute


def _has_work(step: StepInput) -> bool:
    return bool(step.seq_ids or step.finished_seq_ids or step.new_seqs)
