"""Replica lifecycle in the router (in-process fake actors, no Ray, no wall clock): scale-down
while replicas start, a failure during a drain, and how long a request may wait for a replica."""

from __future__ import annotations

import asyncio

import pytest

from kvray.cluster.autoscaling_policy import AutoscalingConfig, ScalingDecision
from kvray.cluster.errors import UnavailableError
from kvray.cluster.stats import ReplicaState
from tests.local_router import GREEDY, LocalRouter, ManualClock, collect, expected, settle


def test_scale_down_cancels_a_starting_replica_before_draining_a_ready_one():
    async def main() -> None:
        local = LocalRouter(autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=3))
        router = local.router
        ready = await router.pool.launch()
        local.warmup_gate = asyncio.Event()  # the next replica waits for a node, say
        launch = asyncio.ensure_future(router.pool.launch())
        await settle()
        assert [r.state for r in router.pool.replicas.values()] == [
            ReplicaState.READY,
            ReplicaState.STARTING,
        ]

        router.autoscaler.apply(ScalingDecision(0.0, 2, 1, "load went away"))

        assert list(router.pool.replicas) == [ready.replica_id]
        assert ready.state is ReplicaState.READY  # not drained: it was the one doing the work
        assert local.actors[1].killed.is_set()
        with pytest.raises(UnavailableError, match="cancelled while starting"):
            await launch
        await router.shutdown()

    asyncio.run(main())


def test_a_draining_replica_that_fails_is_not_replaced_and_its_requests_finish_elsewhere():
    async def main() -> None:
        local = LocalRouter()
        router = local.router
        first = await router.pool.launch()
        second = await router.pool.launch()
        prompts = [[5, i + 1] for i in range(4)]
        streams = [router.submit(p, GREEDY, request_id=f"r{i}") for i, p in enumerate(prompts)]
        await settle()
        assert first.engine.scheduler.num_running == 2

        drain = asyncio.ensure_future(router.pool.drain(first, timeout_s=30))
        await asyncio.sleep(0)
        local.actors[0].fail = True  # its next step raises: the worker died mid-drain
        local.step_gate.set()
        outputs = await asyncio.gather(*(collect(router, s) for s in streams))
        await drain

        assert outputs == [expected(p) for p in prompts]  # continued on the other replica
        assert router.dispatcher.num_moved_requests == 2
        assert list(router.pool.replicas) == [second.replica_id]  # the scale-down stands
        assert len(local.actors) == 2  # no replacement was started
        await router.shutdown()

    asyncio.run(main())


def test_the_wait_for_a_replica_is_timed_from_when_it_began_not_from_arrival():
    async def main() -> None:
        clock = ManualClock()
        local = LocalRouter(clock=clock, autoscaling=AutoscalingConfig(cold_start_timeout_s=0.5))
        router = local.router
        await router.pool.launch()
        stream = router.submit([3, 4], GREEDY, request_id="old")
        clock.advance(0.6)  # older than the timeout, but it was running all along

        local.warmup_gate = asyncio.Event()  # the replacement replica will take a while
        local.actors[0].fail = True
        local.step_gate.set()
        await settle()
        assert router.dispatcher.num_unassigned == 1
        assert [r.state for r in router.pool.replicas.values()] == [ReplicaState.STARTING]

        clock.advance(0.45)
        router.dispatcher.expire(clock())
        assert (
            router.dispatcher.num_unassigned == 1
        )  # it has waited 0.45 s for a replica, not 1.05 s

        clock.advance(0.1)
        router.dispatcher.expire(clock())
        assert router.dispatcher.num_unassigned == 0
        with pytest.raises(UnavailableError, match="no replica became ready within"):
            await collect(router, stream)
        await router.shutdown()

    asyncio.run(main())


def test_a_replica_that_finished_draining_is_not_replaced_when_a_late_ping_fails():
    async def main() -> None:
        local = LocalRouter()
        router = local.router
        first = await router.pool.launch()
        await router.pool.launch()
        await router.pool.drain(first, timeout_s=0)  # stopped and killed
        router.pool.fail(first, RuntimeError("the health ping reached a killed actor"))
        assert len(local.actors) == 2  # no replacement for a replica the autoscaler removed
        assert len(router.pool.replicas) == 1
        await router.shutdown()

    asyncio.run(main())


def test_a_replacement_that_cannot_be_created_fails_the_moved_requests_at_once():
    async def main() -> None:
        local = LocalRouter()
        router = local.router
        serving: list[bool] = []
        router.on_serving_change = serving.append
        await router.pool.launch()
        assert serving == [True]
        stream = router.submit([3, 4], GREEDY, request_id="r")

        def unreachable(replica_id: str) -> None:
            raise ConnectionError("the Ray cluster is unreachable")

        router.pool._spawn_actor = unreachable
        local.actors[0].fail = True
        local.step_gate.set()
        with pytest.raises(UnavailableError, match="no healthy replica"):
            await collect(router, stream)  # not left waiting for cold_start_timeout_s
        assert serving == [True, False]
        await router.shutdown()

    asyncio.run(main())
