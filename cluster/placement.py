"""Placement decisions, as pure functions of replica stats: which replica takes a new request,
which queued requests a rebalance moves, which replicas a scale-down removes.

No Ray, no asyncio, no clock: the router gathers `ReplicaStats` (and, per request, how many of
its prompt tokens each replica already holds) and applies the decisions. Work is counted one
way everywhere: `ReplicaStats.work_tokens`, the tokens its queued requests will compute (their
known tokens but the prompt blocks the replica held for them when they were queued) plus one
decode per running sequence.

Routing a new request (`routing` setting):

- `least-loaded`: the replica with the least work (then the lowest KV-cache use).
- `cache-aware` (the default): the replica where the request's first token comes soonest by
  the tokens computed before it: `cost = work_tokens + prompt tokens it does not hold`. A
  replica holds a prompt block when its prefix cache has it, or a request queued or running
  there brings it (`EngineCore.num_prefix_blocks`), so a burst sharing a prefix follows the
  first request that carries it. The bound: a replica holding `h` more of the prompt than
  another takes the request only while its work exceeds that one's by less than `h` tokens.
  So a hot prefix stays where it is cached until that replica is `h` tokens busier than the
  least loaded one; then the next request computes it on that one, which then holds it too.
  With nothing cached anywhere (unique prompts, a new empty replica) the rule is
  least-loaded's.

Either way a `session_id` is a hint: its last replica keeps it unless that one's cost exceeds
the best's by more than `SESSION_IMBALANCE` steps (its step budget in tokens). Ties go to the
lower KV-cache use, then to the earlier replica in launch order: the same stats give the same
choice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvray.cluster.stats import ReplicaState, ReplicaStats

SESSION_IMBALANCE = 1.0  # leave a session's replica when it has a full step more work
ROUTING_POLICIES = ("cache-aware", "least-loaded")


@dataclass(frozen=True)
class Placement:
    replica_id: str
    reason: str  # "prefix", "load", "session" or "only-ready": what decided (metrics, logs)


def pick_replica(
    replicas: Sequence[ReplicaStats],
    *,
    routing: str = "cache-aware",
    num_prompt_tokens: int = 0,
    cached_tokens: Mapping[str, int] | None = None,
    session_replica_id: str | None = None,
) -> Placement | None:
    """Where a new request goes (the module docstring has the rule). `cached_tokens`: prompt
    tokens each replica holds for it (by replica id; missing: none). None when no replica is
    ready."""
    ready = [(r, i) for i, r in enumerate(replicas) if r.is_ready]
    if not ready:
        return None
    if len(ready) == 1:
        return Placement(ready[0][0].replica_id, "only-ready")
    cached = cached_tokens or {}

    def cost(r: ReplicaStats) -> float:
        if routing == "least-loaded":
            return r.work_tokens
        return r.work_tokens + num_prompt_tokens - cached.get(r.replica_id, 0)

    best, _ = min(ready, key=lambda ri: (cost(ri[0]), ri[0].load[1], ri[1]))
    session = next((r for r, _ in ready if r.replica_id == session_replica_id), best)
    within = cost(session) - cost(best) <= SESSION_IMBALANCE * session.max_num_batched_tokens
    if session is not best and within:
        return Placement(session.replica_id, "session")
    reason = "prefix" if routing == "cache-aware" and cached.get(best.replica_id, 0) else "load"
    return Placement(best.replica_id, reason)


@dataclass(frozen=True)
class QueuedRequest:
    """A request queued on a replica that could move at no cost (`Request.is_movable`)."""

    request_id: str
    replica_id: str
    num_tokens: int  # its known tokens: what a replica holding none of its prompt computes
    arrival_time: float
    cached_tokens: Mapping[str, int] | None = None  # prompt tokens each replica holds for it
    num_queued_work: int | None = None  # its share of its replica's work (None: num_tokens)

    @property
    def work_here(self) -> int:
        return self.num_tokens if self.num_queued_work is None else self.num_queued_work


@dataclass(frozen=True)
class Move:
    request_id: str
    source_id: str
    dest_id: str


def plan_rebalance(
    replicas: Sequence[ReplicaStats],
    queued: Sequence[QueuedRequest],
    *,
    routing: str = "cache-aware",
) -> list[Move]:
    """Which queued requests to move so that work spreads over the ready replicas.

    Requests are dealt oldest first to the replica where they cost least (`pick_replica`'s
    cost: work plus the prompt tokens it would compute there), and move only when their
    replica, without them, would still have more work than that one with them (no back and
    forth between near-equal replicas; a request leaves the replica holding its prefix only
    for one that is busier by less than the tokens it must then compute). Requests queued on a
    replica that is not ready (draining) always move.
    """
    ready = [(r, i) for i, r in enumerate(replicas) if r.is_ready]
    if not ready:
        return []
    work = {r.replica_id: r.work_tokens for r, _ in ready}  # without what may move
    for q in queued:
        if q.replica_id in work:
            work[q.replica_id] -= q.work_here
    if len(ready) < 2 and all(q.replica_id in work for q in queued):
        return []  # nowhere else to go
    moves = []
    for q in sorted(queued, key=lambda q: q.arrival_time):
        cached = (q.cached_tokens or {}) if routing == "cache-aware" else {}

        def cost(r: ReplicaStats, q: QueuedRequest = q, cached: Mapping = cached) -> int:
            return work[r.replica_id] + q.num_tokens - cached.get(r.replica_id, 0)

        # NOTE: its own replica is no candidate: the prompt blocks it holds there for this
        # request are this request's own, coming, not cached.
        others = [(r, i) for r, i in ready if r.replica_id != q.replica_id]
        if not others:
            work[q.replica_id] += q.work_here
            continue
        dest_stats, _ = min(others, key=lambda ri: (cost(ri[0]), ri[0].load[1], ri[1]))
        dest = dest_stats.replica_id
        if q.replica_id in work and work[q.replica_id] <= cost(dest_stats):
            work[q.replica_id] += q.work_here  # no better place: it stays
            continue
        moves.append(Move(q.request_id, q.replica_id, dest))
        work[dest] = cost(dest_stats)
    return moves


def choose_replicas_to_remove(replicas: Sequence[ReplicaStats], count: int) -> list[str]:
    """Which replicas a scale-down by `count` removes: those still starting first, newest first
    (nothing to drain), then the least loaded ready ones. `replicas` is in launch order."""
    starting = [r.replica_id for r in replicas if r.state is ReplicaState.STARTING][::-1]
    ready = [
        r.replica_id for r in sorted((r for r in replicas if r.is_ready), key=lambda r: r.load)
    ]
    return (starting + ready)[:count]
