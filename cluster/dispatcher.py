"""The dispatcher: puts each admitted request on a replica, and moves it when it has to.

It applies `placement.py`'s decisions: a new request goes to the least loaded ready replica (or
its session's); it waits while no replica can take it; it moves when its replica fails or
drains past its timeout (recomputed from prompt + streamed tokens, so the stream goes on); and
queued requests move to less busy replicas (rebalancing). It knows the streams only to record
where each request runs and to fail those that can run nowhere.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict, deque
from collections.abc import Callable

from kvray.cluster.config import ClusterConfig
from kvray.cluster.errors import RequestFailedError, UnavailableError
from kvray.cluster.placement import QueuedRequest, pick_replica, plan_rebalance
from kvray.cluster.replica import ReplicaHandle
from kvray.cluster.replica_pool import ReplicaPool
from kvray.cluster.request import Request
from kvray.cluster.stats import ReplicaState
from kvray.cluster.streams import RequestStream

logger = logging.getLogger(__name__)

MAX_FAILOVERS = 3  # a request moved this many times fails instead (a worker bug, not bad luck)
MAX_SESSIONS = 100_000  # session -> replica entries kept (least recently used dropped)


class Dispatcher:
    def __init__(
        self,
        config: ClusterConfig,
        pool: ReplicaPool,
        streams: dict[str, RequestStream],
        *,
        clock: Callable[[], float],
        fail: Callable[[RequestStream, BaseException], None],
    ) -> None:
        """`streams` are the router's (by request id); `fail(stream, error)` ends one."""
        self.config = config
        self.pool = pool
        self.clock = clock
        self._streams = streams
        self._fail = fail
        self._unassigned: deque[Request] = deque()  # requests waiting for a replica
        self._sessions: OrderedDict[str, str] = OrderedDict()  # session_id -> replica_id
        self.num_moved_requests = 0  # requests continued on another replica
        self.num_rebalanced_requests = 0  # queued requests moved to a less busy replica
        # What decided each placement of a new or waiting request (`Placement.reason`)
        self.num_routing_decisions: Counter[str] = Counter()

    # ------------------------------------------------------------------ placing

    def pick(self, request: Request, session_id: str | None = None) -> ReplicaHandle | None:
        """The replica `request` should go to (`placement.pick_replica`; remembering a
        session's), or None while no replica is ready."""
        session_replica = self._sessions.get(session_id) if session_id is not None else None
        placement = pick_replica(
            self.pool.stats(),
            routing=self.config.routing,
            num_prompt_tokens=len(request.prompt_token_ids),
            cached_tokens=self.cached_tokens(request),
            session_replica_id=session_replica,
        )
        if placement is None:
            return None
        self.num_routing_decisions[placement.reason] += 1
        logger.debug("%s -> %s (%s)", request.request_id, placement.replica_id, placement.reason)
        if session_id is not None:
            self._sessions[session_id] = placement.replica_id
            self._sessions.move_to_end(session_id)
            if len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return self.pool.replicas[placement.replica_id]

    def cached_tokens(self, request: Request) -> dict[str, int]:
        """Prompt tokens of `request` each ready replica holds (cached, or coming with a request
        queued there); only replicas holding some are listed."""
        if self.config.routing != "cache-aware" or not request.prompt_hashes:
            return {}
        held = {}
        for replica in self.pool.replicas.values():
            if replica.engine is not None and replica.state is ReplicaState.READY:
                blocks = replica.engine.num_prefix_blocks(request.prompt_hashes)
                if blocks:
                    held[replica.replica_id] = blocks * replica.engine.info.block_size
        return held

    def place(self, request: Request, stream: RequestStream, replica: ReplicaHandle | None) -> None:
        """Queue `request` on `replica`, or, with None, until a replica can take it."""
        if replica is None:
            stream.unassigned_since = self.clock()
            self._unassigned.append(request)
            return
        assert replica.engine is not None
        replica.engine.add(request)
        stream.replica_id = replica.replica_id
        stream.unassigned_since = None
        replica.wake()

    def assign_waiting(self) -> None:
        """Give the requests waiting for a replica to the ready ones."""
        while self._unassigned:
            replica = self.pick(self._unassigned[0])
            if replica is None:
                return
            request = self._unassigned.popleft()
            stream = self._streams.get(request.request_id)
            if stream is not None and not request.is_finished:
                self.place(request, stream, replica)

    def requeue(self, requests: list[Request], *, failover: bool) -> None:
        """Requests whose replica failed or stopped draining go to another replica, or wait."""
        for request in requests:
            stream = self._streams.get(request.request_id)
            if stream is None:
                continue
            stream.replica_id = None
            stream.num_failovers += failover
            if stream.num_failovers > MAX_FAILOVERS:
                self._fail(
                    stream, RequestFailedError(f"request failed on {MAX_FAILOVERS} replicas")
                )
            else:
                self.place(request, stream, None)
                self.num_moved_requests += 1
        self.assign_waiting()

    def forget(self, request_id: str) -> None:
        """Drop a request that waits for a replica (it was aborted)."""
        self._unassigned = deque(r for r in self._unassigned if r.request_id != request_id)

    # ------------------------------------------------------------------ moving

    def rebalance(self) -> int:
        """Move queued requests to less busy replicas (`placement.plan_rebalance`); returns how
        many moved. Only requests that hold nothing on their replica move, so a move is free."""
        if self.config.rebalance_period_s == 0:
            return 0
        queued: list[QueuedRequest] = []
        requests: dict[str, Request] = {}
        for replica in self.pool.replicas.values():
            if replica.engine is None or replica.state not in (
                ReplicaState.READY,
                ReplicaState.DRAINING,
            ):
                continue
            for request in replica.engine.queued_requests():
                queued.append(
                    QueuedRequest(
                        request.request_id,
                        replica.replica_id,
                        request.num_unfinished_tokens,
                        request.arrival_time,
                        self.cached_tokens(request),
                        request.num_queued_work,
                    )
                )
                requests[request.request_id] = request
        woken: set[str] = set()
        num_moved = 0
        for move in plan_rebalance(self.pool.stats(), queued, routing=self.config.routing):
            stream = self._streams.get(move.request_id)
            source, dest = self.pool.replicas[move.source_id], self.pool.replicas[move.dest_id]
            if stream is None or source.engine is None or dest.engine is None:
                continue
            dest.engine.add(source.engine.release(requests[move.request_id]))
            stream.replica_id = dest.replica_id
            woken.add(dest.replica_id)
            num_moved += 1
        for replica_id in woken:
            self.pool.replicas[replica_id].wake()
        if num_moved:
            self.num_rebalanced_requests += num_moved
            logger.debug("rebalanced %d queued requests", num_moved)
        return num_moved

    # ------------------------------------------------------------------ waiting

    def expire(self, now: float) -> None:
        """Fail requests that have waited for a replica longer than `cold_start_timeout_s`."""
        timeout = self.config.autoscaling.cold_start_timeout_s
        self.fail_waiting(
            f"no replica became ready within {timeout:.0f}s",
            lambda stream: now - (stream.unassigned_since or now) > timeout,
        )

    def fail_waiting(
        self, message: str, should_fail: Callable[[RequestStream], bool] = lambda stream: True
    ) -> None:
        """End waiting-for-a-replica requests whose stream `should_fail` selects (UNAVAILABLE)."""
        keep: deque[Request] = deque()
        for request in self._unassigned:
            stream = self._streams.get(request.request_id)
            if stream is not None and should_fail(stream):
                self._fail(stream, UnavailableError(message))
            elif stream is not None:
                keep.append(request)
        self._unassigned = keep

    @property
    def num_unassigned(self) -> int:
        """Requests waiting for a replica (none ready, or moved from a failed/drained one)."""
        return len(self._unassigned)

    @property
    def num_unassigned_seqs(self) -> int:
        """Their unfinished sequences."""
        return sum(1 for r in self._unassigned for s in r.seqs if not s.is_finished)
