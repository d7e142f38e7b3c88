"""Fixtures for tests on a real local Ray cluster with real gRPC over loopback."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the test session (4 logical CPUs: two replicas plus a replacement)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(
            address="local",  # never a cluster left behind by another test or a `ray start`
            num_cpus=4,
            namespace="kvray-tests",
            include_dashboard=False,
            log_to_driver=False,
        )
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


def stream_tokens(client, prompt, started, **params) -> list[int]:
    """Stream one request's tokens, waiting at the barrier `started` after its first chunk, so
    a test can act (kill, drain) while every stream is running."""
    chunks = client.stream(prompt, **params)
    tokens = list(next(chunks).token_ids)
    started.wait(timeout=60)
    for chunk in chunks:
        tokens.extend(chunk.token_ids)
    return tokens
