"""Test helpers: an engine with its input step in front, driven synchronously or with a step in
flight (through the cluster's own StepLoop), and the HF greedy reference."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections import defaultdict
from typing import Any

from kvray.cluster.chunks import CompletionChunk
from kvray.cluster.engine import EngineCore
from kvray.cluster.input_processor import InputProcessor, Prompt
from kvray.cluster.step_loop import StepLoop, in_process
from kvray.workers.config import SchedulerConfig
from kvray.workers.protocol import SamplingParams, WorkerInfo


class EngineWithInput(EngineCore):
    """An EngineCore with an input processor in front, as the offline LLM and the router have."""

    def __init__(
        self, info: WorkerInfo, config: SchedulerConfig, tokenizer: Any | None = None
    ) -> None:
        super().__init__(info, config)
        self.processor = InputProcessor(info, tokenizer)
        self._ids = itertools.count()

    def add_request(
        self, prompt: Prompt, sampling_params: SamplingParams, *, request_id: str | None = None
    ) -> str:
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        self.add(self.processor.process(prompt, sampling_params, request_id))
        return request_id


def free_port() -> int:
    """A TCP port on loopback that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Hugging Face `generate(do_sample=False)` on one prompt: the reference for greedy parity."""
    import torch

    ids = torch.tensor([prompt], device=model.device)
    with torch.no_grad():
        # NOTE: an explicit mask, or generate() treats prompt tokens equal to pad as padding.
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def drive(engine: EngineCore, worker, *, pipelined: bool = False, on_step=None):
    """Run until every request finishes. Returns {(request_id, index): [chunks]}.

    Without `pipelined`, one synchronous `EngineCore.step` at a time; with it, the cluster's
    StepLoop, which schedules the next step before it applies the previous step's output.
    `on_step(chunks)` is called after each step's output is applied.
    """
    chunks: dict[tuple[str, int], list[CompletionChunk]] = defaultdict(list)

    def record(step_chunks: list[CompletionChunk]) -> None:
        for c in step_chunks:
            chunks[(c.request_id, c.index)].append(c)
        if on_step is not None:
            on_step(step_chunks)

    if pipelined:
        # NOTE: the fake worker reports steps of 0 s, so the loop always keeps one in flight.
        loop = StepLoop(engine, in_process(worker.step), on_chunks=record)
        asyncio.run(asyncio.wait_for(loop.run(until_idle=True), timeout=60))
    else:
        while engine.has_unfinished():
            record(engine.step(worker.step))
    return dict(chunks)


def tokens_of(chunks: list[CompletionChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def text_of(chunks: list[CompletionChunk]) -> str:
    return "".join(c.text for c in chunks)


def hf_beam_search(
    model,
    prompt: list[int],
    *,
    num_beams: int,
    num_return: int,
    length_penalty: float,
    early_stopping: bool,
    max_new_tokens: int,
    stop_token_ids: set[int],
    min_new_tokens: int = 0,
) -> list[list[int]]:
    """Hugging Face `generate(num_beams=...)` on one prompt: the returned beams' new tokens,
    best first. `stop_token_ids` plays the part of EOS (kvray's EOS and stop ids)."""
    import torch

    ids = torch.tensor([prompt], device=model.device)
    model.generation_config.eos_token_id = sorted(stop_token_ids) or None
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            num_beams=num_beams,
            num_return_sequences=num_return,
            do_sample=False,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens or None,
            return_dict_in_generate=True,
            output_scores=True,
            pad_token_id=0,
        )
    # NOTE: beams end at different lengths; beam_indices is -1 past each one's end.
    lengths = (out.beam_indices >= 0).sum(dim=1).tolist()
    return [out.sequences[i, len(prompt) : len(prompt) + n].tolist() for i, n in enumerate(lengths)]
