"""The paged KV cache: fixed-size blocks of key/value slots per layer, owned by the worker.

The router's block manager decides which blocks a sequence uses; this module only holds the
tensors and knows their geometry. Slot `b * block_size + i` is token `i` of block `b`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvray.workers.host_memory import lazy_zeros

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class KVCacheSpec:
    """Geometry of one model's KV cache, read from its config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def from_model_config(cls, config: PretrainedConfig, dtype: torch.dtype) -> KVCacheSpec:
        text = config.get_text_config()
        num_heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
        num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
        return cls(text.num_hidden_layers, num_kv_heads, head_dim, dtype)

    def bytes_per_block(self, block_size: int) -> int:
        element = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * element


class KVCache:
    """Per-layer key and value tensors, each [(num_blocks + 1) * block_size, num_kv_heads, head_dim].

    Blocks 0..num_blocks-1 are the router's to hand out. One more, `null_block`, is never handed
    out: padding rows of a decode graph (workers/decode_graphs.py) write and read it.
    """

    def __init__(
        self, spec: KVCacheSpec, *, num_blocks: int, block_size: int, device: torch.device
    ) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.null_block = num_blocks
        shape = ((num_blocks + 1) * block_size, spec.num_kv_heads, spec.head_dim)
        # NOTE: zero-filled, not empty: padded gathers read slots that are masked out, and
        # uninitialised memory may hold NaN/inf, which a masked softmax still multiplies by 0.
        self.layers = [
            (_zeros(shape, spec.dtype, device), _zeros(shape, spec.dtype, device))
            for _ in range(spec.num_layers)
        ]

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.spec.bytes_per_block(self.block_size)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks, (src, dst) each, in every layer: copy-on-write of shared blocks."""
        if not pairs:
            return
        device = self.layers[0][0].device
        src = torch.tensor([p[0] for p in pairs], device=device)
        dst = torch.tensor([p[1] for p in pairs], device=device)
        for layer in self.layers:
            for cache in layer:
                blocks = cache.view(self.num_blocks + 1, -1)  # [blocks, block_size * heads * dim]
                blocks.index_copy_(0, dst, blocks.index_select(0, src))


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """On CPU the kernel's untouched zero pages, resident only once a block is written: the
    budget bounds the cache's memory instead of being paid at start."""
    if device.type == "cpu":
        return lazy_zeros(shape, dtype)
    return torch.zeros(shape, dtype=dtype, device=device)
