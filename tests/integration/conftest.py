"""Fixtures for tests on a real local Ray cluster with real gRPC over loopback."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the test session (4 logical CPUs: two replicas plus a replacement)."""
    ray = pytest.importorskip("ray")
    from kvray.cluster.launcher import keep_ray_token_private

    if not ray.is_initialized():
        keep_ray_token_private()  # as `kvray serve` does, before and after Ray writes it
        ray.init(
            address="local",  # never a cluster left behind by another test or a `ray start`
            num_cpus=4,
            namespace="kvray-tests",
            include_dashboard=False,
            log_to_driver=False,
        )
        keep_ray_token_private()
    yield ray
    ray.shutdown()


def start_cluster(model_cache_dir: str, **settings):
    from kvray.cluster.config import load
    from kvray.cluster.launcher import BackgroundCluster

    flags = {"model": "tiny", "host": "127.0.0.1", "port": 0, "http_port": 0, "max_model_len": 256}
    flags.update(settings)
    flags["cache_dir"] = model_cache_dir
    return BackgroundCluster(load(flags, environ={}))


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within timeout")
        time.sleep(interval)


def act_mid_stream(
    cluster, act: Callable[[Any], Any], *, request_id: str | None = None
) -> Future[Any]:
    """Call `act(replica)` on the first ready replica that runs a sequence (of `request_id`, or
    any) which has streamed tokens and has more to come; returns a future of what it returns
    (awaited, when it is a coroutine). Start it before the requests it waits for.

    It looks at every turn of the router's event loop and acts in the turn it finds one, so no
    step output is applied in between: however fast the model, `act` (a kill, a drain) meets
    that sequence unfinished, part streamed.
    """

    def is_mid_stream(replica) -> bool:
        scheduler = replica.engine.scheduler
        return any(
            request_id in (None, seq.request_id)
            and seq.output_token_ids
            and seq.num_output_tokens < (seq.sampling_params.max_tokens or scheduler.max_model_len)
            and seq.num_tokens < scheduler.max_model_len
            for seq in scheduler.running
        )

    async def poll() -> Any:
        while True:
            for replica in cluster.router.pool.ready():
                if is_mid_stream(replica):
                    result = act(replica)
                    return await result if inspect.isawaitable(result) else result
            await asyncio.sleep(0)  # one turn of the loop: a step output may be applied

    return asyncio.run_coroutine_threadsafe(poll(), cluster.loop)


def check_a_killed_rank_fails_its_replica(
    cluster, ray_session, *, rank: int, run: Callable[[Any], list]
) -> None:
    """SIGKILL rank `rank` of the one replica (of several ranks) while the request
    "seeded" streams: the replica fails, every stream finishes elsewhere with the tokens
    `run(client)` gave undisturbed, and a replica of as many ranks replaces it."""
    from kvray.client import KvrayClient

    with KvrayClient(cluster.target) as client:
        expected = run(client)
        (victim,) = cluster.run(lambda: cluster.router.pool.ready())
        num_ranks = len(victim.actor.actors)
        target = victim.actor.actors[rank]
        pid = ray_session.get(target.__ray_call__.remote(lambda _: os.getpid()))

        def kill(replica: Any) -> str:
            os.kill(pid, signal.SIGKILL)
            return replica.replica_id

        killed = act_mid_stream(cluster, kill, request_id="seeded")
        results = run(client)
        victim_id = killed.result(timeout=60)
        assert cluster.run(lambda: cluster.router.dispatcher.num_moved_requests) > 0
        assert results == expected

        def replaced() -> bool:
            replicas = client.status().replicas
            return [(r.state, len(r.ranks)) for r in replicas] == [("READY", num_ranks)]

        wait_for(replaced, timeout=180)
        status = client.status()
        assert victim_id not in {r.replica_id for r in status.replicas}
        assert sum(r.kv_blocks_used for r in status.replicas) == 0
