"""The router's end of client streams: a queue of chunks per request, merged when they pile up."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from kvray.cluster.chunks import CompletionChunk


@dataclass(eq=False)
class RequestStream:
    """One client stream: the chunks of a request's n samples, in order, or an exception."""

    request_id: str
    num_samples: int
    replica_id: str | None = None  # None while it waits for a replica
    queue: asyncio.Queue[CompletionChunk | BaseException] = field(default_factory=asyncio.Queue)
    num_finished: int = 0
    num_failovers: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    unassigned_since: float | None = None  # when it last started waiting for a replica
    first_token_time: float | None = None
    # Beam search, best_of > n: its first chunk is its last; it does not count as a time to
    # first token (the autoscaler's and the metric's), which it would inflate.
    is_ranked: bool = False
    last_token_times: dict[int, float] = field(default_factory=dict)  # per sample, for ITL

    @property
    def is_finished(self) -> bool:
        return self.num_finished == self.num_samples


def coalesce(items: list[CompletionChunk | BaseException]) -> list[CompletionChunk | BaseException]:
    """Merge consecutive chunks of the same sample (a slow consumer then gets fewer messages)."""
    merged: list[CompletionChunk | BaseException] = []
    for item in items:
        last = merged[-1] if merged else None
        if (
            isinstance(item, CompletionChunk)
            and isinstance(last, CompletionChunk)
            and last.index == item.index
            and last.finish_reason is None
        ):
            merged[-1] = last.merge(item)
        else:
            merged.append(item)
    return merged
