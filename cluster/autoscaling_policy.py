"""The autoscaling policy: how many replicas the measured load needs, with delays against
flapping. Pure Python and clock-free (the caller passes `now`); `autoscaler.py` acts on it.

Names follow Ray Serve's `autoscaling_config` where they mean the same thing
(`min_replicas`, `max_replicas`, `target_ongoing_requests`, `upscale_delay_s`,
`downscale_delay_s`, `metrics_interval_s`, `look_back_period_s`); the KV-cache and TTFT
targets are kvray's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvray.workers.config import setting


@dataclass(frozen=True)
class AutoscalingConfig:
    min_replicas: int | None = setting(
        None, "autoscaling lower bound (default: replicas; 0 allows scale to zero)"
    )
    max_replicas: int | None = setting(
        None, "autoscaling upper bound (default: replicas, no autoscaling)"
    )
    target_ongoing_requests: float = setting(
        16.0, "running + queued sequences per replica to aim for"
    )
    target_kv_cache_usage: float = setting(0.8, "KV-cache use per replica to aim for (0..1]")
    target_ttft_s: float | None = setting(
        None, "p90 time to first token to aim for; adds replicas when slower (default: unused)"
    )
    upscale_delay_s: float = setting(5.0, "seconds load must stay above target before adding")
    downscale_delay_s: float = setting(60.0, "seconds load must stay below target before removing")
    metrics_interval_s: float = setting(1.0, "how often the autoscaler measures and decides")
    look_back_period_s: float = setting(10.0, "window of the TTFT percentile, seconds")
    drain_timeout_s: float = setting(
        60.0, "a draining replica's unfinished requests move elsewhere after this many seconds"
    )
    cold_start_timeout_s: float = setting(
        300.0, "how long a request may wait for a replica (none ready, or its own failed)"
    )

    def __post_init__(self) -> None:
        for name in ("target_ongoing_requests", "metrics_interval_s", "look_back_period_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.target_kv_cache_usage <= 1:
            raise ValueError(
                f"target_kv_cache_usage must be in (0, 1], got {self.target_kv_cache_usage}"
            )
        if self.target_ttft_s is not None and self.target_ttft_s <= 0:
            raise ValueError(f"target_ttft_s must be > 0, got {self.target_ttft_s}")
        for name in (
            "upscale_delay_s",
            "downscale_delay_s",
            "drain_timeout_s",
            "cold_start_timeout_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def bounds(self, replicas: int) -> tuple[int, int]:
        """(min, max) replicas, defaulting both to `replicas`."""
        low = replicas if self.min_replicas is None else self.min_replicas
        high = replicas if self.max_replicas is None else self.max_replicas
        if low < 0 or high < max(low, 1):
            raise ValueError(
                f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                f"min_replicas={low}, max_replicas={high}"
            )
        return low, high


@dataclass(frozen=True)
class LoadSample:
    """The cluster's load at one moment, as the router measures it."""

    num_replicas: int  # ready + starting (what capacity will be without new decisions)
    ongoing_requests: int  # running + queued on replicas + waiting for a replica
    kv_cache_usage: float  # sum over ready replicas of the fraction of blocks in use
    ttft_p90_s: float | None  # over the look-back window; None when nothing finished


@dataclass(frozen=True)
class ScalingDecision:
    time: float  # the caller's clock (monotonic seconds)
    from_replicas: int
    to_replicas: int
    reason: str  # the numbers behind it


class AutoscalingPolicy:
    """Turns load samples into replica counts: above target for `upscale_delay_s` adds replicas,
    below for `downscale_delay_s` removes them; from zero, any demand starts one at once."""

    def __init__(self, config: AutoscalingConfig, *, min_replicas: int, max_replicas: int) -> None:
        self.config = config
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self._above_since: float | None = None
        self._below_since: float | None = None

    def desired(self, load: LoadSample) -> tuple[int, str]:
        """Replicas the load needs now (within bounds), and why."""
        cfg = self.config
        by_requests = load.ongoing_requests / cfg.target_ongoing_requests
        by_kv = load.kv_cache_usage / cfg.target_kv_cache_usage
        by_ttft = 0.0  # slow first tokens are only ever a reason to add replicas
        slow = cfg.target_ttft_s is not None and (load.ttft_p90_s or 0.0) > cfg.target_ttft_s
        if slow and load.ttft_p90_s is not None and cfg.target_ttft_s is not None:
            by_ttft = load.num_replicas * load.ttft_p90_s / cfg.target_ttft_s
        need = math.ceil(max(by_requests, by_kv, by_ttft) - 1e-9)
        if load.ongoing_requests and need == 0:
            need = 1
        target = min(max(need, self.min_replicas), self.max_replicas)
        ttft = "n/a" if load.ttft_p90_s is None else f"{load.ttft_p90_s * 1000:.0f}ms"
        reason = (
            f"ongoing={load.ongoing_requests} (/{cfg.target_ongoing_requests:g} -> {by_requests:.2f}), "
            f"kv={load.kv_cache_usage:.2f} (/{cfg.target_kv_cache_usage:g} -> {by_kv:.2f}), "
            f"ttft_p90={ttft} -> {by_ttft:.2f}; bounds [{self.min_replicas}, {self.max_replicas}]"
        )
        return target, reason

    def decide(self, now: float, load: LoadSample) -> ScalingDecision | None:
        """A decision to change the replica count, or None to keep it."""
        target, reason = self.desired(load)
        current = load.num_replicas
        if target > current:
            self._below_since = None
            if current == 0:  # cold start: a waiting request should not also wait for a delay
                return self._decision(now, current, target, "scale from zero: " + reason)
            self._above_since = self._above_since if self._above_since is not None else now
            if now - self._above_since >= self.config.upscale_delay_s:
                return self._decision(now, current, target, reason)
        elif target < current:
            self._above_since = None
            self._below_since = self._below_since if self._below_since is not None else now
            if now - self._below_since >= self.config.downscale_delay_s:
                return self._decision(now, current, target, reason)
        else:
            self._above_since = self._below_since = None
        return None

    def _decision(self, now: float, current: int, target: int, reason: str) -> ScalingDecision:
        self._above_since = self._below_since = None
        return ScalingDecision(now, current, target, reason)
