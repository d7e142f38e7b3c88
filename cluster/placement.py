"""Placement decisions, as pure functions of replica stats: which replica takes a new request,
which queued requests a rebalance moves, which replicas a scale-down removes.

No Ray, no asyncio, no clock: the router gathers `ReplicaStats` and applies the decisions.
Work is counted one way everywhere: `ReplicaStats.work_tokens` (queued prompt tokens plus one
decode per running sequence), over the step budget for placement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvray.cluster.stats import ReplicaState, ReplicaStats

SESSION_IMBALANCE = 1.0  # leave a session's replica when it has a full step more work


def pick_replica(
    replicas: Sequence[ReplicaStats], *, session_replica_id: str | None = None
) -> str | None:
    """The least loaded ready replica, or the session's replica unless it has
    `SESSION_IMBALANCE` steps more work than that one. None when no replica is ready."""
    ready = [r for r in replicas if r.is_ready]
    if not ready:
        return None
    best = min(ready, key=lambda r: r.load)
    if session_replica_id is not None:
        for r in ready:
            if r.replica_id == session_replica_id and r.load[0] - best.load[0] <= SESSION_IMBALANCE:
                return r.replica_id
    return best.replica_id


@dataclass(frozen=True)
class QueuedRequest:
    """A request queued on a replica that could move at no cost (`Request.is_movable`)."""

    request_id: str
    replica_id: str
    num_tokens: int  # its share of the replica's queued tokens
    arrival_time: float


@dataclass(frozen=True)
class Move:
    request_id: str
    source_id: str
    dest_id: str


def plan_rebalance(replicas: Sequence[ReplicaStats], queued: Sequence[QueuedRequest]) -> list[Move]:
    """Which queued requests to move so that work spreads over the ready replicas.

    Requests are dealt oldest first to the replica with the least work, and move only when
    their replica, without them, would still have more work than that one with them (no back
    and forth between near-equal replicas). Requests queued on a replica that is not ready
    (draining) always move.
    """
    ready = [r for r in replicas if r.is_ready]
    if not ready:
        return []
    work = {r.replica_id: r.work_tokens for r in ready}  # without what may move
    for q in queued:
        if q.replica_id in work:
            work[q.replica_id] -= q.num_tokens
    if len(ready) < 2 and all(q.replica_id in work for q in queued):
        return []  # nowhere else to go
    moves = []
    for q in sorted(queued, key=lambda q: q.arrival_time):
        dest = min(ready, key=lambda r: work[r.replica_id]).replica_id
        if q.replica_id in work and work[q.replica_id] - work[dest] <= q.num_tokens:
            work[q.replica_id] += q.num_tokens  # no better place: it stays
            continue
        moves.append(Move(q.request_id, q.replica_id, dest))
        work[dest] += q.num_tokens
    return moves


def choose_replicas_to_remove(replicas: Sequence[ReplicaStats], count: int) -> list[str]:
    """Which replicas a scale-down by `count` removes: those still starting first, newest first
    (nothing to drain), then the least loaded ready ones. `replicas` is in launch order."""
    starting = [r.replica_id for r in replicas if r.state is ReplicaState.STARTING][::-1]
    ready = [
        r.replica_id for r in sorted((r for r in replicas if r.is_ready), key=lambda r: r.load)
    ]
    return (starting + ready)[:count]
