"""Where a worker becomes a Ray actor: the actor class, its resources and the spawner.

The only module that puts `ModelWorker` (or the fake worker) behind Ray. The actor forwards
`warmup`, `step` and `health` to the worker it builds from a picklable factory.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from typing import Any

from kvray.cluster.config import ClusterConfig
from kvray.workers.protocol import StepInput, WorkerInfo

FAKE_MODEL = "fake"  # scripted tokens, no model: load-tests the router, gRPC and Ray


def make_worker_actor_class() -> Any:
    """The Ray actor class (built lazily, so importing this module needs no Ray)."""
    import ray

    # NOTE: health checks get their own concurrency group (their own thread), so a long
    # prefill in `step` never makes a replica look dead.
    @ray.remote(concurrency_groups={"health": 1})  # type: ignore[call-overload]
    class WorkerActor:
        def __init__(self, factory: Callable[[], Any]) -> None:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # server logs, not a terminal: no tqdm bars
            self.worker = factory()

        def warmup(self) -> WorkerInfo:
            return self.worker.warmup()

        def step(self, step_input: StepInput) -> Any:
            return self.worker.step(step_input)

        @ray.method(concurrency_group="health")
        def health(self) -> bool:
            return self.worker.health()

    return WorkerActor


def actor_options(config: ClusterConfig, *, cluster_gpus: float) -> dict[str, Any]:
    """Ray resources for one worker actor: a GPU when the cluster has them, else CPUs."""
    gpus = config.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if cluster_gpus >= 1 else 0.0
    options: dict[str, Any] = {"num_cpus": config.cpus_per_replica, "num_gpus": gpus}
    if gpus == 0:
        # A CPU worker uses as many torch threads as the CPUs it asked for.
        threads = max(1, int(config.cpus_per_replica))
        options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(threads)}}
    return options


def worker_factory(config: ClusterConfig) -> Callable[[], Any]:
    """A picklable `() -> worker` for the configured model (the fake one for `fake`)."""
    if config.model == FAKE_MODEL:
        from kvray.workers.fake import FakeWorker

        return functools.partial(
            FakeWorker.from_config,
            config.engine,
            step_delay_s=config.fake_step_ms / 1000,
            token_delay_s=config.fake_token_ms / 1000,
        )
    from kvray.workers.worker import ModelWorker

    return functools.partial(ModelWorker, config.engine)


def ray_spawner(config: ClusterConfig) -> Callable[[str], Any]:
    """`spawn(replica_id)` -> a worker actor with the config's resources. Needs Ray running."""
    import ray

    actor_cls = make_worker_actor_class()
    options = actor_options(config, cluster_gpus=ray.cluster_resources().get("GPU", 0.0))
    if config.model == FAKE_MODEL:
        options["num_gpus"] = 0
    factory = worker_factory(config)
    suffix = uuid.uuid4().hex[:6]

    def spawn(replica_id: str) -> Any:
        return actor_cls.options(name=f"kvray-{replica_id}-{suffix}", **options).remote(factory)

    return spawn


def ray_kill(actor: Any) -> None:
    import ray

    ray.kill(actor, no_restart=True)
