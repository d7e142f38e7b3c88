"""KV cache events: what the block manager records, vLLM's wire format, and the publisher's
frames, replay and drops (a real ZMQ socket on loopback; no router)."""

from __future__ import annotations

import queue
import sys
from typing import Any

import msgspec
import pytest
import zmq

from kvray.cluster.block_manager import BlockManager, EvictedBlock, StoredBlock
from kvray.cluster.config import ClusterConfig
from kvray.cluster.kv_events import ALL_CLEARED, END_SEQ, KvEventPublisher, make_batch
from kvray.cluster.sequence import Sequence, next_seq_id
from kvray.workers.protocol import SamplingParams
from tests.helpers import drive
from tests.local_router import LocalRouter
from tests.unit.test_scheduler import make

# ---------------------------------------------------------------------- vLLM's side of the wire
# The consumer's structs, as vLLM 0.11's example subscriber declares them
# (examples/online_serving/kv_events_subscriber.py): an llm-d or Dynamo subscriber decodes these.


class VllmEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class VllmEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(VllmEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class BlockRemoved(VllmEvent):
    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(VllmEvent):
    pass


class VllmKVEventBatch(VllmEventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


DECODER = msgspec.msgpack.Decoder(VllmKVEventBatch)


def replay(events: list[Any]) -> set[int]:
    """The cached hashes a consumer rebuilds from the events."""
    cached: set[int] = set()
    for event in events:
        if isinstance(event, StoredBlock):
            cached.add(event.block_hash)
        else:
            cached.discard(event.block_hash)
    return cached


def compute(blocks: BlockManager, tokens: list[int]) -> Sequence:
    """A sequence whose prompt has been computed (blocks allocated, full ones cached)."""
    seq = Sequence(next_seq_id(), "r", tokens, SamplingParams())
    blocks.allocate(seq, len(tokens))
    seq.num_computed_tokens = len(tokens)
    blocks.cache_full_blocks(seq)
    return seq


# ---------------------------------------------------------------------- the block manager's record


def test_the_block_manager_records_nothing_unless_asked():
    blocks = BlockManager(4, 2)
    blocks.free(compute(blocks, [1, 2, 3, 4]))
    assert blocks.cache_events is None
    assert len(blocks._cached) == 2


def stored_then_evicted() -> tuple[BlockManager, list[int], list[int]]:
    """Two blocks cached, then both evicted by a sequence that takes every block: the manager
    (recording) and the two sequences' block hashes."""
    blocks = BlockManager(4, 2)
    blocks.cache_events = []
    first = compute(blocks, [1, 2, 3, 4])
    first_hashes = list(first.block_hashes)  # (freeing clears them)
    blocks.free(first)
    second = compute(blocks, [5, 6, 7, 8, 9, 10, 11, 12])
    return blocks, first_hashes, second.block_hashes


def test_stored_and_evicted_hashes_are_recorded_in_order():
    blocks, (h1, h2), (g1, g2, g3, g4) = stored_then_evicted()

    assert blocks.cache_events == [
        StoredBlock(h1, None, (1, 2)),
        StoredBlock(h2, h1, (3, 4)),
        EvictedBlock(h2),  # freed tail first, so evicted tail first
        EvictedBlock(h1),
        StoredBlock(g1, None, (5, 6)),
        StoredBlock(g2, g1, (7, 8)),
        StoredBlock(g3, g2, (9, 10)),
        StoredBlock(g4, g3, (11, 12)),
    ]
    assert replay(blocks.cache_events) == set(blocks._cached)


def test_a_hash_another_block_holds_already_is_not_stored_again():
    blocks = BlockManager(8, 2)
    blocks.cache_events = []
    one = compute(blocks, [1, 2, 3, 4])
    blocks.cache_events.clear()
    two = compute(blocks, [1, 2, 3, 4, 5, 6])  # computed again, as if both ran at once
    assert two.block_hashes[:2] == one.block_hashes
    assert blocks.cache_events == [StoredBlock(two.block_hashes[2], one.block_hashes[1], (5, 6))]


@pytest.mark.parametrize("pipelined", [False, True])
def test_events_replay_to_the_cached_hashes_through_preemption_samples_and_beams(pipelined):
    engine, worker = make(num_kv_blocks=24, max_model_len=96)
    blocks = engine.block_manager
    blocks.cache_events = []
    engine.add_request(list(range(1, 40)), SamplingParams(temperature=0, max_tokens=30))
    engine.add_request(list(range(1, 20)) + [99] * 9, SamplingParams(n=3, max_tokens=12, seed=1))
    engine.add_request([7] * 13, SamplingParams(n=2, best_of=3, max_tokens=10, seed=2))
    engine.add_request(list(range(50, 67)), SamplingParams(num_beams=3, n=2, max_tokens=8))
    drive(engine, worker, pipelined=pipelined)

    assert engine.scheduler.num_preemptions > 0
    assert any(isinstance(e, EvictedBlock) for e in blocks.cache_events)
    assert replay(blocks.cache_events) == set(blocks._cached)
    assert blocks._cached


# ---------------------------------------------------------------------- the wire


def test_a_batch_is_vllm_0_11_msgpack_arrays_with_a_tag_first():
    blocks, (h1, h2), second_hashes = stored_then_evicted()
    batch = make_batch([*blocks.cache_events, ALL_CLEARED], block_size=2, rank=3, ts=1.5)

    raw = msgspec.msgpack.decode(msgspec.msgpack.encode(batch))

    assert raw == [
        1.5,
        [
            # a chain of stored blocks: one event, as vLLM stores a request's new blocks
            ["BlockStored", [h1, h2], None, [1, 2, 3, 4], 2, None, "GPU"],
            ["BlockRemoved", [h2, h1], "GPU"],  # consecutive evictions: one event
            ["BlockStored", second_hashes, None, list(range(5, 13)), 2, None, "GPU"],
            ["AllBlocksCleared"],
        ],
        3,  # data_parallel_rank: the replica's index
    ]
    assert all(-(2**63) <= h < 2**63 for h in (h1, h2))  # 64-bit ints, as the router hashes them


def test_vllms_own_decoder_reads_the_batch_into_its_structs():
    batch = make_batch(
        [
            StoredBlock(11, 10, (1, 2)),
            StoredBlock(-12, 11, (3, 4)),
            StoredBlock(13, 10, (5, 6)),  # not the chain's next: an event of its own
            EvictedBlock(9),
            ALL_CLEARED,
        ],
        block_size=2,
        rank=0,
        ts=2.0,
    )
    decoded = DECODER.decode(msgspec.msgpack.encode(batch))
    assert decoded.data_parallel_rank == 0  # rank 0 is sent, not omitted as a default
    stored, other, removed, cleared = decoded.events
    assert stored == BlockStored([11, -12], 10, [1, 2, 3, 4], 2, None, "GPU")
    assert other == BlockStored([13], 10, [5, 6], 2, None, "GPU")
    assert removed == BlockRemoved([9], "GPU")
    assert isinstance(cleared, AllBlocksCleared)


# ---------------------------------------------------------------------- the publisher


@pytest.fixture
def publisher():
    pub = KvEventPublisher(
        "tcp://127.0.0.1:*",
        topic="kv@{replica_id}@{model}",
        model="m",
        replay_endpoint="tcp://127.0.0.1:*",
    )
    yield pub
    pub.close()


def ask_replay(endpoint: str, first: int) -> list[tuple[int, bytes]]:
    """vLLM's replay protocol, as a subscriber speaks it: the batches from `first` on."""
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.DEALER) as sock:
        sock.connect(endpoint)
        sock.send_multipart((b"", first.to_bytes(8, "big")))
        out = []
        while True:
            assert sock.poll(10_000), "no replay answer in 10 s"
            empty, seq, payload = sock.recv_multipart()
            assert empty == b""
            if seq == END_SEQ:
                return out
            out.append((int.from_bytes(seq, "big"), payload))


def test_batches_are_numbered_and_replayed_from_a_sequence_number(publisher):
    blocks = BlockManager(8, 2)
    stream = publisher.attach("replica-7", 7, blocks)
    for tokens in ([1, 2, 3], [4, 5, 6], [7, 8, 9]):
        blocks.free(compute(blocks, tokens))
        stream.flush()
    stream.flush()  # nothing recorded since: no batch
    assert publisher.num_batches == 4  # AllBlocksCleared when it was attached, then 3

    everything = _replay_until(publisher, 0, count=4)
    replayed = _replay_until(publisher, 2, count=2)

    assert [seq for seq, _ in everything] == [0, 1, 2, 3]
    assert [seq for seq, _ in replayed] == [2, 3]
    assert replayed == everything[2:]
    batches = [DECODER.decode(payload) for _, payload in everything]
    assert [[type(e) for e in b.events] for b in batches] == [[AllBlocksCleared]] + [
        [BlockStored]
    ] * 3
    assert {b.data_parallel_rank for b in batches} == {7}
    assert stream.topic == b"kv@replica-7@m"


def _replay_until(publisher: KvEventPublisher, first: int, *, count: int) -> list:
    """Replay from `first` until `count` batches are back (the thread sends them soon)."""
    for _ in range(100):
        replayed = ask_replay(publisher.replay_endpoint, first)
        if len(replayed) >= count:
            return replayed
    raise AssertionError(f"fewer than {count} batches replayed")


def test_a_subscriber_gets_topic_sequence_number_and_payload_frames(publisher):
    blocks = BlockManager(64, 2)
    stream = publisher.attach("replica-0", 0, blocks)
    with zmq.Context.instance().socket(zmq.SUB) as sub:
        sub.connect(publisher.endpoint)
        sub.setsockopt(zmq.SUBSCRIBE, b"kv@replica-0@")
        frames = None
        for i in range(100):  # PUB drops what it sends before the subscription arrives
            blocks.free(compute(blocks, [i, i, i]))
            stream.flush()
            if sub.poll(100):
                frames = sub.recv_multipart()
                break
    assert frames is not None, "no batch reached the subscriber"
    topic, seq, payload = frames
    assert topic == b"kv@replica-0@m"
    assert len(seq) == 8 and int.from_bytes(seq, "big") < publisher.num_batches
    assert DECODER.decode(payload).data_parallel_rank == 0


def test_a_full_queue_drops_the_batch_counts_it_and_leaves_a_gap(publisher, monkeypatch):
    blocks = BlockManager(8, 2)
    stream = publisher.attach("replica-0", 0, blocks)

    def full(item: Any) -> None:
        raise queue.Full

    monkeypatch.setattr(publisher._queue, "put_nowait", full)
    blocks.free(compute(blocks, [1, 2, 3]))
    stream.flush()  # returns at once: the router's loop never waits
    monkeypatch.undo()
    blocks.free(compute(blocks, [4, 5, 6]))
    stream.flush()

    assert publisher.num_dropped_batches == 1
    assert [seq for seq, _ in _replay_until(publisher, 0, count=2)] == [0, 2]  # 1 never sent


def test_a_replica_is_cleared_when_it_starts_and_when_it_goes_away_then_records_nothing(
    publisher,
):
    blocks = BlockManager(8, 2)
    stream = publisher.attach("replica-0", 0, blocks)  # a previous router's replica-0 is gone
    stream.clear()
    blocks.free(compute(blocks, [1, 2, 3]))
    assert blocks.cache_events is None
    replayed = _replay_until(publisher, 0, count=2)
    assert len(replayed) == 2
    for _, payload in replayed:
        assert [type(e) for e in DECODER.decode(payload).events] == [AllBlocksCleared]


def test_close_past_its_timeout_still_stops_the_thread_before_closing_the_sockets():
    publisher = KvEventPublisher("tcp://127.0.0.1:*")
    blocks = BlockManager(64, 2)
    stream = publisher.attach("replica-0", 0, blocks)
    for i in range(50):
        blocks.free(compute(blocks, [i, i, i]))
        stream.flush()
    publisher.close(timeout_s=0)  # no time to send: the rest is dropped
    assert not publisher._thread.is_alive()
    assert publisher._pub.closed and publisher._ctx.closed


# ---------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ({"kv_events_endpoint": "localhost:5557"}, "must start with tcp://"),
        ({"kv_events_replay_endpoint": "tcp://*:5558"}, "needs kv_events_endpoint"),
        ({"kv_events_endpoint": "tcp://*:5557", "kv_events_topic": "{pod}"}, "may name only"),
        ({"kv_events_endpoint": "tcp://*:5557", "kv_events_buffer_steps": 0}, ">= 1"),
    ],
)
def test_bad_kv_event_settings_are_refused(settings, error):
    with pytest.raises(ValueError, match=error):
        ClusterConfig(**settings)


def test_events_without_the_extra_fail_at_start_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "zmq", None)  # `import zmq` fails
    monkeypatch.delitem(sys.modules, "kvray.cluster.kv_events", raising=False)
    with pytest.raises(ValueError, match=r"zmq is not installed: pip install 'kvray\[kv-events\]'"):
        LocalRouter(kv_events_endpoint="tcp://127.0.0.1:*")


def test_an_endpoint_that_cannot_be_bound_fails_at_start(publisher):
    with pytest.raises(OSError, match="KV cache events"):
        KvEventPublisher("tcp://127.0.0.1:*", replay_endpoint=publisher.replay_endpoint)  # taken
