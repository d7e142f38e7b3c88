"""KV cache events in vLLM's wire format, so routers outside kvray (llm-d's precise prefix-cache
scorer, Dynamo's KV router) can follow every replica's prefix cache. Publishing only: it never
changes a cache, and the router's event loop never waits on it. Needs the `kv-events` extra.

The format is vLLM 0.11's (`vllm/distributed/kv_events.py` as of v0.11.2): msgspec structs
encoded as msgpack arrays (`array_like=True`); an event is a tagged union whose first element
is its class name; a ZMQ message is three frames (topic, sequence number as 8 big-endian bytes,
payload); a ROUTER socket replays buffered batches from a sequence number. Later vLLM versions
append optional fields (`lora_name`, ...); consumers read these without them. Block hashes are
the router's own (`block_manager.prefix_hashes`: Python's 64-bit `hash` of (parent, tokens)),
signed, as vLLM sent its builtin-hash keys; Dynamo and llm-d read signed and unsigned alike.

Which replica: one PUB socket per router, as one vLLM engine with data parallelism has one per
rank. A batch carries its replica's index (`replica-3` -> 3) as `data_parallel_rank`, which
Dynamo keys its per-rank caches by, and its replica id in the topic (`kv_events_topic`, by
default llm-d's `kv@<pod>@<model>` convention), so topic-keyed consumers tell replicas apart
too. Not one endpoint per replica (vLLM's port + rank): replacements get new ids, so ports
would keep growing.

Off the hot path: the router's loop only puts a batch on a bounded queue (`put_nowait`); a
thread encodes, sends and keeps the replay buffer. A batch that finds the queue full is dropped
and counted, and its sequence number stays unused, so subscribers see the gap.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from typing import Any

import msgspec
import zmq

from kvray.cluster.block_manager import BlockManager, EvictedBlock, StoredBlock
from kvray.cluster.config import ClusterConfig

logger = logging.getLogger(__name__)

# vLLM's ZmqEventPublisher defaults
HWM = 100_000  # messages the PUB socket holds per subscriber before it drops
MAX_QUEUE_SIZE = 100_000  # batches waiting for the publisher thread
POLL_S = 0.1  # the thread checks the replay socket (and for shutdown) this often
SHUTDOWN_TIMEOUT_S = 1.0
LINGER_MS = 1_000  # on close, how long sent messages may still go out
END_SEQ = (-1).to_bytes(8, "big", signed=True)  # ends a replay
MEDIUM_GPU = "GPU"  # vLLM's name for an engine's own KV cache (offloaded tiers are "CPU", ...)

# ---------------------------------------------------------------------- vLLM's structs (0.11)


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float  # wall-clock seconds when the batch was queued
    events: list[Any]
    data_parallel_rank: int | None = None  # kvray: the replica's index


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Base class for all KV cache-related events (the tag is the class name)."""


class BlockStored(KVCacheEvent):
    block_hashes: list[int]  # a chain: each block's parent is the one before it
    parent_block_hash: int | None  # the first block's parent; None: it starts a prompt
    token_ids: list[int]  # block_size tokens per block
    block_size: int
    lora_id: int | None  # kvray: always None (no LoRA)
    medium: str | None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


ALL_CLEARED = AllBlocksCleared()


def make_batch(
    events: list[StoredBlock | EvictedBlock | AllBlocksCleared],
    *,
    block_size: int,
    rank: int,
    ts: float,
) -> KVEventBatch:
    """A batch of vLLM events from a block manager's `cache_events`: a stored block that
    continues the chain of the one before it joins its `BlockStored` (as vLLM stores a
    request's new blocks), consecutive evictions share one `BlockRemoved`."""
    out: list[BlockStored | BlockRemoved | AllBlocksCleared] = []
    for event in events:
        if isinstance(event, StoredBlock):
            last = out[-1] if out else None
            if isinstance(last, BlockStored) and last.block_hashes[-1] == event.parent_block_hash:
                last.block_hashes.append(event.block_hash)
                last.token_ids.extend(event.token_ids)
            else:
                out.append(
                    BlockStored(
                        [event.block_hash],
                        event.parent_block_hash,
                        list(event.token_ids),
                        block_size,
                        None,
                        MEDIUM_GPU,
                    )
                )
        elif isinstance(event, EvictedBlock):
            if out and isinstance(out[-1], BlockRemoved):
                out[-1].block_hashes.append(event.block_hash)
            else:
                out.append(BlockRemoved([event.block_hash], MEDIUM_GPU))
        else:
            out.append(event)
    return KVEventBatch(ts=ts, events=out, data_parallel_rank=rank)


# ---------------------------------------------------------------------- publishing


class ReplicaKvEvents:
    """One replica's side of the publisher: its block manager records the changes to its prefix
    cache, `flush` sends them as one batch (after each step), `clear` says the cache is gone."""

    def __init__(
        self, publisher: KvEventPublisher, blocks: BlockManager, *, topic: bytes, rank: int
    ) -> None:
        self._publisher = publisher
        self._blocks = blocks
        self.topic = topic
        self.rank = rank
        blocks.cache_events = []

    def flush(self) -> None:
        """Publish what the block manager recorded since the last flush (nothing: no batch)."""
        events = self._blocks.cache_events
        if events:
            self._blocks.cache_events = []
            self._publisher.publish(self.topic, self.rank, self._blocks.block_size, events)

    def clear(self) -> None:
        """The replica stopped or died: publish `AllBlocksCleared` and record nothing more."""
        self._blocks.cache_events = None
        self._publisher.publish(self.topic, self.rank, self._blocks.block_size, [ALL_CLEARED])


