"""The cluster's state as every reader sees it: one `ReplicaStats` per replica and a
`ClusterStats` around them. Status (gRPC and HTTP), placement, rebalancing and autoscaling all
read these; none of them reaches into a replica's scheduler or block manager.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kvray.workers.protocol import RankInfo


class ReplicaState(str, enum.Enum):
    STARTING = "STARTING"  # actor created, model loading / warming up
    READY = "READY"  # takes requests
    DRAINING = "DRAINING"  # finishes its requests, takes no new ones
    DEAD = "DEAD"  # actor gone; its requests moved elsewhere


@dataclass(frozen=True)
class ReplicaStats:
    """One replica at one moment. A replica that is still starting has only the first fields."""

    replica_id: str
    state: ReplicaState
    device: str = ""
    num_waiting: int = 0  # sequences queued on it, not running yet
    num_running: int = 0  # sequences holding KV blocks
    # Tokens its waiting sequences will compute (prefill work ahead): their known tokens but the
    # prompt tokens the replica held for them when they were queued
    num_queued_tokens: int = 0
    max_num_batched_tokens: int = 1  # its step budget
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    num_preemptions: int = 0  # since it started
    num_finished_requests: int = 0  # since it started, any finish reason
    num_prefix_queries: int = 0  # prompt tokens looked up in its prefix cache
    num_prefix_hits: int = 0  # of which were served from it
    ranks: tuple[RankInfo, ...] = ()  # its worker processes (tensor-parallel ranks), rank order
    step_seconds: float = 0.0  # its worker's time in steps since it started
    mask_seconds: float = 0.0  # of which making and applying structured output's masks

    @property
    def is_ready(self) -> bool:
        return self.state is ReplicaState.READY

    @property
    def has_engine(self) -> bool:
        return self.state in (ReplicaState.READY, ReplicaState.DRAINING)

    @property
    def work_tokens(self) -> int:
        """Work ahead of a new request: queued tokens to compute plus one decode per running
        sequence."""
        return self.num_queued_tokens + self.num_running

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Of the prompt tokens looked up in its prefix cache, the share served from it."""
        return self.num_prefix_hits / self.num_prefix_queries if self.num_prefix_queries else 0.0

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of its KV blocks in use (0..1)."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def load(self) -> tuple[float, float]:
        """Lower is less loaded: (steps of work ahead of a new prefill, KV cache use)."""
        if not self.has_engine:
            return (float("inf"), 1.0)
        return (self.work_tokens / self.max_num_batched_tokens, self.kv_cache_usage)


@dataclass(frozen=True)
class ScalingEvent:
    """One change of the replica count that the autoscaler made."""

    time_unix: float
    from_replicas: int
    to_replicas: int
    reason: str  # the measurements behind it


@dataclass(frozen=True)
class ClusterStats:
    replicas: list[ReplicaStats]
    queue_depth: int  # requests waiting for a replica (none ready, or moved off a failed one)
    num_running: int  # sequences running on all replicas
    num_moved_requests: int  # continued on another replica after a failure or a drain timeout
    num_rebalanced_requests: int  # queued requests moved to a less busy replica
    min_replicas: int
    max_replicas: int
    target_replicas: int
    recent_decisions: list[ScalingEvent] = field(default_factory=list)
    # Since the router started, over every replica it ran (stopped ones included):
    num_preemptions: int = 0
    num_prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    num_prefix_hits: int = 0  # of which were served from it
    num_scale_ups: int = 0  # autoscaler decisions
    num_scale_downs: int = 0
    block_size: int = 0  # tokens per KV block (0 before the first replica is ready)
    # Placements of new and waiting requests by what decided them (`placement.Placement`)
    num_routing_decisions: dict[str, int] = field(default_factory=dict)
    # Structured output's compiled-grammar cache at the router: compiles (refusals included)
    # and cache hits
    num_grammar_compiles: int = 0
    num_grammar_cache_hits: int = 0


@dataclass
class EngineTotals:
    """Counters of replicas that have stopped, so cluster totals never go backwards."""

    num_preemptions: int = 0
    num_prefix_queries: int = 0
    num_prefix_hits: int = 0

    def add(self, replica: ReplicaStats) -> None:
        self.num_preemptions += replica.num_preemptions
        self.num_prefix_queries += replica.num_prefix_queries
        self.num_prefix_hits += replica.num_prefix_hits
