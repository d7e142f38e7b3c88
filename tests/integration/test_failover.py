"""A worker process killed mid-stream: every stream completes with exactly the uninterrupted
tokens, and the dead replica is replaced."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvray.client import KvrayClient
from tests.integration.conftest import act_mid_stream, start_cluster, wait_for

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
        pids = {
            r.replica_id: ray_session.get(r.actor.__ray_call__.remote(lambda _: os.getpid()))
            for r in cluster.run(lambda: cluster.router.pool.ready())
        }

        def kill(replica) -> str:
            # NOTE: SIGKILL, not ray.kill: the process is gone when this returns, so it cannot
            # step on to the end of the sequence that was found mid-stream.
            os.kill(pids[replica.replica_id], signal.SIGKILL)
            return replica.replica_id

        # The replica running the seeded stream dies once that stream has streamed a token.
        killed = act_mid_stream(cluster, kill, request_id="seeded")
        with ThreadPoolExecutor(len(PROMPTS) + 1) as pool:
            futures = [pool.submit(client.generate, p, **params) for p in PROMPTS]
            futures.append(pool.submit(client.generate, PROMPTS[0], request_id="seeded", **seeded))
            results = [f.result(timeout=300).token_ids for f in futures]
        victim_id = killed.result(timeout=60)

        assert cluster.run(lambda: cluster.router.dispatcher.num_moved_requests) > 0
        assert results[:-1] == expected
        assert results[-1] == expected_seeded
        # The dead replica is gone and a replacement serves.
        wait_for(
            lambda: sum(r.state == "READY" for r in client.status().replicas) == 2, timeout=120
        )
        assert victim_id not in {r.replica_id for r in client.status().replicas}
        assert sum(r.kv_blocks_used for r in client.status().replicas) == 0
