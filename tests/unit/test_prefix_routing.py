"""Cache-aware routing through the router (in-process fake actors, no Ray): what each replica
holds for a prompt, where new, next-turn, rebalanced and failed-over requests land, and what
the router counts. The fake worker's blocks hold 4 tokens."""

from __future__ import annotations

import asyncio

import pytest

from kvray.cluster.block_manager import prefix_hashes
from kvray.cluster.stats import ReplicaState
from kvray.workers.protocol import SamplingParams
from tests.local_router import GREEDY, LocalRouter, collect, expected, settle

BLOCK = 4
SYSTEM = list(range(100, 132))  # a 32-token shared prefix: 8 blocks


def test_prefix_hashes_cover_the_full_blocks_before_the_last_token():
    assert len(prefix_hashes(list(range(8)), BLOCK)) == 1  # the last token's block is computed
    assert len(prefix_hashes(list(range(9)), BLOCK)) == 2
    a, b = prefix_hashes([*SYSTEM, 1, 2], BLOCK), prefix_hashes([*SYSTEM, 7, 8, 9, 10, 11], BLOCK)
    assert a == b[:8] and len(b) == 9  # chained: equal prefixes, equal hashes
    assert prefix_hashes([0, *SYSTEM[1:], 1], BLOCK)[1] != a[1]  # a different first block


def test_a_replica_holds_the_prompt_blocks_it_cached_and_those_a_queued_request_brings():
    async def main() -> None:
        local = LocalRouter()
        router = local.router
        first = await router.pool.launch()
        question = prefix_hashes([*SYSTEM, 1, 2, 3, 4, 5], BLOCK)  # 9 full blocks
        stream = router.submit([*SYSTEM, 9, 9], GREEDY, request_id="a")
        await settle()
        # Queued, not computed: its 8 system blocks count as coming; its own tail does not.
        assert first.engine.block_manager.num_cached_blocks(question) == 0
        assert first.engine.num_prefix_blocks(question) == 8
        local.step_gate.set()
        await collect(router, stream)
        assert first.engine.block_manager.num_cached_blocks(question) == 8  # cached now
        assert first.engine.num_prefix_blocks(question) == 8
        await router.shutdown()

    asyncio.run(main())


@pytest.mark.parametrize(("routing", "lands_on"), [("cache-aware", 0), ("least-loaded", 1)])
def test_a_burst_sharing_a_prefix_follows_the_first_request_that_brings_it(routing, lands_on):
    async def main() -> None:
        local = LocalRouter(routing=routing)
        router = local.router
        replicas = [await router.pool.launch(), await router.pool.launch()]
        router.submit([*SYSTEM, 1, 1], GREEDY, request_id="first")  # to replica 0 (a tie)
        await settle()  # nothing computed yet: the steps wait on the gate
        router.submit([*SYSTEM, 2, 2], GREEDY, request_id="second")
        await settle()
        assert router._streams["second"].replica_id == replicas[lands_on].replica_id
        decisions = router.dispatcher.num_routing_decisions
        assert decisions["prefix" if routing == "cache-aware" else "load"] >= 1
        await router.shutdown()

    asyncio.run(main())


def test_a_queued_request_counts_only_the_tokens_it_will_compute_so_a_burst_stays_together():
    async def main() -> None:
        local = LocalRouter(max_num_seqs=1)  # one running: the rest of the burst queues
        router = local.router
        replicas = [await router.pool.launch(), await router.pool.launch()]
        for i in range(6):
            router.submit([*SYSTEM, i, i], GREEDY, request_id=f"q{i}")
            await settle()
        placed = {router._streams[f"q{i}"].replica_id for i in range(6)}
        assert placed == {replicas[0].replica_id}
        # Five queued behind the first, each 2 tokens of work past the 32 held for it.
        assert replicas[0].stats().num_queued_tokens == 5 * 2
        local.step_gate.set()
        for i in range(6):
            await collect(router, router._streams[f"q{i}"])
        assert replicas[0].stats().num_queued_tokens == 0
        await router.shutdown()

    asyncio.run(main())


