"""A subscriber outside kvray follows every replica's prefix cache through the router's KV cache
events (a real ZMQ SUB socket on loopback, in-process fake actors, no Ray): what it rebuilds
equals what each replica's block manager holds, through evictions, a failure, a drain and
shutdown."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from typing import Any

import msgspec
import zmq

from kvray.cluster.kv_events import END_SEQ
from kvray.workers.fake import FakeWorker
from tests.local_router import GREEDY, LocalActor, LocalRouter, collect, expected, settle
from tests.unit.test_kv_events import DECODER, AllBlocksCleared, BlockRemoved, BlockStored

NUM_BLOCKS = 12  # of 4 tokens: two prompts of 17 tokens and their answers fill a replica


class Subscriber:
    """What an external router does with vLLM's events: read the live stream, fill gaps from
    the replay socket, and keep a set of cached block hashes per replica (`data_parallel_rank`)."""

    def __init__(self, endpoint: str, replay_endpoint: str) -> None:
        ctx = zmq.Context.instance()
        self.sub = ctx.socket(zmq.SUB)
        self.sub.connect(endpoint)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
        self.replay = ctx.socket(zmq.DEALER)
        self.replay.connect(replay_endpoint)
        self.cached: dict[int, set[int]] = defaultdict(set)
        self.topics: dict[int, bytes] = {}
        self.num_removed = 0
        self.num_cleared: Counter[int] = Counter()  # AllBlocksCleared per replica
        self.num_live = 0  # batches that came on the live stream (not replayed)
        self.payloads: list[bytes] = []  # every batch applied, in order
        self.next_seq = 0

    def catch_up(self, num_batches: int, *, replay: bool = True) -> None:
        """Apply batches until `num_batches` are in, from the live stream, and from the replay
        socket when the live stream has nothing (it misses what came before it subscribed)."""
        for _ in range(200):
            while self.next_seq < num_batches and self.sub.poll(50):
                topic, seq, payload = self.sub.recv_multipart()
                self.num_live += self._apply(int.from_bytes(seq, "big"), payload, topic, replay)
            if self.next_seq >= num_batches:
                return
            if replay:
                self._replay_from(self.next_seq)
        raise AssertionError(f"{self.next_seq} of {num_batches} batches arrived")

    def close(self) -> None:
        self.sub.close(linger=0)
        self.replay.close(linger=0)

    def _apply(self, seq: int, payload: bytes, topic: bytes | None, replay: bool) -> int:
        if seq > self.next_seq and replay:
            self._replay_from(self.next_seq)  # a gap: ask for what was missed
        if seq != self.next_seq:
            assert seq < self.next_seq, f"batch {self.next_seq} lost"
            return 0  # replayed already
        batch = DECODER.decode(payload)
        self.payloads.append(payload)
        rank = batch.data_parallel_rank
        assert rank is not None
        if topic is not None:
            assert self.topics.setdefault(rank, topic) == topic
        cached = self.cached[rank]
        for event in batch.events:
            if isinstance(event, BlockStored):
                assert len(event.token_ids) == len(event.block_hashes) * event.block_size
                cached.update(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                self.num_removed += len(event.block_hashes)
                cached.difference_update(event.block_hashes)
            else:
                assert isinstance(event, AllBlocksCleared)
                self.num_cleared[rank] += 1
                cached.clear()
        self.next_seq += 1
        return 1

    def _replay_from(self, first: int) -> None:
        self.replay.send_multipart((b"", first.to_bytes(8, "big")))
        while True:
            assert self.replay.poll(10_000), "no replay answer in 10 s"
            _, seq, payload = self.replay.recv_multipart()
            if seq == END_SEQ:
                return
            self._apply(int.from_bytes(seq, "big"), payload, None, replay=False)


class SmallCacheRouter(LocalRouter):
    """Replicas of NUM_BLOCKS blocks, so prefix-cache blocks get evicted."""

    def _spawn(self, replica_id: str) -> LocalActor:
        actor = super()._spawn(replica_id)
        actor.worker = FakeWorker(num_kv_blocks=NUM_BLOCKS, block_size=4)
        return actor


def held(replica: Any) -> set[int]:
    """The block hashes a replica's prefix cache holds."""
    return set(replica.engine.block_manager._cached)


def rank(replica: Any) -> int:
    return int(replica.replica_id.rpartition("-")[2])


