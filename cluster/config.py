"""The cluster's settings, and the one loader that merges defaults, a YAML file, `KVRAY_*`
environment variables and command-line flags into a `ClusterConfig`.

Every key is a field of `ClusterConfig`, `AutoscalingConfig`, `WorkerConfig` or
`SchedulerConfig` (or `cache_dir`), taken flat; `settings()` lists them with their types and
help, for the CLI and the docs. Nothing else in kvray reads kvray's settings from `os.environ`;
the other programs' variables read elsewhere are listed in docs/architecture.md ("Config").
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvray.cluster.autoscaling_policy import AutoscalingConfig
from kvray.cluster.placement import ROUTING_POLICIES
from kvray.workers.config import (
    EngineConfig,
    SchedulerConfig,
    WorkerConfig,
    field_names,
    pick,
    setting,
)

ENV_PREFIX = "KVRAY_"
ZMQ_TRANSPORTS = ("tcp://", "ipc://", "inproc://")
# Kubernetes gives a pod `<SERVICE>_PORT=tcp://<cluster IP>:<port>` for every Service in its
# namespace (service links): for Services named kvray, kvray-http and kvray-health these are
# KVRAY_PORT, KVRAY_HTTP_PORT and KVRAY_HEALTH_PORT, names of kvray settings.
SERVICE_LINK = re.compile(r"(tcp|udp|sctp)://\S+:\d+")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterConfig:
    """The serving cluster. `load` takes every field of the nested configs as a flat key."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    replicas: int = setting(
        1, "worker actors started at launch (min/max_replicas bound them later)"
    )
    host: str = setting("0.0.0.0", "gRPC listen address")
    port: int = setting(50051, "gRPC port (0 picks a free one)")
    http_port: int = setting(
        8000, "OpenAI-compatible HTTP port, also /metrics and /health (0: off)"
    )
    http_request_timeout_s: float | None = setting(
        None,
        "longest an HTTP request may take, seconds (504 after it; a request's X-Request-Timeout "
        "may only shorten it)",
    )
    http_read_timeout_s: float = setting(
        30.0, "an HTTP request's headers, then its body, must each arrive within this, seconds"
    )
    max_connections: int = setting(
        4096, "open connections each API port holds (gRPC, HTTP); past it new ones are closed"
    )
    ray_address: str | None = setting(None, "join this Ray cluster instead of starting a local one")
    max_queued_requests: int = setting(
        256, "waiting sequences (n samples count n) before RESOURCE_EXHAUSTED"
    )
    cpus_per_replica: float = setting(
        1.0,
        "Ray CPUs (and torch threads) per CPU worker actor: per rank at tensor_parallel_size > 1",
    )
    gpus_per_replica: float | None = setting(
        None,
        "Ray GPUs per worker actor, per rank at tensor_parallel_size > 1 (default: 1 when the "
        "Ray cluster has GPUs, else 0)",
    )
    placement_timeout_s: float = setting(
        300.0,
        "seconds Ray may take to place a replica of several worker actors (tensor_parallel_size "
        "> 1) before its start fails, naming the resources it asked for",
    )
    health_check_period_s: float = setting(5.0, "seconds between health pings of ready replicas")
    rebalance_period_s: float = setting(
        0.25, "queued requests move to less busy replicas this often, seconds (0: never)"
    )
    shutdown_timeout_s: float = setting(30.0, "on SIGTERM, seconds running streams get to finish")
    tls_cert_file: str | None = setting(
        None, "server certificate chain (PEM): gRPC and HTTP speak TLS (re-read when it changes)"
    )
    tls_key_file: str | None = setting(None, "the server certificate's private key (PEM)")
    tls_client_ca_file: str | None = setting(
        None, "CA (PEM) that signs client certificates: mutual TLS, clients must present one"
    )
    auth_token_file: str | None = setting(
        None, "bearer tokens, one per line (`TOKEN [MAX_CONCURRENT_REQUESTS]`); re-read on change"
    )
    health_port: int | None = setting(
        None, "a plaintext gRPC port serving only grpc.health.v1 (for probes when TLS is on)"
    )
    served_model_name: str | None = setting(
        None, "the model's name in the HTTP API and in metrics (default: model)"
    )
    fake_step_ms: float = setting(
        20.0, "model fake only (scripted tokens, no model): milliseconds per step"
    )
    fake_token_ms: float = setting(
        0.0,
        "model fake only: milliseconds per token a step computes, added to fake_step_ms "
        "(prompt tokens served from the prefix cache are not computed)",
    )
    routing: str = setting(
        "cache-aware",
        "cache-aware: a request goes where its first token comes soonest, counting the prompt "
        "blocks each replica's prefix cache holds; least-loaded: where the least work is queued",
    )
    # KV cache events: vLLM's KVEventsConfig names, prefixed (its `endpoint`, `topic`, ...)
    kv_events_endpoint: str | None = setting(
        None,
        "publish each replica's KV cache events in vLLM's format on this ZMQ endpoint "
        "(tcp://*:5557 binds, tcp://host:5557 connects; none: off; needs the kv-events extra)",
    )
    kv_events_topic: str = setting(
        "kv@{replica_id}@{model}",
        "ZMQ topic of a replica's events; {replica_id}, {model} filled in",
    )
    kv_events_replay_endpoint: str | None = setting(
        None, "ZMQ endpoint (bound) where subscribers ask for missed event batches by number"
    )
    kv_events_buffer_steps: int = setting(10_000, "event batches kept for replay")

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535] (0: any free port), got {self.port}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.health_port is not None and not 0 <= self.health_port < 65536:
            raise ValueError(f"health_port must be in [0, 65535], got {self.health_port}")
        if not 0 <= self.http_port < 65536:
            raise ValueError(f"http_port must be in [0, 65535] (0: off), got {self.http_port}")
        if self.http_request_timeout_s is not None and self.http_request_timeout_s <= 0:
            raise ValueError(
                f"http_request_timeout_s must be > 0, got {self.http_request_timeout_s}"
            )
        if self.http_read_timeout_s <= 0 or self.max_connections < 1:
            raise ValueError(
                "http_read_timeout_s must be > 0 and max_connections >= 1, got "
                f"{self.http_read_timeout_s} and {self.max_connections}"
            )
        if self.fake_token_ms < 0:
            raise ValueError(f"fake_token_ms must be >= 0, got {self.fake_token_ms}")
        if self.routing not in ROUTING_POLICIES:
            raise ValueError(
                f"routing must be one of {', '.join(ROUTING_POLICIES)}, got {self.routing!r}"
            )
        if self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be >= 1, got {self.max_queued_requests}")
        if self.rebalance_period_s < 0:
            raise ValueError(
                f"rebalance_period_s must be >= 0 (0: off), got {self.rebalance_period_s}"
            )
        if self.cpus_per_replica < 0 or (self.gpus_per_replica or 0) < 0:
            raise ValueError("cpus_per_replica and gpus_per_replica must be >= 0")
        if self.placement_timeout_s <= 0:
            raise ValueError(f"placement_timeout_s must be > 0, got {self.placement_timeout_s}")
        if self.model == "fake" and self.engine.worker.world_size > 1:
            worker = self.engine.worker
            raise ValueError(
                "model fake (scripted tokens) runs at tensor_parallel_size 1 and "
                f"pipeline_parallel_size 1 only, got {worker.tensor_parallel_size} and "
                f"{worker.pipeline_parallel_size}"
            )
        self._check_kv_events()
        low, high = self.autoscaling.bounds(self.replicas)
        if not low <= self.replicas <= high:
            raise ValueError(
                f"replicas={self.replicas} must be within [min_replicas, max_replicas] = [{low}, {high}]"
            )

    def _check_kv_events(self) -> None:
        endpoints = {
            "kv_events_endpoint": self.kv_events_endpoint,
            "kv_events_replay_endpoint": self.kv_events_replay_endpoint,
        }
        for key, endpoint in endpoints.items():
            if endpoint is not None and not endpoint.startswith(ZMQ_TRANSPORTS):
                raise ValueError(
                    f"{key} must start with {', '.join(ZMQ_TRANSPORTS)}, got {endpoint!r}"
                )
        if self.kv_events_replay_endpoint is not None and self.kv_events_endpoint is None:
            raise ValueError("kv_events_replay_endpoint needs kv_events_endpoint")
        if self.kv_events_buffer_steps < 1:
            raise ValueError(
                f"kv_events_buffer_steps must be >= 1, got {self.kv_events_buffer_steps}"
            )
        try:
            self.kv_events_topic.format(replica_id="", model="")
        except (KeyError, IndexError, ValueError):
            raise ValueError(
                f"kv_events_topic may name only {{replica_id}} and {{model}}, got "
                f"{self.kv_events_topic!r}"
            ) from None

    @property
    def model(self) -> str:
        return self.engine.worker.model

    @property
    def model_name(self) -> str:
        """What clients call the model (HTTP `model`, metrics' `model_name`)."""
        return self.served_model_name or self.model


