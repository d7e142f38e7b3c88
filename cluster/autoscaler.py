"""The autoscaler: every `metrics_interval_s` it measures the load from the replicas' stats,
asks the policy for a replica count, and has the pool add or remove replicas.

Every decision is logged with the numbers behind it and kept for the cluster's status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvray.cluster.autoscaling_policy import (
    AutoscalingConfig,
    AutoscalingPolicy,
    LoadSample,
    ScalingDecision,
)
from kvray.cluster.stats import ReplicaState, ScalingEvent

if TYPE_CHECKING:
    from kvray.cluster.replica_pool import ReplicaPool

logger = logging.getLogger(__name__)

MAX_DECISIONS_KEPT = 20


class Autoscaler:
    def __init__(
        self,
        config: AutoscalingConfig,
        pool: ReplicaPool,
        *,
        replicas: int,
        num_unassigned: Callable[[], int],
    ) -> None:
        """`replicas` is the count started at launch; `num_unassigned()` the requests waiting
        for a replica (they count as demand)."""
        self.config = config
        self.pool = pool
        low, high = config.bounds(replicas)
        self.policy = AutoscalingPolicy(config, min_replicas=low, max_replicas=high)
        self.target_replicas = replicas
        self.decisions: deque[ScalingEvent] = deque(maxlen=MAX_DECISIONS_KEPT)
        self.num_scale_ups = 0
        self.num_scale_downs = 0
        self._num_unassigned = num_unassigned
        self._ttfts: deque[tuple[float, float]] = deque()  # (when, seconds)

    @property
    def is_enabled(self) -> bool:
        return self.policy.min_replicas != self.policy.max_replicas

    @property
    def can_scale_from_zero(self) -> bool:
        """With no replica running, a request waits while one starts (instead of UNAVAILABLE)."""
        return self.is_enabled and self.policy.min_replicas == 0

    def record_ttft(self, now: float, seconds: float) -> None:
        if self.is_enabled:  # trimmed by `sample`, which runs only then
            self._ttfts.append((now, seconds))

    def sample(self, now: float) -> LoadSample:
        live = [
            r for r in self.pool.stats() if r.state in (ReplicaState.READY, ReplicaState.STARTING)
        ]
        ongoing = self._num_unassigned() + sum(r.num_waiting + r.num_running for r in live)
        while self._ttfts and self._ttfts[0][0] < now - self.config.look_back_period_s:
            self._ttfts.popleft()
        ttft = _percentile([s for _, s in self._ttfts], 90)
        return LoadSample(len(live), ongoing, sum(r.kv_cache_usage for r in live), ttft)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.metrics_interval_s)
            self.tick(self.pool.clock())

    def tick(self, now: float) -> ScalingDecision | None:
        """One measurement and decision; acts on it. Returns the decision taken, if any."""
        decision = self.policy.decide(now, self.sample(now))
        if decision is not None:
            self.apply(decision)
        return decision

    def apply(self, decision: ScalingDecision) -> None:
        logger.info(
            "scaling %d -> %d replicas: %s",
            decision.from_replicas,
            decision.to_replicas,
            decision.reason,
        )
        self.decisions.append(
            ScalingEvent(time.time(), decision.from_replicas, decision.to_replicas, decision.reason)
        )
        self.target_replicas = decision.to_replicas
        change = decision.to_replicas - decision.from_replicas
        if change > 0:
            self.num_scale_ups += 1
            self.pool.add(change)
        elif change < 0:
            self.num_scale_downs += 1
            self.pool.remove(-change, drain_timeout_s=self.config.drain_timeout_s)


def _percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]
