"""Router-side state of one sequence: its tokens, progress, KV blocks and how it ended.

A request with n samples is n sequences (see `request.py`); the scheduler runs sequences.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvray.workers.protocol import Logprobs, SamplingParams

if TYPE_CHECKING:
    from kvray.cluster.detokenizer import Detokenizer


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds KV blocks and is scheduled every step
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"  # cancelled by the caller, or failed


@dataclass(eq=False)
class Sequence:
    """One sequence: a request's sample. The n sequences of a request share its request_id."""

    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    index: int = 0  # which of the request's n samples
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[Logprobs | None] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache (or being written)
    num_pending_tokens: int = 0  # sampled by an in-flight step; ids not yet seen
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache when first scheduled
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of the full blocks, in order
    is_known_to_worker: bool = False  # False: send in full (new, or preempted) when scheduled
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that matched
    first_scheduled_time: float | None = None  # the scheduler's clock when first admitted
    detokenizer: Detokenizer | None = None  # None when the model has no tokenizer

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Every token of the sequence, including sampled ones whose ids are not back yet."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_known_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_output_tokens(self) -> int:
        """Output tokens generated or in flight."""
        return len(self.output_token_ids) + self.num_pending_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