def test_the_next_turn_of_a_conversation_lands_where_its_history_is_cached():
    async def main() -> None:
        local = LocalRouter()
        router = local.router
        replicas = [await router.pool.launch(), await router.pool.launch()]
        filler = router.submit([50, 51, 52], GREEDY, request_id="filler")  # replica 0
        await settle()
        turn_1 = [*SYSTEM, 7, 7, 7]
        first = router.submit(turn_1, GREEDY, request_id="turn-1")  # replica 1: less work
        await settle()
        assert router._streams["turn-1"].replica_id == replicas[1].replica_id
        local.step_gate.set()
        answer = await collect(router, first)
        await collect(router, filler)
        # Both idle now; only replica 1 holds the conversation (prompt and answer blocks).
        turn_2 = [*turn_1, *answer, 3, 3, 3, 3, 3]
        stream = router.submit(turn_2, GREEDY, request_id="turn-2")
        assert router._streams["turn-2"].replica_id == replicas[1].replica_id
        assert await collect(router, stream) == expected(turn_2)
        blocks = replicas[1].engine.block_manager
        assert blocks.num_prefix_hits >= len(turn_1) // BLOCK * BLOCK  # served from the cache
        assert router.dispatcher.num_routing_decisions["prefix"] >= 1
        await router.shutdown()

    asyncio.run(main())


def test_n_samples_and_a_beam_search_land_as_one_request_where_their_prefix_is():
    async def main() -> None:
        local = LocalRouter(max_num_seqs=8)
        router = local.router
        replicas = [await router.pool.launch(), await router.pool.launch()]
        filler = router.submit([60, 61, 62, 63, 64], GREEDY, request_id="filler")  # replica 0
        await settle()
        seed = router.submit([*SYSTEM, 1], GREEDY, request_id="seed")  # replica 1
        await settle()
        sampled = SamplingParams(n=3, seed=4, max_tokens=4, temperature=1.0)
        samples = router.submit([*SYSTEM, 2, 2], sampled, request_id="samples")
        assert router._streams["samples"].replica_id == replicas[1].replica_id
        local.step_gate.set()
        for stream in (filler, seed, samples):
            await collect(router, stream)
        beams = router.submit([*SYSTEM, 3, 3], SamplingParams(num_beams=2, n=2, max_tokens=4))
        assert beams.replica_id == replicas[1].replica_id  # both idle: the cache decides
        await collect(router, beams)
        await router.shutdown()

    asyncio.run(main())


@pytest.mark.parametrize(("routing", "to_holder"), [("cache-aware", True), ("least-loaded", False)])
def test_a_failed_over_request_lands_on_the_replica_holding_its_prefix(routing, to_holder):
    async def main() -> None:
        local = LocalRouter(routing=routing, rebalance_period_s=0)  # no moves but failover's
        router = local.router
        holder = await router.pool.launch()
        local.step_gate.set()
        await collect(router, router.submit([*SYSTEM, 5], GREEDY, request_id="warm"))
        gates = [asyncio.Event() for _ in range(3)]  # from here each replica steps when told
        local.actors[0].step_gate = gates[0]
        # (Sized so that the holder's 64 blocks keep the system prompt cached throughout.)
        long = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        for i in range(3):  # the holder is the only replica yet
            router.submit([80 + i] * 40, long, request_id=f"long-{i}")
        await settle()  # two run (max_num_seqs), one waits: 40 tokens queued
        local.step_gate = gates[1]
        victim = await router.pool.launch()
        local.step_gate = gates[2]
        other = await router.pool.launch()
        prompt = [*SYSTEM, 8, 8, 8]
        stream = router.submit(prompt, GREEDY, request_id="moved")
        # The holder is 42 tokens busier: more than the 32 its cache saves.
        assert router._streams["moved"].replica_id == victim.replica_id
        gates[0].set()  # the holder runs until its queue is empty: a decode or two of work left
        while holder.engine.scheduler.num_waiting:
            await asyncio.sleep(0)
        gates[0].clear()
        assert holder.stats().work_tokens >= 1 and other.stats().work_tokens == 0
        local.actors[1].fail = True  # the victim's next step raises: the worker died
        gates[1].set()
        await settle()
        assert victim.state is ReplicaState.DEAD
        expected_replica = holder if to_holder else other
        assert router._streams["moved"].replica_id == expected_replica.replica_id
        for gate in gates:
            gate.set()
        assert await collect(router, stream) == expected(prompt)
        await router.shutdown()

    asyncio.run(main())
