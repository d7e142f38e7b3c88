"""kvray as a Ray Serve application, for KubeRay's RayService (`import_path: kvray.cluster.serve_app:app`).

One Serve replica hosts the whole router: its gRPC server listens on `port` inside that replica
(no Ray hop per token), and it creates the worker actors itself. Serve deploys it, restarts it
when `check_health` fails, and upgrades it. Its HTTP route answers with the cluster status.

`app` is an application builder: Serve calls it with the config's `args`, which are kvray
settings (the same keys as the YAML file, `KVRAY_*` and `kvray serve` flags), plus `config`
for a YAML file path.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ray import serve

from kvray.cluster.config import ClusterConfig, load
from kvray.cluster.launcher import Cluster

ROUTER_RESOURCE = "kvray-router"  # a custom resource on the pod whose Service exposes gRPC
SERVE_PROXY_PORT = 8000  # Ray Serve's HTTP proxy (on KubeRay's head pod, and serve.run's default)


@serve.deployment(
    num_replicas=1,
    max_ongoing_requests=100,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=60,
)
class KvrayRouter:
    async def __init__(self, config: ClusterConfig) -> None:  # type: ignore[misc]  # Serve awaits it
        self.cluster = Cluster(config)
        await self.cluster.start()

    async def check_health(self) -> None:
        """Liveness only. A router waiting for worker replicas (a GPU pod being provisioned, a
        failover) is healthy: Serve would restart it after a few failed checks, killing its
        workers and every stream. Whether it can take requests is its gRPC health status,
        which the readiness probe reads."""
        router = self.cluster.router
        if router is None or router.is_closing:
            raise RuntimeError("the kvray router is not running")

    async def __call__(self, request: Any) -> dict[str, Any]:
        assert self.cluster.router is not None
        return dataclasses.asdict(self.cluster.router.status())

    async def __del__(self) -> None:
        await self.cluster.stop()


def app(args: dict[str, Any] | None = None) -> Any:
    """Build the application from Serve `args` (kvray settings). Raises ValueError on bad ones."""
    settings = dict(args or {})
    config_file = settings.pop("config", None)
    config = load(settings, config_file=config_file)
    if config.http_port == SERVE_PROXY_PORT:
        raise ValueError(
            f"http_port {SERVE_PROXY_PORT} is Ray Serve's own HTTP proxy port; set http_port to "
            "another port (the KubeRay manifests use 8080) or to 0 to turn kvray's HTTP off"
        )
    options: dict[str, Any] = {"num_cpus": 0}
    if _has_router_resource():  # pin the router to the pod that its Service selects
        options["resources"] = {ROUTER_RESOURCE: 1}
    return KvrayRouter.options(ray_actor_options=options).bind(config)  # type: ignore[attr-defined]


def _has_router_resource() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get(ROUTER_RESOURCE, 0) >= 1
