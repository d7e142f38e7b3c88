"""Autoscaling on a local Ray cluster: a step load (fake model) grows and shrinks the replica
count with no failed or altered stream, and the queue moves to the new replica; a drain past its
timeout moves part-streamed requests exactly (tiny model); with min_replicas 0 an idle cluster
goes to zero and the next request still gets its answer."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvray.client import KvrayClient
from tests.integration.conftest import act_mid_stream, start_cluster, wait_for

pytestmark = pytest.mark.ray

GREEDY = {"temperature": 0, "max_tokens": 16, "ignore_eos": True}
PROMPTS = ["Hello, world!", "The quick brown fox", "Once upon a time", "def f(x):"]


def ready_count(client) -> int:
    return sum(r.state == "READY" for r in client.status().replicas)


def test_step_load_scales_up_and_back_down_without_losing_tokens(ray_session, model_cache_dir):
    # Fake model, 50 ms steps: two blockers of 4,000 tokens hold the first replica's two
    # slots for 200 s at the very least, so the burst behind them can only wait in its queue.
    settings = dict(
        model="fake", fake_step_ms=50, max_model_len=4096, max_num_seqs=2, replicas=1,
        min_replicas=1, max_replicas=2, target_ongoing_requests=4, upscale_delay_s=1.0,
        downscale_delay_s=3.0, metrics_interval_s=0.25,
    )  # fmt: skip
    with (
        start_cluster(model_cache_dir, **settings) as cluster,
        KvrayClient(cluster.target) as client,
        ThreadPoolExecutor(16) as pool,
    ):
        replies = pool.map(lambda p: client.generate(p, **GREEDY).token_ids, PROMPTS)
        expected = dict(zip(PROMPTS, replies))
        blockers = [client.stream(p, max_tokens=4000, ignore_eos=True) for p in PROMPTS[:2]]
        for blocker in blockers:
            next(blocker)  # running: it holds one of the two slots
        # The step up: 2 running + 8 queued = 10 ongoing, 2.5 replicas' worth. The autoscaler
        # adds a replica only after more than 4 ongoing for a second, so at least 3 requests
        # wait behind the blockers when the second replica becomes ready: some must move to it.
        burst = [pool.submit(client.generate, PROMPTS[i % 4], **GREEDY) for i in range(8)]
        wait_for(lambda: ready_count(client) == 2, timeout=120, interval=0.2)
        peak = ready_count(client)
        moved = client.status().num_rebalanced_requests  # moved as it became ready

        # The step down: the blockers go (what still waits behind them runs); one request at a
        # time keeps coming while the cluster shrinks, and after.
        for blocker in blockers:
            blocker.close()
        done = [f.result(timeout=120).token_ids for f in burst]
        stop = threading.Event()
        results: list[bool] = []
        errors: list[Exception] = []

        def trickle() -> None:
            i = 0
            while not stop.is_set():
                prompt = PROMPTS[i % len(PROMPTS)]
                i += 1
                try:
                    results.append(client.generate(prompt, **GREEDY).token_ids == expected[prompt])
                except Exception as exc:
                    errors.append(exc)

        trickling = pool.submit(trickle)
        try:
            wait_for(lambda: len(client.status().replicas) == 1, timeout=120, interval=0.2)
            served = len(results)
            wait_for(lambda: len(results) >= served + 2, timeout=60)  # the one replica answers
        finally:
            stop.set()
        trickling.result(timeout=60)

        wait_for(lambda: sum(r.kv_blocks_used for r in client.status().replicas) == 0)
        status = client.status()
    assert done == [expected[PROMPTS[i % 4]] for i in range(8)]
    assert not errors, errors[:3]
    assert all(results), f"{results.count(False)} altered streams"
    assert peak == 2 and moved > 0
    assert [r.state for r in status.replicas] == ["READY"]
    ups = [d for d in status.recent_decisions if d.to_replicas > d.from_replicas]
    downs = [d for d in status.recent_decisions if d.to_replicas < d.from_replicas]
    assert ups and downs and "ongoing=" in ups[0].reason
    print(
        f"{len(done) + len(results)} requests, {moved} rebalanced, decisions: "
        f"{[(d.from_replicas, d.to_replicas) for d in status.recent_decisions]}"
    )


def test_drain_past_its_timeout_moves_requests_exactly(ray_session, model_cache_dir):
    params = {"temperature": 0, "max_tokens": 150, "ignore_eos": True}
    with (
        start_cluster(model_cache_dir, replicas=2) as cluster,
        KvrayClient(cluster.target) as client,
    ):
        expected = [client.generate(p, **params).token_ids for p in PROMPTS]
        # A replica found running a part-streamed sequence drains with no time to finish: its
        # requests move at once, in the same turn of the router's loop.
        drained = act_mid_stream(cluster, lambda replica: drain_now(cluster, replica))
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            futures = [pool.submit(client.generate, p, **params) for p in PROMPTS]
            results = [f.result(timeout=300).token_ids for f in futures]
        victim_id = drained.result(timeout=60)
        assert results == expected
        status = client.status()
        assert status.num_moved_requests > 0
        # Only the other replica is left, still taking requests.
        assert [(r.replica_id == victim_id, r.state) for r in status.replicas] == [(False, "READY")]


async def drain_now(cluster, replica) -> str:
    await cluster.router.pool.drain(replica, 0.0)  # time out at once: move them
    return replica.replica_id


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