@dataclass(frozen=True)
class Setting:
    """One flat config key: its type (a type hint), default and help text."""

    name: str
    hint: Any
    default: Any
    help: str


def settings() -> dict[str, Setting]:
    """Every flat key `load` accepts, in a stable order (engine, cluster, autoscaling)."""
    found: dict[str, Setting] = {}
    for cls in (WorkerConfig, SchedulerConfig, EngineConfig, ClusterConfig, AutoscalingConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "help" in f.metadata:
                found[f.name] = Setting(f.name, hints[f.name], f.default, f.metadata["help"])
    return found


def load(
    flags: Mapping[str, Any] | None = None,
    *,
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ClusterConfig:
    """Merge, lowest precedence first: defaults, the YAML file (`config_file`, or the file named by
    `KVRAY_CONFIG`), `KVRAY_<KEY>` environment variables, then `flags` (None values are skipped).
    Text values (environment, command line) are parsed as the key's type. `KVRAY_*` variables
    that are not settings, and Kubernetes service links in a setting's place (`KVRAY_PORT=
    tcp://10.0.0.1:50051`), are ignored with a warning.

    Raises:
        ValueError: an unknown key in the file or the flags, a value of the wrong type, or one
            out of range.
    """
    environ = os.environ if environ is None else environ
    known = settings()
    merged: dict[str, Any] = {}
    ignored: list[str] = []
    path = config_file or environ.get(f"{ENV_PREFIX}CONFIG")
    if path:
        merged.update(_read_yaml(Path(path)))
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX) and name != f"{ENV_PREFIX}CONFIG":
            key = name[len(ENV_PREFIX) :].lower()
            if key not in known:
                ignored.append(name)
            elif name.endswith("_PORT") and SERVICE_LINK.fullmatch(value):
                _warn_service_link(name)
            else:
                merged[key] = _parse(name, value, known[key].hint)
    if ignored:
        # NOTE: not an error: Kubernetes adds service-link variables (KVRAY_GRPC_PORT=tcp://...)
        # for a Service named kvray-*, and ./dev reads KVRAY_TORCH_INDEX.
        logger.warning(
            "ignoring environment variable(s) %s: not kvray settings", ", ".join(sorted(ignored))
        )
    for key, value in (flags or {}).items():
        if value is not None:
            merged[key] = value
            if isinstance(value, str) and key in known:
                merged[key] = _parse(f"--{key.replace('_', '-')}", value, known[key].hint)
    unknown = set(merged) - set(known)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(known))}"
        )
    cluster_keys = field_names(ClusterConfig) - {"engine", "autoscaling"}
    scaling_keys = field_names(AutoscalingConfig)
    engine = EngineConfig.from_kwargs(
        **{k: v for k, v in merged.items() if k not in cluster_keys | scaling_keys}
    )
    return ClusterConfig(
        engine=engine,
        autoscaling=AutoscalingConfig(**pick(merged, AutoscalingConfig)),
        **{k: v for k, v in merged.items() if k in cluster_keys},
    )


def _warn_service_link(name: str) -> None:
    service = name.removesuffix("_PORT").lower().replace("_", "-")
    logger.warning(
        "ignoring environment variable %s: its value is a Kubernetes service link (for a "
        "Service named %s), not a setting (set enableServiceLinks: false on the pod)",
        name,
        service,
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _parse(name: str, value: str, hint: Any) -> Any:
    """Parse a setting's text (environment variable or flag) as the field's type."""
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
