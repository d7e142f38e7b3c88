"""The input pool: input work (tokenizing, rendering chat templates, replaying resumed tokens)
on two threads, off the event loop, smallest first. It knows each job's cost, not what it does.

One queue, ordered by cost; one thread takes any job, the other only jobs up to `small_cost`.
So a small input never waits for a large one, queued or in progress: a burst of maximal prompts
from one client delays another client's short prompt by at most the small jobs ahead of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(order=True)
class _Job:
    cost: int
    order: int  # among equal costs, first come first served
    fn: Callable[[], Any] = field(compare=False)
    future: asyncio.Future[Any] = field(compare=False)
    loop: asyncio.AbstractEventLoop = field(compare=False)


class InputPool:
    """Runs jobs smallest first on two threads, started with the first job.

    NOTE: a large job waits while smaller ones keep both threads busy; that is the order
    wanted (short prompts first), and only sustained overload of input work starves it.
    """

    def __init__(self, *, small_cost: int, name: str = "kvray-input") -> None:
        self.small_cost = small_cost
        self.name = name
        self._queue: list[_Job] = []  # a heap: the cheapest job first
        self._changed = threading.Condition()
        self._order = itertools.count()
        self._threads: list[threading.Thread] = []
        self._closed = False

    async def run(self, fn: Callable[[], T], *, cost: int) -> T:
        """`fn()`'s result (or exception), computed on a pool thread. Cancelling the caller
        drops a job that has not started; one already running finishes unseen.

        Raises:
            RuntimeError: the pool is closed.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._changed:
            if self._closed:
                raise RuntimeError("the input pool is closed")
            if not self._threads:
                self._start()
            heapq.heappush(self._queue, _Job(cost, next(self._order), fn, future, loop))
            self._changed.notify_all()
        return await future

    def _start(self) -> None:
        for lane, max_cost in (("any", None), ("small", self.small_cost)):
            thread = threading.Thread(
                target=self._work, args=(max_cost,), name=f"{self.name}-{lane}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _next(self, max_cost: int | None) -> _Job | None:
        """The cheapest queued job this thread may take (None once closed); waits for one."""
        with self._changed:
            while not self._closed:
                if self._queue and (max_cost is None or self._queue[0].cost <= max_cost):
                    return heapq.heappop(self._queue)
                self._changed.wait()
            return None

    def _work(self, max_cost: int | None) -> None:
        while (job := self._next(max_cost)) is not None:
            # NOTE: read across threads; a cancel that races this check only wastes the work.
            if job.future.cancelled():
                continue
            try:
                result = job.fn()
            except Exception as exc:  # the caller's error (a bad prompt), raised there
                _settle_soon(job, None, exc)
            else:
                _settle_soon(job, result, None)

    def close(self) -> None:
        """Stop the threads once their current jobs end; queued jobs are cancelled."""
        with self._changed:
            self._closed = True
            queued, self._queue = self._queue, []
            self._changed.notify_all()
        for job in queued:
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed already
                job.loop.call_soon_threadsafe(job.future.cancel)


def _settle_soon(job: _Job, result: Any, exc: BaseException | None) -> None:
    def settle() -> None:
        if job.future.done():  # cancelled meanwhile
            return
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits
        job.loop.call_soon_threadsafe(settle)
