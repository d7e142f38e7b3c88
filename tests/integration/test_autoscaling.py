"""Autoscaling on a local Ray cluster with the tiny model: a step load grows and shrinks the
replica count with no failed or altered stream; drains past their timeout move requests; with
min_replicas 0 an idle cluster goes to zero and the next request still gets its answer."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvray.client import KvrayClient
from tests.integration.conftest import start_cluster, stream_tokens, wait_for

pytestmark = pytest.mark.ray

GREEDY = {"temperature": 0, "max_tokens": 48, "ignore_eos": True}
PROMPTS = ["Hello, world!", "The quick brown fox", "Once upon a time", "def f(x):"]


def ready_count(client) -> int:
    return sum(r.state == "READY" for r in client.status().replicas)


def test_step_load_scales_up_and_back_down_without_losing_tokens(ray_session, model_cache_dir):
    settings = dict(
        replicas=1, min_replicas=1, max_replicas=3, target_ongoing_requests=4,
        upscale_delay_s=1.0, downscale_delay_s=3.0, metrics_interval_s=0.25, max_num_seqs=8,
    )  # fmt: skip
    with (
        start_cluster(model_cache_dir, **settings) as cluster,
        KvrayClient(cluster.target) as client,
    ):
        expected = {p: client.generate(p, **GREEDY).token_ids for p in PROMPTS}
        concurrency = [1]
        stop = threading.Event()
        results, errors, peak = [], [], [0]
        lock = threading.Lock()

        def worker(slot: int) -> None:
            i = slot
            while not stop.is_set():
                if slot >= concurrency[0]:
                    time.sleep(0.05)
                    continue
                prompt = PROMPTS[i % len(PROMPTS)]
                i += 1
                try:
                    tokens = client.generate(prompt, **GREEDY).token_ids
                    with lock:
                        results.append(tokens == expected[prompt])
                except Exception as exc:
                    with lock:
                        errors.append(exc)

        with ThreadPoolExecutor(32) as pool:
            for slot in range(32):
                pool.submit(worker, slot)
            time.sleep(1.0)
            concurrency[0] = 32
            wait_for(lambda: ready_count(client) >= 2, timeout=120, interval=0.2)
            peak[0] = ready_count(client)
            served = len(results)  # full load on the grown cluster, for 40 more requests
            wait_for(lambda: len(results) >= served + 40, timeout=120, interval=0.1)
            concurrency[0] = 1
            wait_for(lambda: len(client.status().replicas) == 1, timeout=120, interval=0.2)
            time.sleep(1.0)
            stop.set()

        status = client.status()
        assert not errors, errors[:3]
        assert all(results), f"{results.count(False)} altered streams"
        assert peak[0] >= 2
        assert [r.state for r in status.replicas] == ["READY"]
        ups = [d for d in status.recent_decisions if d.to_replicas > d.from_replicas]
        downs = [d for d in status.recent_decisions if d.to_replicas < d.from_replicas]
        assert ups and downs and "ongoing=" in ups[0].reason
        assert sum(r.kv_blocks_used for r in status.replicas) == 0
        # 24 requests were queued on the first replica when the second became ready: some moved.
        assert status.num_rebalanced_requests > 0
        print(
            f"{len(results)} requests, peak {peak[0]} replicas, {status.num_rebalanced_requests} "
            f"rebalanced, decisions: {[(d.from_replicas, d.to_replicas) for d in status.recent_decisions]}"
        )


def test_drain_past_its_timeout_moves_requests_exactly(ray_session, model_cache_dir):
    params = {"temperature": 0, "max_tokens": 150, "ignore_eos": True}
    with (
        start_cluster(model_cache_dir, replicas=2) as cluster,
        KvrayClient(cluster.target) as client,
    ):
        expected = [client.generate(p, **params).token_ids for p in PROMPTS]
        started = threading.Barrier(len(PROMPTS) + 1)

        def stream(prompt):
            return stream_tokens(client, prompt, started, **params)

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            futures = [pool.submit(stream, p) for p in PROMPTS]
            started.wait(timeout=60)
            victim = cluster.run(
                lambda: max(
                    cluster.router.pool.ready(), key=lambda r: r.engine.scheduler.num_running
                )
            )
            assert cluster.run(lambda: victim.engine.scheduler.num_running) > 0
            cluster.call(cluster.router.pool.drain(victim, 0.0))  # time out at once: move them
            results = [f.result(timeout=300) for f in futures]
        assert results == expected
        status = client.status()
        assert status.num_moved_requests > 0
        # Only the other replica is left, still taking requests.
        assert [(r.replica_id == victim.replica_id, r.state) for r in status.replicas] == [
            (False, "READY")
        ]


def test_scale_to_zero_then_the_next_request_is_answered(ray_session, model_cache_dir):
    settings = dict(
        replicas=1, min_replicas=0, max_replicas=1, downscale_delay_s=1.0, metrics_interval_s=0.25,
    )  # fmt: skip
    with (
        start_cluster(model_cache_dir, **settings) as cluster,
        KvrayClient(cluster.target) as client,
    ):
        first = client.generate("Hello", temperature=0, max_tokens=8, ignore_eos=True)
        wait_for(lambda: not client.status().replicas, timeout=60, interval=0.2)
        assert client.is_serving()  # still takes requests: it will start a replica for them
        start = time.monotonic()
        again = client.generate("Hello", temperature=0, max_tokens=8, ignore_eos=True)
        cold_start_s = time.monotonic() - start
        assert again.token_ids == first.token_ids
        status = client.status()
        assert [r.state for r in status.replicas] == ["READY"]
        assert any(d.reason.startswith("scale from zero") for d in status.recent_decisions)
        print(f"cold start answered in {cold_start_s:.1f}s")
