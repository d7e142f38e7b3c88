"""A client request as the router holds it: its prompt and its sequences (one per sample).

Built once by the input processor; a replica's engine queues its sequences; on failover,
drain or rebalance it moves whole to another replica's engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvray.cluster.sequence import Sequence, SequenceStatus
from kvray.workers.protocol import Logprobs, SamplingParams

if TYPE_CHECKING:
    from kvray.cluster.beam_search import BeamGroup
    from kvray.cluster.chunks import CompletionChunk


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    seqs: list[Sequence]  # one per sample; for beam search, the live beams (`beam.live`)
    arrival_time: float  # the router's clock when it was admitted (moves keep it: FCFS)
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    beam: BeamGroup | None = None
    # Entry 0 is None (the first token has no context); filled as the prompt is computed.
    prompt_logprobs: list[Logprobs | None] | None = None
    # best_of > n: each sample's output so far, kept until the request ends and the best are sent
    outputs: dict[int, CompletionChunk] = field(default_factory=dict)
    has_streamed: bool = False  # a chunk went out (prompt logprobs ride on the first)
    # The prompt's full blocks as the prefix cache hashes them (`block_manager.prefix_hashes`):
    # placement looks them up in each replica's cache
    prompt_hashes: list[int] = field(default_factory=list)

    @property
    def is_best_of(self) -> bool:
        """Samples more than it returns (best_of > n): it streams nothing until it ends."""
        return self.sampling_params.num_samples > self.sampling_params.n and self.beam is None

    @property
    def num_outputs(self) -> int:
        """Samples the caller gets back: n (of best_of samples, or of num_beams beams)."""
        return self.sampling_params.n

    @property
    def is_finished(self) -> bool:
        """Every sample ended (a beam search: it is done, `seqs` is empty)."""
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
        """Known tokens of its unfinished sequences."""
        return sum(s.num_known_tokens for s in self.seqs if not s.is_finished)

    @property
    def num_queued_work(self) -> int:
        """Its share of its replica's queued tokens (`Sequence.num_queued_work`), while queued."""
        return sum(s.num_queued_work for s in self.seqs if not s.is_finished)
