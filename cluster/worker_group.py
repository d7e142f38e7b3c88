"""A replica split over several worker actors (tensor_parallel_size x pipeline_parallel_size
> 1): its ranks, placed by one Ray placement group and joined by one `torch.distributed` group.

To the pool a `WorkerGroup` is one actor: it answers the same `warmup`, `step` and `health`
remotes. A step goes to every rank, and the output rank's output comes back (vLLM's
`collective_rpc(...)[0]`, where the rank that samples is the last stage's first), so the
router's `StepLoop(engine, execute)` seam is unchanged. Any
rank's failure fails the call, and so the whole replica; `kill` ends every rank.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from kvray.workers.protocol import StepInput, StepOutput, WorkerInfo
from kvray.workers.rank_group import group_info, group_output

logger = logging.getLogger(__name__)


# What each placement strategy kvray asks for means for a replica's bundles.
STRATEGIES = {
    "STRICT_PACK": "every bundle on one node (tensor-parallel ranks talk every layer)",
    "PACK": "a bundle a pipeline stage, its ranks on one node; stages on as few nodes as fit",
}


class PlacementError(RuntimeError):
    """Ray could not place a replica's ranks within the placement timeout."""


class _Remote:
    """`group.step.remote(x)`, as on an actor: starts the call now, returns an awaitable."""

    def __init__(self, start: Callable[..., Awaitable[Any]]) -> None:
        self.remote = start


class WorkerGroup:
    def __init__(
        self,
        replica_id: str,
        actors: list[Any],
        placement_group: Any,
        *,
        bundles: list[dict[str, float]],
        strategy: str,
        placement_timeout_s: float,
        output_rank: int = 0,
    ) -> None:
        """`actors`: one `WorkerActor` a rank (rank order), created with a deferred worker in
        `placement_group`'s bundles; `output_rank`: the rank whose step output is the
        replica's (`rank_group.output_rank`)."""
        self.replica_id = replica_id
        self.actors = actors
        self.output_rank = output_rank
        self.placement_group = placement_group
        self.bundles = bundles
        self.strategy = strategy
        self.placement_timeout_s = placement_timeout_s
        self.warmup = _Remote(lambda: _task(self._start()))
        self.step = _Remote(self._step)
        self.health = _Remote(lambda: _task(self._health()))

    async def _start(self) -> WorkerInfo:
        """Wait for the placement, join the ranks' group, load and warm up every rank.

        Raises:
            PlacementError: not placed within `placement_timeout_s` (naming what it asked for).
            Exception: what a rank raised while loading (a setting the model cannot run).
        """
        await self._placed()
        init_method = await self.actors[0].free_address.remote()
        logger.info(
            "%s: %d ranks placed; their group meets at %s",
            self.replica_id,
            len(self.actors),
            init_method,
        )
        await _all([a.join.remote(r, init_method) for r, a in enumerate(self.actors)])
        return group_info(await _all([a.warmup.remote() for a in self.actors]))

    async def _placed(self) -> None:
        try:
            await asyncio.wait_for(self.placement_group.ready(), self.placement_timeout_s)
        except asyncio.TimeoutError:
            raise PlacementError(
                f"{self.replica_id}: Ray could not place its {len(self.actors)} worker actors "
                f"within placement_timeout_s={self.placement_timeout_s:g}: it asked for "
                f"{len(self.bundles)} bundles of {self.bundles[0]} "
                f"({self.strategy}: {STRATEGIES.get(self.strategy, 'as Ray decides')}; "
                f"cpus_per_replica / gpus_per_replica a rank){_scheduling_state(self)}"
            ) from None

    def _step(self, step_input: StepInput) -> Awaitable[StepOutput]:
        # NOTE: every rank's call is sent now, in the step loop's order; each rank runs the
        # same step (their collectives meet), and the first failure ends the wait.
        refs = [actor.step.remote(step_input) for actor in self.actors]
        return _task(self._answer(refs))

    async def _answer(self, refs: list[Any]) -> StepOutput:
        return group_output(await _all(refs), output_rank=self.output_rank)

    async def _health(self) -> bool:
        return all(await _all([actor.health.remote() for actor in self.actors]))

    def kill(self) -> None:
        """End every rank and give back the placement group's resources."""
        import ray
        from ray.util import remove_placement_group

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                logger.debug("%s: a rank was gone already", self.replica_id)
        try:
            remove_placement_group(self.placement_group)
        except Exception:
            logger.debug("%s: its placement group was gone already", self.replica_id)


def _task(coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
    future = asyncio.ensure_future(coro)
    # A call still in flight when the replica is killed ends with an error nobody awaits.
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future


async def _all(calls: list[Any]) -> list[Any]:
    """Every call's result, in order; the first failure is raised as soon as it happens (the
    other ranks may be waiting in a collective for the one that failed)."""
    futures = [asyncio.ensure_future(call) for call in calls]
    await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
    failed = next((f for f in futures if f.done() and f.exception() is not None), None)
    if failed is not None:
        for future in futures:
            future.cancel()
        raise failed.exception()  # type: ignore[misc]
    return [future.result() for future in futures]


def _scheduling_state(group: WorkerGroup) -> str:
    """What Ray's scheduler says about the placement group (e.g. INFEASIBLE), if it says."""
    try:
        from ray.util import placement_group_table

        state = placement_group_table(group.placement_group)["stats"]["scheduling_state"]
    except Exception:
        return ""
    return f"; Ray's scheduler: {state}"
