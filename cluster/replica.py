"""One replica: a ModelWorker as a Ray actor, and the router-side step loop that drives it.

This is the only place where `ModelWorker` becomes a Ray actor. The loop keeps one step in
flight while it applies the previous step's output, so the actor round trip is hidden: one Ray
message per step for every sequence of the replica, never one per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from typing import Any

from kvray.cluster.config import ClusterConfig
from kvray.cluster.engine import CompletionChunk, EngineCore
from kvray.workers.protocol import StepInput, StepOutput, WorkerInfo

logger = logging.getLogger(__name__)

PIPELINE_MAX_STEP_S = 0.025  # keep a step in flight only while steps are shorter than this


class ReplicaState(str, enum.Enum):
    STARTING = "STARTING"  # actor created, model loading / warming up
    READY = "READY"  # takes requests
    DRAINING = "DRAINING"  # finishes its requests, takes no new ones
    DEAD = "DEAD"  # actor gone; its requests moved elsewhere


def make_worker_actor_class() -> Any:
    """The Ray actor that hosts a worker (built lazily, so importing this module needs no Ray).

    It is created with a picklable factory (`functools.partial(ModelWorker, config, ...)`, or
    the fake worker's) and forwards `warmup`, `step` and `health` to the worker it builds.
    """
    import ray

    # NOTE: health checks get their own concurrency group (their own thread), so a long
    # prefill in `step` never makes a replica look dead.
    @ray.remote(concurrency_groups={"health": 1})  # type: ignore[call-overload]
    class WorkerActor:
        def __init__(self, factory: Callable[[], Any]) -> None:
            self.worker = factory()

        def warmup(self) -> WorkerInfo:
            return self.worker.warmup()

        def step(self, step_input: StepInput) -> Any:
            return self.worker.step(step_input)

        @ray.method(concurrency_group="health")
        def health(self) -> bool:
            return self.worker.health()

    return WorkerActor


class ReplicaHandle:
    """Router-side state of one replica: its actor, its EngineCore and its step loop."""

    def __init__(
        self,
        replica_id: str,
        actor: Any,
        *,
        publish: Callable[[ReplicaHandle, list[CompletionChunk]], None],
        on_failure: Callable[[ReplicaHandle, BaseException], None],
    ) -> None:
        self.replica_id = replica_id
        self.actor = actor
        self.state = ReplicaState.STARTING
        self.info: WorkerInfo | None = None
        self.engine: EngineCore | None = None
        self.started_at = time.monotonic()
        self._publish = publish
        self._on_failure = on_failure
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.has_failed = False  # set once by the router when it handles this replica's failure
        self.step_seconds = 0.0  # moving average of the worker's time per step

    def start_loop(self, engine: EngineCore) -> None:
        self.engine = engine
        self.info = engine.info
        self.state = ReplicaState.READY
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"step-loop-{self.replica_id}"
        )

    def wake(self) -> None:
        """Tell the loop there is work (a new or aborted request)."""
        self._wake.set()

    def cancel(self) -> None:
        """Stop the step loop (without waiting for it)."""
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        assert self.engine is not None
        engine = self.engine
        in_flight: Any = None  # the ObjectRef of the step the worker is running
        try:
            while True:
                if in_flight is None and not engine.has_unfinished():
                    self._wake.clear()
                    await self._wake.wait()
                if in_flight is not None and not self.is_pipelined:
                    self._apply(await in_flight)  # long steps: schedule with the newest state
                    in_flight = None
                    continue
                step = engine.schedule() if engine.has_unfinished() else None
                ref = self.actor.step.remote(step) if step is not None and _has_work(step) else None
                if in_flight is not None:
                    self._apply(await in_flight)
                elif ref is None:
                    # Requests are queued but none can run now: wait for a change, briefly.
                    self._wake.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=0.05)
                in_flight = ref
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the actor died or a step failed: the router fails over
            self._on_failure(self, exc)  # (and marks it DEAD, knowing whether it was draining)

    @property
    def is_pipelined(self) -> bool:
        """Whether to keep the next step in flight while the last one's output is applied.

        NOTE: pipelining hides the Ray round trip (~1-2 ms) but a request that arrives while
        two steps are queued waits for both. With short steps the round trip is a large share
        of each step; with long ones (a big model on CPU) it is not, and the extra step of
        time-to-first-token is not worth it.
        """
        return self.step_seconds < PIPELINE_MAX_STEP_S

    def _apply(self, output: StepOutput) -> None:
        assert self.engine is not None
        self.step_seconds += 0.2 * (output.forward_s - self.step_seconds)
        self._publish(self, self.engine.process(output))

    @property
    def load(self) -> tuple[float, float]:
        """Lower is less loaded: (steps of queued + running work, KV cache use).

        Queued prompt tokens plus one decode token per running sequence, over the step budget:
        roughly how many full steps the replica has to run before a new request's prefill.
        """
        if self.engine is None:
            return (float("inf"), 1.0)
        sched = self.engine.scheduler
        work = (sched.num_queued_tokens + sched.num_running) / sched.config.max_num_batched_tokens
        return (work, self.engine.block_manager.usage)


def _has_work(step: StepInput) -> bool:
    return bool(step.seq_ids or step.finished_seq_ids or step.new_requests)


def actor_options(config: ClusterConfig, *, cluster_gpus: float) -> dict[str, Any]:
    """Ray resources for one worker actor: a GPU when the cluster has them, else CPUs."""
    gpus = config.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if cluster_gpus >= 1 else 0.0
    options: dict[str, Any] = {"num_cpus": config.cpus_per_replica, "num_gpus": gpus}
    if gpus == 0:
        # A CPU worker uses as many torch threads as the CPUs it asked for.
        threads = max(1, int(config.cpus_per_replica))
        options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(threads)}}
    return options
