"""Configuration: the engine's (worker + scheduler) and the cluster's, and the one loader that
merges defaults, a YAML file, `KVRAY_*` environment variables and command-line flags.

Nothing else in kvray reads `os.environ`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvray.cluster.autoscaler import AutoscalingConfig
from kvray.cluster.scheduler import SchedulerConfig
from kvray.workers.config import WorkerConfig

ENV_PREFIX = "KVRAY_"


@dataclass(frozen=True)
class EngineConfig:
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache_dir: str | None = None  # where built-in tiny models are built (default ~/.cache/kvray)

    @classmethod
    def keys(cls) -> set[str]:
        return _field_names(WorkerConfig) | _field_names(SchedulerConfig) | {"cache_dir"}

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Split flat keyword arguments between WorkerConfig and SchedulerConfig.

        Raises:
            TypeError: an argument that neither config has (the message lists the valid ones).
            ValueError: a value out of range (from the configs' own checks).
        """
        unknown = set(kwargs) - cls.keys()
        if unknown:
            valid = ", ".join(sorted(cls.keys()))
            raise TypeError(
                f"unknown engine option(s) {', '.join(sorted(unknown))}; valid: {valid}"
            )
        # NOTE: max_num_batched_tokens and max_num_seqs are fields of both: the worker profiles
        # (and sizes its CPU cache for) the largest step the scheduler may build.
        worker = WorkerConfig(**_pick(kwargs, WorkerConfig))
        scheduler = SchedulerConfig(**_pick(kwargs, SchedulerConfig))
        cache_dir = kwargs.get("cache_dir")
        return cls(worker, scheduler, None if cache_dir is None else str(cache_dir))


@dataclass(frozen=True)
class ClusterConfig:
    """The serving cluster. `load` takes every field of the nested configs as a flat key."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    replicas: int = 1  # worker actors started at launch (min/max_replicas bound them later)
    host: str = "0.0.0.0"  # gRPC listen address
    port: int = 50051  # gRPC port; 0 picks a free one
    ray_address: str | None = None  # join this Ray cluster; None starts a local one
    max_queued_requests: int = 256  # past this many waiting requests: RESOURCE_EXHAUSTED
    cpus_per_replica: float = 1.0  # Ray CPUs each worker actor asks for (CPU clusters)
    gpus_per_replica: float | None = None  # None: 1 when the Ray cluster has GPUs, else 0
    health_check_period_s: float = 5.0  # how often idle replicas are pinged
    rebalance_period_s: float = 0.25  # queued requests move to less busy replicas; 0: never
    shutdown_timeout_s: float = 30.0  # SIGTERM: running streams get this long to finish
    fake_step_ms: float = 20.0  # model "fake" only: how long each scripted step takes

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535] (0: any free port), got {self.port}")
        if self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be >= 1, got {self.max_queued_requests}")
        if self.rebalance_period_s < 0:
            raise ValueError(
                f"rebalance_period_s must be >= 0 (0: off), got {self.rebalance_period_s}"
            )
        if self.cpus_per_replica < 0 or (self.gpus_per_replica or 0) < 0:
            raise ValueError("cpus_per_replica and gpus_per_replica must be >= 0")
        low, high = self.autoscaling.bounds(self.replicas)
        if not low <= self.replicas <= high:
            raise ValueError(
                f"replicas={self.replicas} must be within [min_replicas, max_replicas] = [{low}, {high}]"
            )

    @property
    def model(self) -> str:
        return self.engine.worker.model


def load(
    flags: Mapping[str, Any] | None = None,
    *,
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ClusterConfig:
    """Merge, lowest precedence first: defaults, the YAML file (`config_file`, or the file named by
    `KVRAY_CONFIG`), `KVRAY_<KEY>` environment variables, then `flags` (None values are skipped).

    Raises:
        ValueError: an unknown key (anywhere), a value of the wrong type, or one out of range.
    """
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    path = config_file or environ.get(f"{ENV_PREFIX}CONFIG")
    if path:
        merged.update(_read_yaml(Path(path)))
    types_by_key = _key_types()
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX) and name != f"{ENV_PREFIX}CONFIG":
            key = name[len(ENV_PREFIX) :].lower()
            if key not in types_by_key:
                raise ValueError(
                    f"unknown setting {name}; valid keys: {', '.join(sorted(types_by_key))}"
                )
            merged[key] = _parse(name, value, types_by_key[key])
    merged.update({k: v for k, v in (flags or {}).items() if v is not None})
    unknown = set(merged) - set(types_by_key)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(types_by_key))}"
        )
    cluster_keys = _field_names(ClusterConfig) - {"engine", "autoscaling"}
    scaling_keys = _field_names(AutoscalingConfig)
    engine = EngineConfig.from_kwargs(
        **{k: v for k, v in merged.items() if k not in cluster_keys | scaling_keys}
    )
    autoscaling = AutoscalingConfig(**{k: v for k, v in merged.items() if k in scaling_keys})
    return ClusterConfig(
        engine=engine,
        autoscaling=autoscaling,
        **{k: v for k, v in merged.items() if k in cluster_keys},
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _key_types() -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for cls in (WorkerConfig, SchedulerConfig, AutoscalingConfig, ClusterConfig):
        hints.update(typing.get_type_hints(cls))
    hints.pop("engine")
    hints.pop("autoscaling")
    hints["cache_dir"] = str | None
    return hints


def _parse(name: str, value: str, hint: Any) -> Any:
    """Parse an environment variable's text as the field's type."""
    args = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
    if type(None) in args and value.lower() in ("", "none", "null"):
        return None
    base = next(a for a in args if a is not type(None))
    try:
        if base is bool:
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("1", "true", "yes")
        return base(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a valid {base.__name__}") from None


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _pick(kwargs: Mapping[str, Any], cls: type) -> dict[str, Any]:
    names = _field_names(cls)
    return {k: v for k, v in kwargs.items() if k in names}
