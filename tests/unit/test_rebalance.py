"""Rebalancing queued requests between replicas (router with in-process fake actors, no Ray).

The actors' steps wait on a gate, so a test can look at the queues before anything runs.
"""

from __future__ import annotations

import asyncio

from kvray.cluster.stats import ReplicaState
from tests.local_router import GREEDY, LocalRouter, collect, expected, queue_of, settle


def test_a_replica_that_becomes_ready_takes_a_share_of_the_queue_in_arrival_order():
    async def main() -> None:
        local = LocalRouter()
        router, gate = local.router, local.step_gate
        first = await router.pool.launch()
        prompts = [[i + 1, i + 2, i + 3] for i in range(20)]
        streams = [router.submit(p, GREEDY, request_id=f"r{i:02d}") for i, p in enumerate(prompts)]
        await settle()  # the first step (2 sequences) is in flight, 18 are queued
        assert first.engine.scheduler.num_running == 2
        assert len(queue_of(first)) == 18

        second = await router.pool.launch()  # ready: takes its share of the queue

        kept, taken = queue_of(first), queue_of(second)
        assert sorted(kept + taken) == [f"r{i:02d}" for i in range(2, 20)]
        assert 8 <= len(taken) <= 10  # about half, as the router counts work (see `load`)
        budget = first.engine.scheduler.config.max_num_batched_tokens
        load = [r.stats().load[0] for r in (first, second)]
        assert abs(load[0] - load[1]) * budget <= 3  # within one 3-token prompt
        # Dealt oldest first: the second replica's queue starts near the head of the old one,
        # not only with the newest requests, and each queue stays in arrival order.
        assert taken[0] < "r05" and taken == sorted(taken) and kept == sorted(kept)
        assert router.dispatcher.num_rebalanced_requests == len(taken)
        assert all(router._streams[r].replica_id == second.replica_id for r in taken)

        gate.set()
        outputs = await asyncio.gather(*(collect(router, s) for s in streams))
        assert outputs == [expected(p) for p in prompts]
        for replica in (first, second):
            assert not replica.engine.has_unfinished()
            blocks = replica.engine.block_manager
            assert blocks.num_free_blocks == blocks.num_blocks
        assert second.engine.num_finished_requests == len(taken)
        await router.shutdown()

    asyncio.run(main())


def test_a_draining_replica_hands_its_queue_over_at_once_and_keeps_its_running_requests():
    async def main() -> None:
        local = LocalRouter()
        router, gate = local.router, local.step_gate
        first = await router.pool.launch()
        second = await router.pool.launch()
        prompts = [[7, i + 1] for i in range(10)]
        streams = [router.submit(p, GREEDY, request_id=f"r{i}") for i, p in enumerate(prompts)]
        await settle()
        running = {r.request_id for r in first.engine.scheduler.running}
        assert len(running) == 2 and queue_of(first)

        drain = asyncio.ensure_future(router.pool.drain(first, timeout_s=30))
        await asyncio.sleep(0)  # the drain starts: queued requests leave before any step runs
        assert first.state is ReplicaState.DRAINING
        assert queue_of(first) == []
        assert {r.request_id for r in first.engine.scheduler.running} == running
        others = {f"r{i}" for i in range(10)} - running
        assert {router._streams[r].replica_id for r in others} == {second.replica_id}

        gate.set()
        outputs = await asyncio.gather(*(collect(router, s) for s in streams))
        assert outputs == [expected(p) for p in prompts]
        await drain
        assert first.replica_id not in router.pool.replicas
        assert first.engine.num_finished_requests == len(running)  # they finished where they ran
        assert router.dispatcher.num_moved_requests == 0  # nothing needed a recompute
        await router.shutdown()

    asyncio.run(main())


def test_balanced_replicas_keep_their_queues():
    async def main() -> None:
        local = LocalRouter()
        router = local.router
        replicas = [await router.pool.launch() for _ in range(2)]
        for i in range(12):
            router.submit([3, i + 1], GREEDY, request_id=f"r{i:02d}")
        await settle()
        before = [queue_of(r) for r in replicas]
        assert all(before)
        assert router.dispatcher.rebalance() == 0
        assert [queue_of(r) for r in replicas] == before
        aborted = before[1][0]
        router.abort(router._streams[aborted])  # requests stay abortable where they are
        assert aborted not in queue_of(replicas[1])
        await router.shutdown()

    asyncio.run(main())
