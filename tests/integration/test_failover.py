"""A worker actor killed mid-stream: every stream completes with exactly the uninterrupted tokens,
and the dead replica is replaced."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvray.client import KvrayClient
from tests.integration.conftest import start_cluster, stream_tokens, wait_for

pytestmark = pytest.mark.ray

PROMPTS = [
    "Hello, world!",
    "The quick brown fox",
    "Once upon a time",
    "def f(x):",
    "日本語",
    "Café",
]


def test_killed_worker_streams_continue_exactly(ray_session, model_cache_dir):
    params = {"temperature": 0, "max_tokens": 160, "ignore_eos": True}
    seeded = {"temperature": 0.9, "seed": 3, "max_tokens": 160, "ignore_eos": True}
    with (
        start_cluster(model_cache_dir, replicas=2) as cluster,
        KvrayClient(cluster.target) as client,
    ):
        expected = [client.generate(p, **params).token_ids for p in PROMPTS]
        expected_seeded = client.generate(PROMPTS[0], **seeded).token_ids

        started = threading.Barrier(len(PROMPTS) + 2)

        def stream(prompt, kwargs):
            return stream_tokens(client, prompt, started, **kwargs)

        with ThreadPoolExecutor(len(PROMPTS) + 1) as pool:
            futures = [pool.submit(stream, p, params) for p in PROMPTS]
            futures.append(pool.submit(stream, PROMPTS[0], seeded))
            started.wait(timeout=60)  # every stream has its first tokens
            busiest = cluster.run(
                lambda: max(
                    cluster.router.pool.ready(), key=lambda r: r.engine.scheduler.num_running
                )
            )
            victim_id = busiest.replica_id
            assert cluster.run(lambda: busiest.engine.scheduler.num_running) > 0
            ray_session.kill(busiest.actor, no_restart=True)
            results = [f.result(timeout=300) for f in futures]

        assert cluster.run(lambda: cluster.router.dispatcher.num_moved_requests) > 0
        assert results[:-1] == expected
        assert results[-1] == expected_seeded
        # The dead replica is gone and a replacement serves.
        wait_for(
            lambda: sum(r.state == "READY" for r in client.status().replicas) == 2, timeout=120
        )
        assert victim_id not in {r.replica_id for r in client.status().replicas}
        assert sum(r.kv_blocks_used for r in client.status().replicas) == 0
