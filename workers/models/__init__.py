"""kvray's own models: a registry from Hugging Face `model_type` to a model built from
kvray's layers (`layers.py`), which can be split over tensor-parallel ranks and pipeline stages
(`pipeline.py`).

Every other architecture runs on transformers' own modules, on one rank only.
`model_class` decides which, once, at load; `load_model` builds a rank's model and copies its
shard of the checkpoint.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any, Protocol

import torch

from kvray.workers.kv_cache import KVCacheSpec
from kvray.workers.models.layers import Placement
from kvray.workers.models.loader import Weight
from kvray.workers.models.pipeline import Stage

# model_type -> "module:class", imported on first use
MODELS = {
    "llama": "kvray.workers.models.llama:LlamaForCausalLM",
    "mistral": "kvray.workers.models.llama:LlamaForCausalLM",
    "qwen2": "kvray.workers.models.llama:LlamaForCausalLM",
    "qwen3": "kvray.workers.models.llama:LlamaForCausalLM",
}


class CausalLM(Protocol):
    """What the runner and the executor call on one rank's model."""

    config: Any

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor | int
    ) -> torch.Tensor:
        """[1, n] token ids and positions -> [1, k, vocab] logits of the kept rows, on every
        rank, inside `attention.attention_context` (this rank's KV cache)."""
        ...

    def kv_cache_spec(self, dtype: torch.dtype) -> KVCacheSpec: ...

    def use_cpu_ops(self) -> None:
        """Run norms and rotary embeddings as kvray's C++ ops (bf16 on CPU: bitwise the
        same); the execution plan decides."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, Weight]]) -> None: ...


def is_own_model(model: object) -> bool:
    """Whether `model` is one of kvray's own models (not transformers')."""
    return type(model).__module__.startswith(__name__ + ".")


def supported_architectures() -> list[str]:
    """The model types kvray has its own model for (the ones tensor parallelism can split)."""
    return sorted(MODELS)


def model_class(
    model_type: str, *, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1
) -> type | None:
    """kvray's model class for `model_type`, or None where transformers' modules run.

    Raises:
        ValueError: tensor_parallel_size or pipeline_parallel_size > 1 for an architecture
            kvray has no model of, naming the setting.
    """
    target = MODELS.get(model_type)
    if target is None:
        sizes = [("tensor_parallel_size", tensor_parallel_size)]
        sizes.append(("pipeline_parallel_size", pipeline_parallel_size))
        split = [f"{name} {size}" for name, size in sizes if size > 1]
        if split:
            raise ValueError(
                f"{' x '.join(split)} needs one of kvray's own models; model_type "
                f"{model_type!r} runs on transformers' modules, on one rank only "
                f"(tensor_parallel_size 1, pipeline_parallel_size 1). Architectures kvray "
                f"can split: {', '.join(supported_architectures())}"
            )
        return None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def load_model(
    config: Any,
    weights: Iterable[tuple[str, Weight]],
    placement: Placement,
    stage: Stage | None = None,
) -> CausalLM:
    """Build this rank's model of `config` in `placement` (of `stage`'s layers; by default
    the whole model) and copy its shard of `weights` ((Hugging Face name, tensor) pairs: a
    state dict's items, `loader.checkpoint_weights`).

    Raises:
        ValueError: no kvray model for `config.model_type`; a size tensor parallelism cannot
            split (heads, key/value heads, intermediate size), naming tensor_parallel_size;
            weights missing from the checkpoint.
    """
    size = placement.parallel.world_size
    cls = model_class(config.model_type, tensor_parallel_size=size)
    if cls is None:
        raise ValueError(
            f"kvray has no model of its own for model_type {config.model_type!r}; "
            f"it has for {', '.join(supported_architectures())}"
        )
    model = cls(config, placement, stage)
    model.load_weights(weights)
    return model.eval()
