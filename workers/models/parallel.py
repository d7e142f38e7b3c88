"""The tensor-parallel group a model's layers talk through: rank, size and two collectives.

`SingleRank` is the whole story at tensor_parallel_size 1: its collectives return their input,
so a model built for one rank pays nothing for being parallel-capable. `ProcessGroup` wraps a
`torch.distributed` group (gloo on CPU, NCCL on GPUs). Layers see only `ParallelContext`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist


class ParallelContext(Protocol):
    """What a layer may ask of its tensor-parallel group."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `x` (same shape on every rank); may reuse `x`'s memory."""
        ...

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's `x` (same shape on every rank) concatenated along `dim`, rank order."""
        ...


class SingleRank:
    """One rank: every collective is the identity."""

    rank = 0
    world_size = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return x


SINGLE_RANK = SingleRank()


class ProcessGroup:
    """A `torch.distributed` process group as a `ParallelContext` (the default group: None)."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self._rank = dist.get_rank(group)
        self._world_size = dist.get_world_size(group)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self._world_size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)


def init_process_group(
    *, rank: int, world_size: int, init_method: str, device: torch.device
) -> ProcessGroup:
    """Join this process to a group of `world_size` ranks as `rank` (NCCL for a CUDA device,
    gloo otherwise) and return it as a `ParallelContext`."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    return ProcessGroup()


def shard_size(total: int, world_size: int, what: str) -> int:
    """`total / world_size`, or a ValueError naming `what` and tensor_parallel_size."""
    if total % world_size:
        raise ValueError(
            f"{what} ({total}) is not divisible by tensor_parallel_size ({world_size}); "
            f"choose a tensor_parallel_size that divides {total}"
        )
    return total // world_size


def split_sizes(total: int, world_size: int, what: str, *, unit: int = 1) -> list[int]:
    """`total` in `world_size` contiguous parts, rank order, as even as possible: the first
    `total % world_size` ranks take one more (1536 over 2: 768 and 768; 3 over 2: 2 and 1). Where
    they divide, every part is `shard_size`'s. With a `unit` that divides `total` into at least
    `world_size` parts, whole units are split instead (96 in units of 32 over 2: 64 and 32).
    A ValueError, naming `what` and tensor_parallel_size, where a rank would get nothing."""
    if unit > 1 and total % unit == 0 and total // unit >= world_size:
        return [n * unit for n in split_sizes(total // unit, world_size, what)]
    if total < world_size:
        raise ValueError(
            f"{what} ({total}) is smaller than tensor_parallel_size ({world_size}): a rank would "
            f"hold none; choose a tensor_parallel_size of at most {total}"
        )
    base, extra = divmod(total, world_size)
    return [base + (rank < extra) for rank in range(world_size)]
