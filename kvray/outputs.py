"""What generation returns, in one vocabulary for the offline `LLM` and the gRPC clients:
`GenerationChunk` (a sample's new tokens, streamed), `Completion` with its `Choice`s (a whole
request), `TokenLogprob`, and `Accumulator`, which joins a request's chunks into its completion.

Standard library only: the client imports it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (before sampling filters), and the top ones."""

    token_id: int
    logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass
class GenerationChunk:
    """New tokens of one sample since its previous chunk."""

    request_id: str
    index: int  # which of the n samples
    text: str  # text delta
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "abort" on a sample's last chunk
    stop_reason: str | int | None = None  # the stop string or stop token id that matched
    prompt_tokens: int | None = None  # on the last chunk
    completion_tokens: int | None = None  # on the last chunk
    cached_tokens: int | None = None  # on the last chunk: prompt tokens from the prefix cache
    cumulative_logprob: float | None = None  # on the last chunk of a beam, best_of or logprobs
    # On a request's first chunk, when prompt_logprobs was asked: one per prompt token, the
    # first None (it has no context)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)


@dataclass
class Choice:
    """One of a request's samples, whole."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that matched
    completion_tokens: int = 0
    cumulative_logprob: float | None = None  # beams, best_of samples, and with logprobs


@dataclass
class Completion:
    """A finished request. `.text`, `.token_ids` and `.finish_reason` are sample 0's (with beam
    search or best_of: the best one's; choices are ranked best first)."""

    request_id: str
    choices: list[Choice]
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, how many came from the prefix cache
    # With prompt_logprobs: one per prompt token, the first None (it has no context)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    prompt_token_ids: list[int] | None = None  # the offline LLM's; None over gRPC

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.choices[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason

    @property
    def stop_reason(self) -> str | int | None:
        return self.choices[0].stop_reason


class Accumulator:
    """Joins one request's chunks into its Completion."""

    def __init__(self) -> None:
        self.completion: Completion | None = None  # None until the first chunk

    def add(self, chunk: GenerationChunk) -> None:
        if self.completion is None:
            self.completion = Completion(chunk.request_id, [])
        choices = self.completion.choices
        while len(choices) <= chunk.index:
            choices.append(Choice(index=len(choices)))
        choice = choices[chunk.index]
        choice.text += chunk.text
        choice.token_ids.extend(chunk.token_ids)
        choice.logprobs.extend(chunk.logprobs)
        self.completion.prompt_logprobs.extend(chunk.prompt_logprobs)
        if chunk.finish_reason is not None:
            choice.finish_reason, choice.stop_reason = chunk.finish_reason, chunk.stop_reason
            choice.cumulative_logprob = chunk.cumulative_logprob
            choice.completion_tokens = chunk.completion_tokens or 0
            self.completion.prompt_tokens = chunk.prompt_tokens or 0
            self.completion.cached_tokens = chunk.cached_tokens or 0
