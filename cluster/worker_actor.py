"""Where a worker becomes a Ray actor: the actor class, its resources and the spawner.

The only module that puts `ModelWorker` (or the fake worker) behind Ray. The actor forwards
`warmup`, `step` and `health` to the worker it builds from a picklable factory. A replica of
several ranks is one actor a rank, in one placement group (`worker_group.py`).
"""

from __future__ import annotations

import functools
import socket
import uuid
from collections.abc import Callable
from typing import Any

from kvray.cluster.config import ClusterConfig
from kvray.workers.protocol import StepInput, WorkerInfo
from kvray.workers.rank_group import output_rank

FAKE_MODEL = "fake"  # scripted tokens, no model: load-tests the router, gRPC and Ray


def make_worker_actor_class() -> Any:
    """The Ray actor class (built lazily, so importing this module needs no Ray)."""
    import ray

    # NOTE: health checks get their own concurrency group (their own thread), so a long
    # prefill in `step` never makes a replica look dead.
    @ray.remote(concurrency_groups={"health": 1})  # type: ignore[call-overload]
    class WorkerActor:
        def __init__(self, factory: Callable[..., Any], *, is_rank: bool = False) -> None:
            """A rank of a group (`is_rank`) builds its worker in `join`, once it knows where
            the group meets; a lone worker builds it now."""
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # server logs, not a terminal: no tqdm bars
            self.factory = factory
            self.worker: Any = None if is_rank else factory()

        def free_address(self) -> str:
            """A rendezvous for the group, asked of rank 0: this node's IP and a free port."""
            ip = ray.util.get_node_ip_address()
            return f"tcp://{ip}:{free_port(ip)}"

        def join(self, rank: int, init_method: str) -> None:
            """Build this rank's worker: join the group at `init_method`, load its shard."""
            self.worker = self.factory(rank=rank, init_method=init_method)

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
    """`spawn(replica_id)` -> a worker actor with the config's resources, or for a replica of
    several ranks a `WorkerGroup` of them. Needs Ray running.

    Raises:
        ValueError: a group bigger than the local Ray cluster (naming the settings).
    """
    import ray

    actor_cls = make_worker_actor_class()
    options = actor_options(config, cluster_gpus=ray.cluster_resources().get("GPU", 0.0))
    if config.model == FAKE_MODEL:
        options["num_gpus"] = 0
    factory = worker_factory(config)
    suffix = uuid.uuid4().hex[:6]
    if config.engine.worker.world_size > 1:
        return _group_spawner(config, actor_cls, options, factory, suffix)

    def spawn(replica_id: str) -> Any:
        return actor_cls.options(name=f"kvray-{replica_id}-{suffix}", **options).remote(factory)

    return spawn


def _group_spawner(
    config: ClusterConfig,
    actor_cls: Any,
    options: dict[str, Any],
    factory: Callable[..., Any],
    suffix: str,
) -> Callable[[str], Any]:
    """`spawn(replica_id)` -> a `WorkerGroup` in one placement group (`group_bundles`)."""
    from ray.util import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from kvray.cluster.worker_group import WorkerGroup

    worker = config.engine.worker
    world, tp = worker.world_size, worker.tensor_parallel_size
    bundle = {"CPU": float(options["num_cpus"]), "GPU": float(options["num_gpus"])}
    bundle = {k: v for k, v in bundle.items() if v > 0}
    if not bundle:
        raise ValueError(
            "a replica of several ranks (tensor_parallel_size x pipeline_parallel_size > 1) "
            "needs cpus_per_replica or gpus_per_replica above 0: Ray places a replica's ranks "
            "by the resources they ask for"
        )
    if not config.ray_address:
        _check_fits_local_ray(config, bundle)
    bundles, strategy = group_bundles(bundle, tp, worker.pipeline_parallel_size)
    ranks_a_bundle = world // len(bundles)

    def spawn(replica_id: str) -> Any:
        name = f"kvray-{replica_id}-{suffix}"
        group = placement_group(bundles, strategy=strategy, name=name)
        actors = [
            actor_cls.options(
                name=f"{name}-rank{rank}",
                **options,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=rank // ranks_a_bundle
                ),
            ).remote(factory, is_rank=True)
            for rank in range(world)
        ]
        return WorkerGroup(
            replica_id,
            actors,
            group,
            bundles=bundles,
            strategy=strategy,
            placement_timeout_s=config.placement_timeout_s,
            output_rank=output_rank(tp, worker.pipeline_parallel_size),
        )

    return spawn


def group_bundles(
    bundle: dict[str, float], tensor_parallel_size: int, pipeline_parallel_size: int
) -> tuple[list[dict[str, float]], str]:
    """A replica's placement group: its bundles (rank order; one rank's resources `bundle`)
    and strategy. One stage: a bundle a rank, all on one node (STRICT_PACK: tensor-parallel
    ranks talk every layer). Several stages: a bundle a stage, its tensor-parallel ranks'
    resources together, since Ray never splits a bundle over nodes; PACK: all on one node
    where one holds them, else stages on several (stages talk twice a step: hidden states
    forward, tokens back)."""
    if pipeline_parallel_size == 1:
        return [bundle] * tensor_parallel_size, "STRICT_PACK"
    stage = {k: v * tensor_parallel_size for k, v in bundle.items()}
    return [stage] * pipeline_parallel_size, "PACK"


def _check_fits_local_ray(config: ClusterConfig, bundle: dict[str, float]) -> None:
    """A Ray cluster kvray started on this machine never grows: refuse a group it cannot hold.

    Raises:
        ValueError: naming tensor_parallel_size and what one node has.
    """
    import ray

    world = config.engine.worker.world_size
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(all(world * v <= node.get(k, 0.0) for k, v in bundle.items()) for node in nodes):
        return
    worker = config.engine.worker
    largest = {k: max((node.get(k, 0.0) for node in nodes), default=0.0) for k in bundle}
    raise ValueError(
        f"tensor_parallel_size {worker.tensor_parallel_size} x pipeline_parallel_size "
        f"{worker.pipeline_parallel_size} ranks of {bundle} each need "
        f"{ {k: world * v for k, v in bundle.items()} } on one node; this Ray cluster's largest "
        f"node has {largest} (lower tensor_parallel_size, or cpus_per_replica / "
        "gpus_per_replica, which each rank asks for)"
    )


def free_port(host: str) -> int:
    """A TCP port free on `host` now (taken by the group's rendezvous a moment later)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ray_kill(actor: Any) -> None:
    """Stop a worker actor, or every rank of a `WorkerGroup`."""
    import ray

    from kvray.cluster.worker_group import WorkerGroup

    if isinstance(actor, WorkerGroup):
        actor.kill()
        return
    ray.kill(actor, no_restart=True)
