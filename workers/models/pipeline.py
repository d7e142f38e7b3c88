"""Pipeline stages of kvray's own models: which layers a stage holds (`split_layers`), and what
passes between stages in a step (`StageLinks`): hidden states forward, from each rank to the
same tensor-parallel rank of the next stage, and the sampled tokens back, from the last stage
to the same rank of every earlier one.

It knows no model's layers and no sampling; `torch.distributed` send/recv over the replica's
group (gloo on CPU, NCCL on GPUs) is all it uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def split_layers(num_layers: int, num_stages: int) -> list[range]:
    """`num_layers` in `num_stages` contiguous ranges, stage order, as even as possible: the
    first `num_layers % num_stages` stages take one more.

    NOTE: the first stage's extra work is the embedding, a lookup; the last stage's is the
    final norm and the output layer (vocab x hidden: SmolLM2-135M's is the size of ~8 of its
    layers), so a remainder goes to the first stages, not the last.

    Raises:
        ValueError: more stages than layers, naming pipeline_parallel_size.
    """
    if num_stages > num_layers:
        raise ValueError(
            f"pipeline_parallel_size ({num_stages}) is larger than the model's "
            f"num_hidden_layers ({num_layers}): a stage would hold no layer; choose a "
            f"pipeline_parallel_size of at most {num_layers}"
        )
    base, extra = divmod(num_layers, num_stages)
    ranges, first = [], 0
    for index in range(num_stages):
        size = base + (index < extra)
        ranges.append(range(first, first + size))
        first += size
    return ranges


@dataclass(frozen=True)
class Stage:
    """A rank's stage: its layers, its place in the pipeline and its links to the others
    (None with one stage, or while only shapes are built)."""

    index: int
    num_stages: int
    layers: range  # global layer indices, as the checkpoint names them
    links: StageLinks | None = None

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


def make_stage(
    num_layers: int, *, index: int = 0, num_stages: int = 1, links: StageLinks | None = None
) -> Stage:
    """Stage `index` of `num_stages` of a model of `num_layers` (the whole model by default).

    Raises:
        ValueError: more stages than layers, naming pipeline_parallel_size.
    """
    return Stage(index, num_stages, split_layers(num_layers, num_stages)[index], links)


class StageLinks:
    """One rank's sends and receives to its neighbouring stages, on the replica's default
    group. Ranks are ordered stage-major (`rank = stage * tensor_parallel_size + tp_rank`), so
    the same tensor-parallel rank of stage `s + 1` is `rank + tensor_parallel_size`.

    `comm_s` adds up the seconds spent in them: waiting for a neighbour, and the transfer.
    """

    def __init__(
        self,
        *,
        rank: int,
        tensor_parallel_size: int,
        stage_index: int,
        num_stages: int,
        device: torch.device,
    ) -> None:
        tp, last = tensor_parallel_size, num_stages - 1
        self.device = device
        self.previous = rank - tp if stage_index > 0 else None
        self.next = rank + tp if stage_index < last else None
        # NOTE: the last stage samples; every earlier stage appends the same tokens.
        self.sampler_rank = rank + (last - stage_index) * tp
        self.earlier_ranks = [rank - k * tp for k in range(1, stage_index + 1)]
        self.comm_s = 0.0

    def receive_hidden(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The previous stage's hidden states: [1, num_tokens, hidden]."""
        assert self.previous is not None, "the first stage receives no hidden states"
        hidden = torch.empty(shape, dtype=dtype, device=self.device)
        self._timed(dist.recv, hidden, self.previous)
        return hidden

    def send_hidden(self, hidden: torch.Tensor) -> None:  # [1, num_tokens, hidden]
        assert self.next is not None, "the last stage sends no hidden states"
        self._timed(dist.send, hidden.contiguous(), self.next)

    def send_tokens(self, token_ids: list[int]) -> None:
        """The last stage's sampled tokens, to the same rank of every earlier stage (they
        know how many from the step: nothing is sent for none)."""
        if not token_ids or not self.earlier_ranks:
            return
        tokens = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        for rank in self.earlier_ranks:
            self._timed(dist.send, tokens, rank)

    def receive_tokens(self, count: int) -> list[int]:
        """The `count` tokens the last stage sampled this step."""
        if count == 0:
            return []
        tokens = torch.empty(count, dtype=torch.int64, device=self.device)
        self._timed(dist.recv, tokens, self.sampler_rank)
        return [int(t) for t in tokens.tolist()]

    def _timed(self, call: Callable[..., Any], tensor: torch.Tensor, peer: int) -> None:
        start = time.perf_counter()
        call(tensor, peer)
        self.comm_s += time.perf_counter() - start
