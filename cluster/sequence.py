"""Router-side state of one sequence: its tokens, progress, KV blocks and how it ended.

A request with n samples is n sequences (see `request.py`); the scheduler runs sequences.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvray.workers.protocol import Logprobs, SamplingParams

if TYPE_CHECKING:
    from kvray.cluster.beam_search import BeamGroup
    from kvray.cluster.detokenizer import Detokenizer

# NOTE: process-wide, so a request moved to another replica's engine keeps unique seq_ids.
_seq_ids = itertools.count()


def next_seq_id() -> int:
    return next(_seq_ids)


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
    sampling_params: SamplingParams
    index: int = 0  # which of the request's n samples
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[Logprobs | None] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache (or being written)
    num_pending_tokens: int = 0  # sampled by an in-flight step; ids not yet seen
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache when first scheduled
    # Prompt tokens its replica held for it when it was queued there (cached, or coming with a
    # request ahead of it): not counted in the replica's queued work (`num_queued_work`)
    num_held_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of the full blocks, in order
    is_known_to_worker: bool = False  # False: send in full (new, or preempted) when scheduled
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that matched
    first_scheduled_time: float | None = None  # the scheduler's clock when first admitted
    detokenizer: Detokenizer | None = None  # None when the model has no tokenizer
    cumulative_logprob: float = 0.0  # of its output tokens, when they carry logprobs (or beams)
    # Prompt logprobs, shared by the request's sequences (entry 0 is None: the first token has
    # no context); None when not asked for.
    prompt_logprobs: list[Logprobs | None] | None = None
    beam: BeamGroup | None = None  # the beam search it is a beam of
    # An `n` sample that is not running yet: it forks from `fork_parent` once the parent has
    # computed all but the last prompt token, so the prompt is computed once for all samples.
    fork_parent: Sequence | None = None
    unborn: list[Sequence] = field(default_factory=list)  # samples waiting to fork from this one

    @property
    def num_queued_work(self) -> int:
        """Tokens it will compute once admitted, as its replica's queued work counts them."""
        return self.num_known_tokens - self.num_held_tokens

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

    def copy(self, *, seq_id: int, sampling_params: SamplingParams | None = None) -> Sequence:
        """A new sequence with this one's tokens and progress so far, holding no KV blocks."""
        return Sequence(
            seq_id=seq_id,
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            sampling_params=sampling_params or self.sampling_params,
            index=self.index,
            arrival_time=self.arrival_time,
            output_token_ids=list(self.output_token_ids),
            output_logprobs=list(self.output_logprobs),
            cumulative_logprob=self.cumulative_logprob,
            prompt_logprobs=self.prompt_logprobs,
            beam=self.beam,
        )

    def end_after(
        self, token_id: int, eos_token_ids: frozenset[int], max_model_len: int
    ) -> tuple[FinishReason | None, int | None]:
        """Whether the token just appended ends the sequence: (reason, stop token id) or
        (None, None). EOS and stop ids count from min_tokens on; max_tokens and the context."""
        sampling_params = self.sampling_params
        num_output = len(self.output_token_ids)
        if num_output >= sampling_params.min_tokens:
            if not sampling_params.ignore_eos and token_id in eos_token_ids:
                return FinishReason.STOP, None
            if token_id in sampling_params.stop_token_ids:
                return FinishReason.STOP, token_id
        if sampling_params.max_tokens is not None and num_output >= sampling_params.max_tokens:
            return FinishReason.LENGTH, None
        if self.num_known_tokens >= max_model_len:
            return FinishReason.LENGTH, None
        return None, None

    def add_prompt_logprobs(self, start: int, entries: list[Logprobs]) -> None:
        """Keep prompt logprobs from position `start` on (once: a recompute sends them again)."""
        record = self.prompt_logprobs
        if record is None:
            return
        for position, entry in enumerate(entries, start):
            if position == len(record):
                record.append(entry)

    @property
    def fork_point(self) -> int:
        """Computed tokens at which its unborn samples fork: all prompt tokens but the last."""
        return self.num_prompt_tokens - 1
