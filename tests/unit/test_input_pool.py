"""The input pool's order: the cheapest job first, small jobs never behind a large one in
progress, cancelled jobs never run, errors reach the caller. Jobs block on events, so nothing
here depends on the machine's speed."""

from __future__ import annotations

import asyncio
import threading

import pytest

from kvray.cluster.input_pool import InputPool

SMALL = 100


class Gate:
    """A job that says when it started and waits until it is opened."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.opened = threading.Event()

    def __call__(self) -> str:
        self.started.set()
        assert self.opened.wait(timeout=60)
        return "gate"


async def started(gate: Gate) -> None:
    assert await asyncio.to_thread(gate.started.wait, 60)


def test_queued_jobs_run_cheapest_first():
    pool, ran = InputPool(small_cost=SMALL), []

    async def scenario():
        gate = Gate()
        first = asyncio.create_task(pool.run(gate, cost=10_000))
        await started(gate)  # the large-job thread is busy; the rest queue
        jobs = [
            asyncio.create_task(pool.run(lambda c=cost: ran.append(c), cost=cost))
            for cost in (900, 500, 700, 5_000)
        ]
        await asyncio.sleep(0)  # every job queued before the gate opens
        gate.opened.set()
        await asyncio.gather(first, *jobs)

    asyncio.run(scenario())
    assert ran == [500, 700, 900, 5_000]
    pool.close()


def test_a_small_job_runs_while_a_large_one_is_in_progress_and_others_wait():
    pool = InputPool(small_cost=SMALL)

    async def scenario():
        gate = Gate()
        large = [asyncio.create_task(pool.run(gate, cost=10_000)) for _ in range(3)]
        await started(gate)
        small = await asyncio.wait_for(pool.run(lambda: "small", cost=SMALL), timeout=60)
        waiting = sum(not task.done() for task in large)
        gate.opened.set()
        return small, waiting, await asyncio.gather(*large)

    small, waiting, large = asyncio.run(scenario())
    assert small == "small" and waiting == 3 and large == ["gate"] * 3
    pool.close()


def test_a_cancelled_job_never_runs():
    pool, ran = InputPool(small_cost=SMALL), []

    async def scenario():
        gate = Gate()
        first = asyncio.create_task(pool.run(gate, cost=10_000))
        await started(gate)
        cancelled = asyncio.create_task(pool.run(lambda: ran.append("cancelled"), cost=5_000))
        await asyncio.sleep(0)  # queued
        cancelled.cancel()
        after = asyncio.create_task(pool.run(lambda: ran.append("after"), cost=6_000))
        await asyncio.sleep(0)
        gate.opened.set()
        await asyncio.gather(first, after)
        return cancelled.cancelled()

    assert asyncio.run(scenario())
    assert ran == ["after"]
    pool.close()


def test_a_jobs_error_reaches_its_caller_and_the_threads_go_on():
    pool = InputPool(small_cost=SMALL)

    def fail() -> None:
        raise ValueError("bad prompt")

    async def scenario():
        for cost in (1, 1_000):
            with pytest.raises(ValueError, match="bad prompt"):
                await pool.run(fail, cost=cost)
        return await pool.run(lambda: "fine", cost=1), await pool.run(lambda: "too", cost=1_000)

    assert asyncio.run(scenario()) == ("fine", "too")
    pool.close()


def test_closing_cancels_queued_jobs_and_refuses_new_ones():
    pool = InputPool(small_cost=SMALL)

    async def scenario():
        gate = Gate()
        first = asyncio.create_task(pool.run(gate, cost=10_000))
        await started(gate)
        queued = asyncio.create_task(pool.run(lambda: "never", cost=5_000))
        await asyncio.sleep(0)
        pool.close()
        gate.opened.set()
        with pytest.raises(asyncio.CancelledError):
            await queued
        with pytest.raises(RuntimeError, match="closed"):
            await pool.run(lambda: None, cost=1)
        return await first  # the job in progress finishes

    assert asyncio.run(scenario()) == "gate"