async def run(router: Any, prompts: list[list[int]], tag: str) -> None:
    streams = [router.submit(p, GREEDY, request_id=f"{tag}{i}") for i, p in enumerate(prompts)]
    outputs = await asyncio.gather(*(collect(router, s) for s in streams))
    assert outputs == [expected(p) for p in prompts]


def prompts(first: int, count: int) -> list[list[int]]:
    """`count` prompts of 17 tokens; pairs share their first 8 (two blocks)."""
    return [[first + i // 2] * 8 + [first + 50 + i] * 9 for i in range(count)]


def test_a_subscriber_rebuilds_every_replicas_cached_blocks_through_evictions_failure_and_drain():
    async def main() -> None:
        local = SmallCacheRouter(
            kv_events_endpoint="tcp://127.0.0.1:*",
            kv_events_replay_endpoint="tcp://127.0.0.1:*",
        )
        router, publisher = local.router, local.router.pool.kv_events
        sub = Subscriber(publisher.endpoint, publisher.replay_endpoint)
        try:
            local.step_gate.set()
            first, second = await router.pool.launch(), await router.pool.launch()
            await run(router, prompts(1, 12), "a")

            sub.catch_up(publisher.num_batches)
            assert sub.num_removed > 0  # the small caches evicted blocks
            for replica in (first, second):
                assert held(replica) and sub.cached[rank(replica)] == held(replica)
                assert sub.topics[rank(replica)] == f"kv@{replica.replica_id}@tiny".encode()

            router.pool.fail(first, RuntimeError("the worker died"))  # a replacement starts
            await settle()
            (third,) = [r for r in router.pool.replicas.values() if r is not second]
            await run(router, prompts(30, 8), "b")

            sub.catch_up(publisher.num_batches)
            assert sub.num_cleared[rank(first)] == 2  # when it started, when it failed
            assert sub.cached[rank(first)] == set()
            for replica in (second, third):
                assert sub.cached[rank(replica)] == held(replica)

            await router.pool.drain(second, timeout_s=30)
            sub.catch_up(publisher.num_batches)
            assert sub.num_cleared[rank(second)] == 2 and sub.cached[rank(second)] == set()
            assert sub.cached[rank(third)] == held(third) != set()
            assert sub.num_live > 0  # the live stream carries them, not only the replay

            await router.shutdown()  # the last replica's cache goes too; queued batches are sent
            sub.catch_up(publisher.num_batches, replay=False)  # the replay socket is closed
            assert sub.num_cleared[rank(third)] == 2
            assert not any(sub.cached.values())
            assert publisher.num_dropped_batches == 0
        finally:
            sub.close()
            await router.shutdown()

    asyncio.run(main())


def test_events_are_off_by_default_and_the_block_managers_record_nothing():
    async def main() -> None:
        local = LocalRouter()
        router = local.router
        local.step_gate.set()
        replica = await router.pool.launch()
        await run(router, prompts(1, 2), "a")
        assert router.pool.kv_events is None
        assert replica.engine.block_manager.cache_events is None
        assert held(replica)
        await router.shutdown()

    asyncio.run(main())


def test_the_events_decode_as_plain_msgpack_too():
    """A consumer without vLLM's structs (Dynamo's and llm-d's are Rust and Go) reads arrays."""

    async def main() -> None:
        local = LocalRouter(
            kv_events_endpoint="tcp://127.0.0.1:*", kv_events_replay_endpoint="tcp://127.0.0.1:*"
        )
        router, publisher = local.router, local.router.pool.kv_events
        local.step_gate.set()
        await router.pool.launch()
        await run(router, prompts(1, 1), "a")
        sub = Subscriber(publisher.endpoint, publisher.replay_endpoint)
        sub.catch_up(publisher.num_batches)
        sub.close()
        await router.shutdown()
        assert msgspec.msgpack.decode(sub.payloads[0])[1] == [["AllBlocksCleared"]]  # it starts
        ts, events, dp_rank = msgspec.msgpack.decode(sub.payloads[1])
        assert isinstance(ts, float) and dp_rank == 0
        tag, hashes, parent, tokens, block_size, lora_id, medium = events[0]
        assert (tag, parent, block_size, lora_id, medium) == ("BlockStored", None, 4, None, "GPU")
        assert tokens == prompts(1, 1)[0][: 4 * len(hashes)]

    asyncio.run(main())
