"""`CompletionChunk`: what one sequence produced in one step, as the router passes it from a
replica's engine to the request's stream (gRPC, HTTP, metrics), and `to_generation_chunk`, its
form in `kvray.outputs` for the offline `LLM`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvray.cluster.sequence import FinishReason
from kvray.outputs import GenerationChunk, TokenLogprob
from kvray.workers.protocol import Logprobs


@dataclass
class CompletionChunk:
    """What one sequence produced in one step: new tokens, their text, and the end if reached."""

    request_id: str
    index: int  # which of the request's n samples
    token_ids: list[int]
    text: str  # text delta; may be empty while a multi-byte character or a stop string is pending
    logprobs: list[Logprobs | None] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # cumulative, for usage
    # On a sequence's last chunk: prompt tokens served from the prefix cache, and when it was
    # first scheduled (the engine's clock; None if it never was).
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    cumulative_logprob: float | None = None  # on the last chunk, of beams and when logprobs asked
    # On a request's first chunk, when asked: each prompt token's logprobs (entry 0 is None).
    prompt_logprobs: list[Logprobs | None] | None = None

    def merge(self, later: CompletionChunk) -> CompletionChunk:
        """This chunk followed by a later one of the same sample, as one chunk."""
        logprobs = None
        if self.logprobs is not None or later.logprobs is not None:
            logprobs = (self.logprobs or []) + (later.logprobs or [])
        return replace(
            later,
            token_ids=self.token_ids + later.token_ids,
            text=self.text + later.text,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs or later.prompt_logprobs,
        )


def to_generation_chunk(chunk: CompletionChunk) -> GenerationChunk:
    """The chunk as `kvray.outputs` has it: what a gRPC client receives for it."""
    out = GenerationChunk(
        request_id=chunk.request_id,
        index=chunk.index,
        text=chunk.text,
        token_ids=list(chunk.token_ids),
        logprobs=[_token_logprob(lp) for lp in chunk.logprobs or () if lp is not None],
        prompt_logprobs=[
            None if lp is None else _token_logprob(lp) for lp in chunk.prompt_logprobs or ()
        ],
        cumulative_logprob=chunk.cumulative_logprob,
    )
    if chunk.finish_reason is not None:
        out.finish_reason = chunk.finish_reason.value
        out.stop_reason = chunk.stop_reason
        out.prompt_tokens = chunk.num_prompt_tokens
        out.completion_tokens = chunk.num_output_tokens
        out.cached_tokens = chunk.num_cached_tokens
    return out


def _token_logprob(lp: Logprobs) -> TokenLogprob:
    return TokenLogprob(lp.token_id, lp.logprob, list(lp.top_token_ids), list(lp.top_logprobs))