class KvEventPublisher:
    """vLLM's ZmqEventPublisher for the router's replicas: a PUB socket, an optional ROUTER
    replay socket, and the thread that serves both.

    `endpoint` binds when it has a `*` or `::` or is ipc:// or inproc://, and connects
    otherwise (vLLM's rule); `replay_endpoint` binds. After a bind to port `*` they hold the
    port chosen.

    Raises:
        OSError: an endpoint cannot be bound or connected.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        topic: str = "",
        model: str = "",
        replay_endpoint: str | None = None,
        buffer_steps: int = 10_000,
        max_queue_size: int = MAX_QUEUE_SIZE,
    ) -> None:
        self.topic, self.model = topic, model
        self.num_dropped_batches = 0  # the queue was full: a subscriber sees a gap
        self._next_seq = 0
        self._queue: queue.Queue[tuple[int, bytes, int, int, float, list[Any]]] = queue.Queue(
            max_queue_size
        )
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._ctx = zmq.Context()
        self._replay: zmq.Socket[bytes] | None = None
        self.replay_endpoint: str | None = None
        try:
            self._pub: zmq.Socket[bytes] = self._ctx.socket(zmq.PUB)
            self._pub.set_hwm(HWM)
            self.endpoint = _open(self._pub, endpoint, bind=_is_bind(endpoint))
            if replay_endpoint is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self.replay_endpoint = _open(self._replay, replay_endpoint, bind=True)
        except zmq.ZMQError as exc:
            self._ctx.destroy(linger=0)
            raise OSError(f"KV cache events: {exc}") from exc
        self._stopping = threading.Event()  # close(): send what is queued, then stop
        self._giving_up = threading.Event()  # close() waited long enough: stop now
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: ClusterConfig) -> KvEventPublisher:
        assert config.kv_events_endpoint is not None
        return cls(
            config.kv_events_endpoint,
            topic=config.kv_events_topic,
            model=config.model_name,
            replay_endpoint=config.kv_events_replay_endpoint,
            buffer_steps=config.kv_events_buffer_steps,
        )

    @property
    def num_batches(self) -> int:
        """Batches published so far, dropped ones included: the next sequence number."""
        return self._next_seq

    def attach(self, replica_id: str, rank: int, blocks: BlockManager) -> ReplicaKvEvents:
        """Start recording a replica's prefix-cache changes (its `BlockManager`, empty), and
        publish `AllBlocksCleared` for it first.

        NOTE: a replica starts empty, and a subscriber may still hold blocks under its name: a
        router that died without its last word had a replica-0 too.
        """
        topic = self.topic.format(replica_id=replica_id, model=self.model).encode()
        self.publish(topic, rank, blocks.block_size, [ALL_CLEARED])
        return ReplicaKvEvents(self, blocks, topic=topic, rank=rank)

    def publish(self, topic: bytes, rank: int, block_size: int, events: list[Any]) -> None:
        """Queue one batch for the thread; never blocks. Called from the router's loop only
        (it numbers the batches). Does nothing once closed."""
        if self._stopping.is_set():
            return
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        try:
            self._queue.put_nowait((seq, topic, rank, block_size, time.time(), events))
        except queue.Full:
            self.num_dropped_batches += 1
            if self.num_dropped_batches & (self.num_dropped_batches - 1) == 0:  # 1, 2, 4, ...
                logger.warning(
                    "KV cache events: %d batch(es) dropped, the publisher is behind",
                    self.num_dropped_batches,
                )

    def close(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Send what is queued (for up to `timeout_s`; then the rest is dropped), stop the thread
        and close the sockets. Blocks: call it off the event loop. Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning("KV cache events: %d batch(es) not sent", self._queue.qsize())
            self._giving_up.set()
            # NOTE: the sockets are the thread's until it ends: closing them under it (or
            # leaving them to the garbage collector's term()) can hang the process.
            self._thread.join()
        self._pub.close(linger=LINGER_MS)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._ctx.term()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        encoder = msgspec.msgpack.Encoder()
        while not self._giving_up.is_set():
            try:
                if self._replay is not None and self._replay.poll(0):
                    self._serve_replay()
            except Exception:
                logger.exception("KV cache events: a replay request failed")
            try:
                seq, topic, rank, block_size, ts, events = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                if self._stopping.is_set():
                    return
                continue
            try:
                batch = make_batch(events, block_size=block_size, rank=rank, ts=ts)
                payload = encoder.encode(batch)
                self._pub.send_multipart((topic, seq.to_bytes(8, "big"), payload))
                self._buffer.append((seq, payload))
            except Exception:
                logger.exception("KV cache events: batch %d not sent", seq)

    def _serve_replay(self) -> None:
        """Answer one replay request (identity, empty frame, first sequence number as 8
        big-endian bytes) with every buffered batch from there, then END_SEQ (vLLM's protocol)."""
        assert self._replay is not None
        frames = self._replay.recv_multipart()
        if len(frames) != 3:
            logger.warning("KV cache events: a replay request of %d frames ignored", len(frames))
            return
        client, _, start = frames
        first = int.from_bytes(start, "big")
        for seq, payload in self._buffer:
            if seq >= first:
                self._replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((client, b"", END_SEQ, b""))


def _is_bind(endpoint: str) -> bool:
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def _open(socket: zmq.Socket[bytes], endpoint: str, *, bind: bool) -> str:
    """Bind or connect `socket`; returns the endpoint with the port a bind chose."""
    if not bind:
        socket.connect(endpoint)
        return endpoint
    socket.bind(endpoint)
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)
