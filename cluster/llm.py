"""The offline API: `LLM(model).generate(prompts, sampling_params)`, one replica in this process.

It returns what the gRPC clients return (`kvray.outputs`): a `Completion` per prompt, its
`GenerationChunk`s when streamed."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

from kvray.cluster.chunks import to_generation_chunk
from kvray.cluster.engine import EngineCore
from kvray.cluster.input_processor import ChatPrompt, InputProcessor, Prompt
from kvray.cluster.tokenizer import load_tokenizer
from kvray.outputs import Accumulator, Completion, GenerationChunk
from kvray.workers.config import EngineConfig
from kvray.workers.protocol import SamplingParams

logger = logging.getLogger(__name__)


class LLM:
    """A model replica and its engine in this process.

    Keyword arguments are engine options (`EngineConfig.keys()`), e.g.
    `LLM("tiny", num_kv_blocks=64, max_num_batched_tokens=512, prefill_chunk_size=128)`.
    With `tensor_parallel_size=N` the model is split over N processes of this machine (one GPU
    or CPU core each); `close()` stops them.
    """

    def __init__(self, model: str = "tiny", **options: object) -> None:
        self.config = EngineConfig.from_kwargs(model=model, **options)
        self.worker = _start_worker(self.config)
        info = self.worker.warmup()
        self.tokenizer = load_tokenizer(
            info.model,
            revision=self.config.worker.revision,
            trust_remote_code=self.config.worker.trust_remote_code,
        )
        self.processor = InputProcessor(info, self.tokenizer)
        self.engine = EngineCore(info, self.config.scheduler)
        self._request_ids = itertools.count()

    def close(self) -> None:
        """Stop the rank processes of a replica split over several (tensor_parallel_size > 1);
        nothing to do for one. The LLM takes no requests after it."""
        close = getattr(self.worker, "close", None)
        if close is not None:
            close()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Run every prompt to completion; completions come back in prompt order.

        A prompt is a string, a list of token ids or a `ChatPrompt`. Raises ValueError for an
        invalid prompt or parameters (nothing is run then).
        """
        request_ids, prompt_ids = self._add_all(prompts, sampling_params)
        accumulators = {rid: Accumulator() for rid in request_ids}
        for chunk in self._run():
            accumulators[chunk.request_id].add(chunk)
        completions = []
        for rid, ids in zip(request_ids, prompt_ids):
            completion = accumulators[rid].completion
            assert completion is not None  # every request ends with a chunk per sample
            completion.prompt_token_ids = ids
            completions.append(completion)
        return completions

    def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        sampling_params: SamplingParams | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> Completion:
        """Answer one conversation: `messages` are {"role", "content"} turns, rendered with the
        model's chat template. Raises ValueError (no template, bad messages or parameters)."""
        chat = ChatPrompt(tuple(dict(m) for m in messages), add_generation_prompt)
        return self.generate(chat, sampling_params)[0]

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Iterator[GenerationChunk]:
        """Like `generate`, but yields each sample's new tokens and text after every step."""
        self._add_all(prompts, sampling_params)
        yield from self._run()

    def _run(self) -> Iterator[GenerationChunk]:
        try:
            while self.engine.has_unfinished():
                yield from self.step()
        finally:
            # A caller that stops iterating early (or an error) must not leave requests behind.
            self.engine.abort_all()

    def step(self) -> list[GenerationChunk]:
        """One scheduler step through the in-process worker: what each sample produced."""
        return [to_generation_chunk(c) for c in self.engine.step(self.worker.step)]

    def add_request(
        self, prompt: Prompt, sampling_params: SamplingParams, *, request_id: str | None = None
    ) -> str:
        """Validate and queue one request (run it with `step`). Returns its id.

        Raises:
            ValueError: an invalid prompt or parameters, or a request_id already in use.
        """
        request_id = request_id if request_id is not None else f"req-{next(self._request_ids)}"
        self.engine.add(self.processor.process(prompt, sampling_params, request_id))
        return request_id

    def _add_all(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
    ) -> tuple[list[str], list[list[int]]]:
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        # Process everything first so that one bad prompt queues nothing.
        requests = [
            self.processor.process(prompt, one, f"req-{next(self._request_ids)}")
            for prompt, one in zip(prompt_list, params_list)
        ]
        for request in requests:
            self.engine.add(request)
        return [r.request_id for r in requests], [r.prompt_token_ids for r in requests]


def _start_worker(config: EngineConfig) -> Any:
    """The replica's worker: in this process, or at tensor_parallel_size > 1 one process per
    rank (`LocalRanks`), with the same `warmup` and `step`."""
    if config.worker.world_size > 1:
        from kvray.workers.local_ranks import LocalRanks

        return LocalRanks(config)
    from kvray.workers.worker import ModelWorker

    return ModelWorker(config)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text, token ids or a chat) or a list of them, as a list. Raises ValueError."""
    if isinstance(prompts, str | ChatPrompt):
        return [prompts]
    items: list[object] = list(prompts)
    if not items:
        raise ValueError("prompts is empty")
    if all(isinstance(t, int) for t in items):
        return [cast(list[int], items)]  # one prompt of token ids
    for p in items:
        if not isinstance(p, str | Sequence | ChatPrompt):
            raise ValueError(
                "each prompt must be a string, a list of token ids or a ChatPrompt, got "
                f"{type(p).__name__}"
            )
    return cast(list[Prompt], items)


def _as_params_list(
    sampling_params: SamplingParams | Sequence[SamplingParams] | None, num_prompts: int
) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * num_prompts
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * num_prompts
    per_prompt = list(sampling_params)
    if len(per_prompt) != num_prompts:
        raise ValueError(
            f"sampling_params has {len(per_prompt)} entries for {num_prompts} prompts; "
            "give one SamplingParams or one per prompt"
        )
    return per_prompt
