"""The one input step: a prompt and its sampling parameters become a validated `Request`.

Tokenizes a text prompt (or checks token ids), checks the parameters against the model
(vocabulary, tokenizer, context length) and fans `n` out into sequences, each with its own
seed and detokenizer. It runs once per request, in the router, before any replica sees it, and
needs only the model's limits and tokenizer, so it works while no replica is running.
"""

from __future__ import annotations

import collections.abc
import itertools
import time
from dataclasses import replace
from typing import Any

from kvray.cluster.detokenizer import Detokenizer
from kvray.cluster.request import Request
from kvray.cluster.sequence import Sequence
from kvray.workers.protocol import SamplingParams, WorkerInfo

Prompt = str | collections.abc.Sequence[int]

# NOTE: process-wide, so a request moved to another replica's engine keeps unique seq_ids.
_seq_ids = itertools.count()


class InputProcessor:
    def __init__(self, info: WorkerInfo, tokenizer: Any | None) -> None:
        self.info = info
        self.tokenizer = tokenizer

    def process(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str,
        *,
        arrival_time: float | None = None,
    ) -> Request:
        """A validated request with its `params.n` sequences, queued nowhere yet.

        Raises:
            ValueError: a prompt or parameter the model cannot take (the message says why).
        """
        token_ids = self.tokenize(prompt)
        self.check_params(params)
        now = time.monotonic() if arrival_time is None else arrival_time
        seqs = [self._make_sequence(request_id, token_ids, params, i, now) for i in range(params.n)]
        return Request(request_id, token_ids, seqs, now)

    def tokenize(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt, validated. Raises ValueError for a prompt the model cannot take."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass the prompt as token ids")
            token_ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            token_ids = list(prompt)
            vocab_size = self.info.vocab_size
            for t in token_ids:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                    raise ValueError(
                        f"prompt token ids must be integers in [0, {vocab_size}), got {t!r}"
                    )
        if not token_ids:
            raise ValueError("prompt is empty: give at least one token")
        max_len = self.info.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens but the model's context (max_model_len) is "
                f"{max_len}; shorten it to at most {max_len - 1}"
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

    def _make_sequence(
        self,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        index: int,
        arrival_time: float,
    ) -> Sequence:
        if params.n > 1:  # each sample draws from its own seed
            seed = None if params.seed is None else params.seed + index
            params = replace(params, n=1, seed=seed)
        seq = Sequence(
            seq_id=next(_seq_ids),
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling=params,
            index=index,
            arrival_time=arrival_time,
        )
        if self.tokenizer is not None:
            seq.detokenizer = Detokenizer(
                self.tokenizer,
                token_ids,
                skip_special_tokens=params.skip_special_tokens,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
            )
        return seq
