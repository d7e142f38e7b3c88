"""EngineCore: the router-side half of one replica, with no knowledge of where the worker runs.

It validates and tokenizes requests, owns the replica's scheduler and block manager, and turns
each step's output into text chunks (detokenized, stop strings applied). The offline `LLM`
drives it with an in-process worker; the cluster's step loop drives it over Ray.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from kvray.cluster.block_manager import BlockManager
from kvray.cluster.detokenizer import Detokenizer
from kvray.cluster.request import FinishReason, Request, RequestStatus
from kvray.cluster.scheduler import Scheduler, SchedulerConfig, TokenEvent
from kvray.workers.protocol import Logprobs, SamplingParams, StepInput, StepOutput, WorkerInfo

Prompt = str | Sequence[int]


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
        )


@dataclass
class RequestGroup:
    """The n sequences of one request."""

    request_id: str
    prompt_token_ids: list[int]
    seqs: list[Request] = field(default_factory=list)

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


# NOTE: process-wide, so a request moved to another replica's engine keeps a unique seq_id.
_seq_ids = itertools.count()


class EngineCore:
    def __init__(
        self, info: WorkerInfo, scheduler_config: SchedulerConfig, tokenizer: Any | None
    ) -> None:
        self.info = info
        self.tokenizer = tokenizer
        self.block_manager = BlockManager(
            info.num_kv_blocks,
            info.block_size,
            enable_prefix_caching=scheduler_config.enable_prefix_caching,
        )
        self.scheduler = Scheduler(
            scheduler_config,
            self.block_manager,
            max_model_len=info.max_model_len,
            eos_token_ids=info.eos_token_ids,
        )
        self._groups: dict[str, RequestGroup] = {}
        self._request_ids = itertools.count()
        self.num_finished_requests = 0

    # ------------------------------------------------------------------ requests

    def tokenize(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt, validated. Raises ValueError for a prompt the model cannot take."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass the prompt as token ids")
            token_ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            token_ids = list(prompt)
            for t in token_ids:
                if (
                    isinstance(t, bool)
                    or not isinstance(t, int)
                    or not 0 <= t < self.info.vocab_size
                ):
                    raise ValueError(
                        f"prompt token ids must be integers in [0, {self.info.vocab_size}), got {t!r}"
                    )
        if not token_ids:
            raise ValueError("prompt is empty: give at least one token")
        if len(token_ids) >= self.info.max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens but the model's context (max_model_len) is "
                f"{self.info.max_model_len}; shorten it to at most {self.info.max_model_len - 1}"
            )
        return token_ids

    def check_params(self, params: SamplingParams) -> None:
        """Model-dependent checks on top of SamplingParams' own. Raises ValueError."""
        if params.stop and self.tokenizer is None:
            raise ValueError(
                "stop strings need a tokenizer; this model has none (use stop_token_ids)"
            )
        for t in params.stop_token_ids:
            if t >= self.info.vocab_size:
                raise ValueError(
                    f"stop_token_ids must be < vocab size {self.info.vocab_size}, got {t}"
                )

    def add_request(
        self, prompt: Prompt, params: SamplingParams, *, request_id: str | None = None
    ) -> str:
        """Validate and queue a request (n sequences). Returns its id. Raises ValueError."""
        request_id = request_id if request_id is not None else f"req-{next(self._request_ids)}"
        if request_id in self._groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.adopt(self.make_group(prompt, params, request_id))
        return request_id

    def make_group(self, prompt: Prompt, params: SamplingParams, request_id: str) -> RequestGroup:
        """A validated request's sequences, not queued anywhere (see `adopt`). Raises ValueError.

        Needs only the model's limits and tokenizer, so the router can build a request before
        any replica can take it (scale from zero).
        """
        token_ids = self.tokenize(prompt)
        self.check_params(params)
        group = RequestGroup(request_id, token_ids)
        now = time.monotonic()
        for index in range(params.n):
            seq_params = params
            if params.n > 1:
                seed = None if params.seed is None else params.seed + index
                seq_params = replace(params, n=1, seed=seed)
            req = Request(
                seq_id=next(_seq_ids),
                request_id=request_id,
                prompt_token_ids=token_ids,
                sampling=seq_params,
                index=index,
                arrival_time=now,
            )
            if self.tokenizer is not None:
                req.detokenizer = Detokenizer(
                    self.tokenizer,
                    token_ids,
                    skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop,
                    include_stop_str_in_output=params.include_stop_str_in_output,
                )
            group.seqs.append(req)
        return group

    def abort(self, request_id: str) -> list[CompletionChunk]:
        """End every sequence of a request now; returns their final (ABORT) chunks."""
        group = self._groups.get(request_id)
        if group is None:
            return []
        chunks = []
        for req in group.seqs:
            if not req.is_finished:
                self.scheduler.finish(req.seq_id, FinishReason.ABORT)
                chunks.append(self._final_chunk(req, [], None))
        return chunks

    def take_unfinished(self) -> list[RequestGroup]:
        """Remove every unfinished request, for another replica to continue (failover, drain).

        Their sequences keep their prompt, streamed tokens and text state; KV state is dropped.
        """
        return [self.release(group) for group in list(self._groups.values())]

    def queued_groups(self) -> list[RequestGroup]:
        """Queued requests that hold nothing on this replica (no KV blocks, no token in flight),
        in queue order: moving one to another replica costs nothing."""
        seen: set[str] = set()
        groups = []
        for req in self.scheduler.waiting:
            group = self._groups.get(req.request_id)
            if group is None or group.request_id in seen:
                continue
            seen.add(group.request_id)
            if all(
                s.is_finished or (s.status is RequestStatus.WAITING and s.num_pending_tokens == 0)
                for s in group.seqs
            ):
                groups.append(group)
        return groups

    def release(self, group: RequestGroup) -> RequestGroup:
        """Remove one request for another replica to `adopt`; its KV state here is dropped."""
        del self._groups[group.request_id]
        for req in group.seqs:
            if not req.is_finished:
                self.scheduler.remove(req.seq_id)
        return group

    def adopt(self, group: RequestGroup) -> None:
        """Queue a request group: a new one (`make_group`), or one taken from another replica,
        whose unfinished sequences are recomputed from prompt + streamed tokens and go on."""
        self._groups[group.request_id] = group
        for req in group.seqs:
            if not req.is_finished:
                self.scheduler.add(req)

    def abort_all(self) -> list[CompletionChunk]:
        return [c for request_id in list(self._groups) for c in self.abort(request_id)]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ steps

    def schedule(self) -> StepInput:
        return self.scheduler.schedule()

    def process(self, step_output: StepOutput) -> list[CompletionChunk]:
        """Apply one step's output: record tokens, stop rules, one chunk per sequence."""
        chunks = []
        now = time.monotonic()
        for event in self.scheduler.update(step_output):
            if event.request.first_token_time is None:
                event.request.first_token_time = now
            chunks.append(self._chunk(event))
        return chunks

    def _chunk(self, event: TokenEvent) -> CompletionChunk:
        req = event.request
        logprobs = [event.logprobs] if req.sampling.logprobs is not None else None
        detok = req.detokenizer
        stop = detok.add_token(event.token_id) if detok is not None else None
        if stop is not None:
            if req.is_finished:  # a token rule ended it too; the stop string wins
                req.finish_reason, req.stop_reason = FinishReason.STOP, stop
            else:
                self.scheduler.finish(req.seq_id, FinishReason.STOP, stop)
        if req.is_finished:
            return self._final_chunk(req, [event.token_id], logprobs)
        return CompletionChunk(
            req.request_id,
            req.index,
            [event.token_id],
            detok.release(finished=False) if detok is not None else "",
            logprobs,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=len(req.output_token_ids),
        )

    def _final_chunk(
        self, req: Request, token_ids: list[int], logprobs: list[Logprobs | None] | None
    ) -> CompletionChunk:
        detok = req.detokenizer
        text = ""
        if detok is not None:
            if req.finish_reason is not FinishReason.STOP or not isinstance(req.stop_reason, str):
                detok.flush()
            text = detok.release(finished=True)
        group = self._groups.get(req.request_id)
        if group is not None and group.is_finished:
            del self._groups[req.request_id]
            self.num_finished_requests += 1
        return CompletionChunk(
            req.request_id,
            req.index,
            token_ids,
            text,
            logprobs,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=len(req.output_token_ids),
        )
