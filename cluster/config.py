"""Engine configuration: the worker's and the scheduler's settings, built from keyword arguments."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kvray.cluster.scheduler import SchedulerConfig
from kvray.workers.config import WorkerConfig


@dataclass(frozen=True)
class EngineConfig:
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache_dir: str | None = None  # where built-in tiny models are built (default ~/.cache/kvray)

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> EngineConfig:
        """Split flat keyword arguments between WorkerConfig and SchedulerConfig.

        Raises:
            TypeError: an argument that neither config has (the message lists the valid ones).
            ValueError: a value out of range (from the configs' own checks).
        """
        # NOTE: max_num_batched_tokens is a field of both: the worker profiles the largest step
        # the scheduler may build, so the two must agree.
        worker_keys = {f.name for f in dataclasses.fields(WorkerConfig)}
        scheduler_keys = {f.name for f in dataclasses.fields(SchedulerConfig)}
        unknown = set(kwargs) - worker_keys - scheduler_keys - {"cache_dir"}
        if unknown:
            valid = ", ".join(sorted(worker_keys | scheduler_keys | {"cache_dir"}))
            raise TypeError(
                f"unknown engine option(s) {', '.join(sorted(unknown))}; valid: {valid}"
            )
        worker = WorkerConfig(**{k: v for k, v in kwargs.items() if k in worker_keys})  # type: ignore[arg-type]
        scheduler = SchedulerConfig(**{k: v for k, v in kwargs.items() if k in scheduler_keys})  # type: ignore[arg-type]
        cache_dir = kwargs.get("cache_dir")
        return cls(worker, scheduler, None if cache_dir is None else str(cache_dir))
