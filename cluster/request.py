"""A client request as the router holds it: its prompt and its sequences (one per sample).

Built once by the input processor; a replica's engine queues its sequences; on failover,
drain or rebalance it moves whole to another replica's engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvray.cluster.sequence import Sequence, SequenceStatus


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    arrival_time: float  # the router's clock when it was admitted (moves keep it: FCFS)

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    @property
    def is_movable(self) -> bool:
        """Holds nothing on its replica (no KV blocks, no token in flight): moving it is free."""
        return all(
            s.is_finished or (s.status is SequenceStatus.WAITING and s.num_pending_tokens == 0)
            for s in self.seqs
        )

    @property
    def num_unfinished_tokens(self) -> int:
        """Known tokens of its unfinished sequences: its share of a scheduler's queued tokens."""
        return sum(s.num_known_tokens for s in self.seqs if not s.is_finished)
