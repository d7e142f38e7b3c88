"""The one input step: a prompt and its sampling parameters become a validated `Request`.

Tokenizes a text prompt (or checks token ids, or renders a conversation), checks the parameters
against the model (vocabulary, tokenizer, context length) and fans `n` out into sequences, each
with its own seed and detokenizer. It runs once per request, in the router, before any replica
sees it, and needs only the model's limits and tokenizer, so it works while no replica is
running. Costly input work runs on the input pool, never on the caller's event loop.
"""

from __future__ import annotations

import collections.abc
import functools
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from kvray.cluster.beam_search import BeamGroup
from kvray.cluster.block_manager import prefix_hashes
from kvray.cluster.chat_prompt import (
    MAX_MESSAGES,
    MESSAGE_COST,
    ChatPrompt,
    chat_chars,
    check_chat,
    render_chat,
)
from kvray.cluster.detokenizer import Detokenizer
from kvray.cluster.input_pool import InputPool
from kvray.cluster.request import Request
from kvray.cluster.sequence import Sequence, SequenceStatus, next_seq_id
from kvray.cluster.structured_output import GrammarChecker, cannot_constrain
from kvray.cluster.token_constraints import check_token_constraints, with_bad_words_token_ids
from kvray.workers.grammar_spec import GrammarSpec
from kvray.workers.protocol import InvalidParameterError, SamplingParams, WorkerInfo


@dataclass(frozen=True)
class Resumed:
    """What one sample of a broken stream had received before it broke."""

    token_ids: tuple[int, ...]
    num_text_chars: int
    finished: bool


Prompt = str | collections.abc.Sequence[int] | ChatPrompt
T = TypeVar("T")

MAX_CHARS_PER_TOKEN = 32  # a text prompt may hold this many characters per token of context
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # a gRPC message or an HTTP body (gRPC's own default)
INLINE_CHARS = 4096  # text prompts up to this size are tokenized on the caller's thread
INLINE_TOKENS = 256  # and resumed samples with up to this many tokens in all replayed there
# Input work up to this cost (in characters to tokenize) has a pool thread of its own: a burst
# of large prompts never delays it.
SMALL_INPUT_COST = 16 * 1024
RESUMED_TOKEN_COST = 64  # replaying a token through the detokenizer costs ~16 µs


def prompt_chars(prompt: Prompt) -> int:
    """How much text a prompt holds (0 for token ids): for a conversation, every character of
    every message (roles, names and tool fields too), all bounded as a text prompt is."""
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, ChatPrompt):
        return chat_chars(prompt)
    return 0


def input_cost(prompt: Prompt, *, num_resumed: int = 0) -> int:
    """What processing a prompt costs, in characters to tokenize: the input pool's order."""
    cost = RESUMED_TOKEN_COST * num_resumed
    if isinstance(prompt, ChatPrompt):
        return cost + chat_chars(prompt) + MESSAGE_COST * len(prompt.messages)
    return cost + len(prompt)  # characters to tokenize, or ids to check against the vocabulary


MAX_ID_CHARS = 256  # request_id and session_id: the server stores and echoes them


def check_ids(request_id: str | None, session_id: str | None) -> str:
    """The request's id (a new one if none), with both ids bounded.

    Raises:
        InvalidParameterError: an id is too long.
    """
    for name, value in (("request_id", request_id), ("session_id", session_id)):
        if value is not None and len(value) > MAX_ID_CHARS:
            raise InvalidParameterError(
                name, f"{name} holds {len(value)} characters; at most {MAX_ID_CHARS}"
            )
    return request_id or uuid.uuid4().hex


