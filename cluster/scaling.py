"""The router's scaling loop: measure load, ask the autoscaler policy, add or drain replicas.

Every decision is logged with the numbers behind it and kept for GetClusterStatus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from kvray.cluster.autoscaler import Autoscaler, LoadSample, ScalingDecision
from kvray.cluster.replica import ReplicaState

if TYPE_CHECKING:
    from kvray.cluster.router import Router

logger = logging.getLogger(__name__)

MAX_DECISIONS_KEPT = 20


class ScalingController:
    def __init__(self, router: Router) -> None:
        self.router = router
        config = router.config
        self.config = config.autoscaling
        low, high = self.config.bounds(config.replicas)
        self.policy = Autoscaler(self.config, min_replicas=low, max_replicas=high)
        self.target_replicas = config.replicas
        self.decisions: deque[ScalingDecision] = deque(maxlen=MAX_DECISIONS_KEPT)
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
        replicas = self.router.replicas.values()
        live = [r for r in replicas if r.state in (ReplicaState.READY, ReplicaState.STARTING)]
        ongoing = self.router.num_unassigned
        kv = 0.0
        for r in live:
            if r.engine is not None:
                ongoing += r.engine.scheduler.num_waiting + r.engine.scheduler.num_running
                kv += r.engine.block_manager.usage
        while self._ttfts and self._ttfts[0][0] < now - self.config.look_back_period_s:
            self._ttfts.popleft()
        ttft = _percentile([s for _, s in self._ttfts], 90)
        return LoadSample(len(live), ongoing, kv, ttft)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.metrics_interval_s)
            self.tick(time.monotonic())

    def tick(self, now: float) -> ScalingDecision | None:
        """One measurement and decision; acts on it. Returns the decision taken, if any."""
        self.router.expire_unassigned(now)
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
        self.decisions.append(decision)
        self.target_replicas = decision.to_replicas
        for _ in range(decision.to_replicas - decision.from_replicas):
            self.router.background(self._launch())
        surplus = decision.from_replicas - decision.to_replicas
        if surplus > 0:  # replicas still starting go first (nothing to drain), newest first
            starting = [
                r for r in self.router.replicas.values() if r.state is ReplicaState.STARTING
            ]
            for replica in starting[::-1][:surplus]:
                self.router.cancel_start(replica)
                surplus -= 1
            ready = sorted(self.router.ready_replicas(), key=lambda r: r.load)
            for replica in ready[:surplus]:
                self.router.background(
                    self.router.drain_replica(replica, self.config.drain_timeout_s)
                )

    async def _launch(self) -> None:
        with contextlib.suppress(Exception):  # launch_replica logs its failures
            await self.router.launch_replica()

    def status(self) -> dict[str, Any]:
        now_mono, now_wall = time.monotonic(), time.time()
        return {
            "min_replicas": self.policy.min_replicas,
            "max_replicas": self.policy.max_replicas,
            "target_replicas": self.target_replicas,
            "recent_decisions": [
                {
                    "time_unix": now_wall - (now_mono - d.time),
                    "from_replicas": d.from_replicas,
                    "to_replicas": d.to_replicas,
                    "reason": d.reason,
                }
                for d in self.decisions
            ],
        }


def _percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]
