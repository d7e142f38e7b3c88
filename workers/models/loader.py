"""Checkpoint tensors by name, read lazily, so that a rank copies only its shard of each.

A weight is a `torch.Tensor` (a state dict already in memory) or a safetensors slice (a file
opened, nothing read yet); `narrow` reads the part a rank keeps, and only that part is read
from a safetensors file. Nothing here knows a model's names or how it is split.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# A tensor, or a safetensors `PySafeSlice` (indexable like one, read on indexing).
Weight = Any


def checkpoint_weights(path: str | Path) -> Iterator[tuple[str, Weight]]:
    """(name, weight) for every tensor of a Hugging Face checkpoint folder: its `*.safetensors`
    files, else its `pytorch_model*.bin` files (memory-mapped). Each weight is valid until the
    next one is yielded."""
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    yield name, f.get_slice(name)
        return
    files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin files in {folder}")
    for file in files:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        yield from state.items()


def shape_of(weight: Weight) -> tuple[int, ...]:
    if isinstance(weight, torch.Tensor):
        return tuple(weight.shape)
    return tuple(weight.get_shape())


def narrow(weight: Weight, dim: int, start: int, length: int) -> torch.Tensor:
    """Rows (dim 0) or columns (dim 1) `[start, start + length)` of `weight`, as a tensor."""
    index = (slice(None),) * dim + (slice(start, start + length),)
    return weight[index]


def whole(weight: Weight) -> torch.Tensor:
    return weight if isinstance(weight, torch.Tensor) else weight[:]