class InputProcessor:
    def __init__(self, info: WorkerInfo, tokenizer: Any | None) -> None:
        self.info = info
        self.tokenizer = tokenizer
        self._pool = InputPool(small_cost=SMALL_INPUT_COST)
        # Structured output's check before a request is queued (compiles on threads of its own)
        self.grammars = GrammarChecker.for_model(info, tokenizer)

    async def process_async(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams,
        request_id: str,
        *,
        arrival_time: float | None = None,
        resume: Mapping[int, Resumed] | None = None,
    ) -> Request:
        """`process`, with the prompt's bounds checked here and the work on the input pool
        when it is costly: a conversation (its template), a text over INLINE_CHARS, resumed
        samples of more than INLINE_TOKENS tokens (replaying them through the detokenizer costs
        ~16 µs each). So the event loop (every other stream) never waits for it. A structured
        output is compiled (and resumed samples replayed through it) on the grammar checker's
        threads first."""
        self.check_prompt(prompt)
        spec = sampling_params.structured_output
        if spec is not None:
            await self._grammar_checker(spec).check(spec, _resumed_token_ids(resume))
        process = functools.partial(
            self._process,
            prompt,
            sampling_params,
            request_id,
            arrival_time=arrival_time,
            resume=resume,
            check_grammar=False,
        )
        num_resumed = sum(len(r.token_ids) for r in (resume or {}).values())
        return await self._off_loop_if_costly(prompt, process, num_resumed=num_resumed)

    async def tokenize_async(self, prompt: Prompt) -> list[int]:
        """`tokenize`, on the input pool when it is costly (as `process_async`)."""
        self.check_prompt(prompt)
        return await self._off_loop_if_costly(prompt, functools.partial(self.tokenize, prompt))

    async def _off_loop_if_costly(
        self, prompt: Prompt, fn: Callable[[], T], *, num_resumed: int = 0
    ) -> T:
        # NOTE: the tokenizer is shared by the pool's threads and the loop's (detokenizers,
        # small prompts); encoding and decoding with fixed truncation and padding settings only
        # read it.
        is_chat = isinstance(prompt, ChatPrompt)
        if not is_chat and prompt_chars(prompt) <= INLINE_CHARS and num_resumed <= INLINE_TOKENS:
            return fn()
        return await self._pool.run(fn, cost=input_cost(prompt, num_resumed=num_resumed))

    def close(self) -> None:
        self._pool.close()
        if self.grammars is not None:
            self.grammars.close()

    def process(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams,
        request_id: str,
        *,
        arrival_time: float | None = None,
        resume: Mapping[int, Resumed] | None = None,
    ) -> Request:
        """A validated request with its `sampling_params.n` sequences, queued nowhere yet: the
        sampling knobs it leaves unset take the model's defaults. With `resume` (by sample
        index), those samples continue after the tokens they had.

        Raises:
            ValueError: a prompt or parameter the model cannot take (the message says why).
        """
        return self._process(
            prompt, sampling_params, request_id, arrival_time=arrival_time, resume=resume
        )

    def _process(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams,
        request_id: str,
        *,
        arrival_time: float | None = None,
        resume: Mapping[int, Resumed] | None = None,
        check_grammar: bool = True,
    ) -> Request:
        token_ids = self.tokenize(prompt)
        sampling_params = sampling_params.with_defaults(self.info.sampling_defaults)
        self.check_params(sampling_params, len(token_ids))
        spec = sampling_params.structured_output
        if spec is not None and check_grammar:  # (process_async checked it off the loop)
            self._grammar_checker(spec).check_sync(spec, _resumed_token_ids(resume))
        sampling_params = with_bad_words_token_ids(sampling_params, self.tokenizer, self.info)
        resume = resume or {}
        self._check_resume(resume, sampling_params, len(token_ids))
        now = time.monotonic() if arrival_time is None else arrival_time
        request = Request(request_id, token_ids, [], now, sampling_params)
        if sampling_params.prompt_logprobs is None:  # (these take no prefix-cache hit)
            request.prompt_hashes = prefix_hashes(token_ids, self.info.block_size)
        if sampling_params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        if sampling_params.num_beams > 1:
            request.beam = self._make_beam_group(request)
            request.seqs = request.beam.live
            request.beam.restart()
            return request
        request.seqs = [self._make_sequence(request, i) for i in range(sampling_params.num_samples)]
        for index, resumed in resume.items():
            _resume(request.seqs[index], resumed)
        if not resume and len(token_ids) > 1:  # the samples compute the prompt once
            for seq in request.seqs[1:]:
                seq.fork_parent = request.seqs[0]
        return request

    def _make_beam_group(self, request: Request) -> BeamGroup:
        template = Sequence(
            seq_id=-1,
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            sampling_params=request.sampling_params,
            arrival_time=request.arrival_time,
            prompt_logprobs=request.prompt_logprobs,
        )
        make_detokenizer = None
        if self.tokenizer is not None:
            make_detokenizer = functools.partial(
                Detokenizer,
                self.tokenizer,
                request.prompt_token_ids,
                skip_special_tokens=request.sampling_params.skip_special_tokens,
            )
        return BeamGroup(
            template,
            max_model_len=self.info.max_model_len,
            eos_token_ids=frozenset(self.info.eos_token_ids),
            make_detokenizer=make_detokenizer,
        )

    def _grammar_checker(self, spec: GrammarSpec) -> GrammarChecker:
        if self.grammars is None:
            raise cannot_constrain(spec, has_tokenizer=self.tokenizer is not None)
        return self.grammars

    def _check_resume(
        self, resume: Mapping[int, Resumed], sampling_params: SamplingParams, num_prompt_tokens: int
    ) -> None:
        if resume and sampling_params.is_ranked:
            raise InvalidParameterError(
                "resume",
                "a beam search or best_of request returns its samples only at the end: there is "
                "nothing to resume; send it again",
            )
        if resume and len(resume) == sampling_params.n and all(r.finished for r in resume.values()):
            raise InvalidParameterError("resume", "every sample is finished: nothing to resume")
        for index, resumed in resume.items():
            at = f"resume[index={index}]"
            if not 0 <= index < sampling_params.n:
                raise InvalidParameterError(
                    "resume", f"{at}: index must be in [0, n={sampling_params.n})"
                )
            if any(not 0 <= t < self.info.vocab_size for t in resumed.token_ids):
                raise InvalidParameterError(
                    "resume", f"{at}: token ids must be in [0, {self.info.vocab_size})"
                )
            if resumed.num_text_chars < 0:
                raise InvalidParameterError("resume", f"{at}: num_text_chars must be >= 0")
            num_tokens, max_tokens = len(resumed.token_ids), sampling_params.max_tokens or 2**31
            if num_tokens > max_tokens or num_prompt_tokens + num_tokens > self.info.max_model_len:
                raise InvalidParameterError(
                    "resume", f"{at}: more tokens than max_tokens or the context allow"
                )
            done = num_tokens == max_tokens or (
                num_prompt_tokens + num_tokens == self.info.max_model_len
            )
            if done and not resumed.finished:
                raise InvalidParameterError(
                    "resume", f"{at}: the sample has all its tokens; it is finished"
                )

    def tokenize(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt, validated. Raises ValueError for a prompt the model cannot take."""
        self.check_prompt(prompt)
        if isinstance(prompt, ChatPrompt):
            token_ids = render_chat(self.tokenizer, prompt)
        elif isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidParameterError(
                    "prompt", "this model has no tokenizer: pass the prompt as token ids"
                )
            token_ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            token_ids = list(prompt)
            vocab_size = self.info.vocab_size
            for t in token_ids:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                    raise InvalidParameterError(
                        "prompt",
                        f"prompt token ids must be integers in [0, {vocab_size}), got {t!r}",
                    )
        if not token_ids:
            raise InvalidParameterError("prompt", "prompt is empty: give at least one token")
        self._check_num_tokens(len(token_ids))
        return token_ids

    def check_prompt(self, prompt: Prompt) -> None:
        """The prompt's bounds, checked before any costly work (tokenizing, rendering, checking
        each id), cheap enough for the event loop: its characters (a conversation's every
        string), messages and their roles, the number of token ids.

        Raises:
            InvalidParameterError: naming the field past its bound.
        """
        if isinstance(prompt, ChatPrompt):
            check_chat(prompt, max_messages=min(MAX_MESSAGES, self.info.max_model_len))
        elif not isinstance(prompt, str):
            self._check_num_tokens(len(prompt))
        limit = MAX_CHARS_PER_TOKEN * self.info.max_model_len
        num_chars = prompt_chars(prompt)
        if num_chars > limit:
            param = "messages" if isinstance(prompt, ChatPrompt) else "prompt"
            raise InvalidParameterError(
                param,
                f"{param} holds {num_chars} characters; at most {limit} "
                f"({MAX_CHARS_PER_TOKEN} per token of the model's {self.info.max_model_len})",
            )

    def _check_num_tokens(self, num_tokens: int) -> None:
        max_len = self.info.max_model_len
        if num_tokens >= max_len:
            raise InvalidParameterError(
                "prompt",
                f"prompt has {num_tokens} tokens but the model's context (max_model_len) is "
                f"{max_len}; shorten it to at most {max_len - 1}",
            )

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def check_params(self, sampling_params: SamplingParams, num_prompt_tokens: int) -> None:
        """Model-dependent checks on top of SamplingParams' own. Raises ValueError."""
        max_tokens, max_len = sampling_params.max_tokens, self.info.max_model_len
        if max_tokens is not None and num_prompt_tokens + max_tokens > max_len:
            raise InvalidParameterError(
                "max_tokens",
                f"the prompt's {num_prompt_tokens} tokens + max_tokens={max_tokens} exceed the "
                f"model's context (max_model_len) of {max_len} tokens: ask for at most "
                f"{max_len - num_prompt_tokens}",
            )
        if sampling_params.num_beams > 1:
            self._check_beam_blocks(sampling_params, num_prompt_tokens)
        if sampling_params.stop and self.tokenizer is None:
            raise InvalidParameterError(
                "stop", "stop strings need a tokenizer; this model has none (use stop_token_ids)"
            )
        for t in sampling_params.stop_token_ids:
            if t >= self.info.vocab_size:
                raise InvalidParameterError(
                    "stop_token_ids",
                    f"stop_token_ids must be < vocab size {self.info.vocab_size}, got {t}",
                )
        check_token_constraints(
            sampling_params, self.info, has_tokenizer=self.tokenizer is not None
        )

    def _check_beam_blocks(self, sampling_params: SamplingParams, num_prompt_tokens: int) -> None:
        """Refuse a beam search that could outgrow the KV cache even alone (it would restart
        forever): every beam may hold its own blocks past the prompt's full ones."""
        bs, num_blocks = self.info.block_size, self.info.num_kv_blocks
        room = self.info.max_model_len - num_prompt_tokens
        length = num_prompt_tokens + min(sampling_params.max_tokens or room, room)
        shared = num_prompt_tokens // bs
        need = shared + sampling_params.num_beams * (-(-length // bs) - shared)
        if need > num_blocks:
            raise InvalidParameterError(
                "num_beams",
                f"num_beams={sampling_params.num_beams} over this prompt and max_tokens may need {need} "
                f"KV blocks; a replica has {num_blocks}: lower num_beams or max_tokens",
            )

    def _make_sequence(self, request: Request, index: int) -> Sequence:
        sampling_params = request.sampling_params
        if sampling_params.num_samples > 1:  # each sample draws from its own seed
            seed = sampling_params.seed
            if seed is not None:  # seed + index, wrapped into int64 (the proto's type)
                # NOTE: the sampler reads a seed modulo 2**64, so the wrap changes no draw.
                seed = (seed + index + 2**63) % 2**64 - 2**63
            ranked = sampling_params.is_ranked and sampling_params.logprobs is None
            # NOTE: a best_of sample needs its tokens' logprobs to be ranked (not streamed).
            sampling_params = replace(
                sampling_params,
                n=1,
                best_of=None,
                seed=seed,
                logprobs=0 if ranked else sampling_params.logprobs,
            )
        seq = Sequence(
            seq_id=next_seq_id(),
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            sampling_params=sampling_params,
            index=index,
            arrival_time=request.arrival_time,
            prompt_logprobs=request.prompt_logprobs,
        )
        if self.tokenizer is not None:
            seq.detokenizer = Detokenizer(
                self.tokenizer,
                request.prompt_token_ids,
                skip_special_tokens=sampling_params.skip_special_tokens,
                stop=sampling_params.stop,
                include_stop_str_in_output=sampling_params.include_stop_str_in_output,
            )
        return seq


def _resumed_token_ids(resume: Mapping[int, Resumed] | None) -> dict[int, tuple[int, ...]]:
    return {index: resumed.token_ids for index, resumed in (resume or {}).items()}


def _resume(seq: Sequence, resumed: Resumed) -> None:
    """Give a new sequence the tokens a broken stream had streamed: it is recomputed from
    prompt + those tokens, and its text continues after what the client has."""
    seq.output_token_ids = list(resumed.token_ids)
    seq.output_logprobs = [None] * len(resumed.token_ids)
    if seq.detokenizer is not None and not resumed.finished:
        for token_id in resumed.token_ids:
            seq.detokenizer.add_token(token_id)
        seq.detokenizer.mark_released(resumed.num_text_chars)
    if resumed.finished:
        seq.status = SequenceStatus.FINISHED
