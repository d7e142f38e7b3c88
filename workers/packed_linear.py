"""bf16 linear layers on CPU with their weights prepacked once, at load.

`pack_linears(model)` swaps every `nn.Linear` of a bf16 model on CPU for a `PackedLinear`,
which keeps one prepacked copy of its weight for one of two kernels:

- **kvray's** (`csrc/bf16_linear.cpp`), on CPUs with AVX512-BF16 and no AMX: weights in panels
  of 32 output features, streamed at the memory's speed for a decode and multiplied at
  vdpbf16ps's speed for a batch. On this project's 2-core EPYC, over SmolLM2-135M's 121 layers
  (`bench/bf16_linear.py`): 1.42x oneDNN at 1 row (26.7 against 18.8 GB/s), 1.22x at 32 rows,
  1.05x at 512 (ADR 0011).
- **oneDNN's** (its blocked layout, what inductor's weight freezing does), everywhere else: on
  AMX CPUs, where oneDNN multiplies prompts on the tile unit, and where kvray's kernels are not
  built. That is about twice as fast as a plain bf16 `F.linear`, with bitwise-equal results.

Both sum in fp32 in input order, so their results equal `F.linear`'s but for rare last-bit
roundings. fp32 weights are left alone: fp32 is what the exactness tests compare with Hugging
Face.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from kvray.workers import cpu_kernels
from kvray.workers.device import cpu_flags, cpu_has_native_bf16

logger = logging.getLogger(__name__)


def _kvray_kernel(in_features: int) -> cpu_kernels.Bf16Linear | None:
    """kvray's kernel where it beats oneDNN: AVX512-BF16 without AMX, an even in_features."""
    if "amx_bf16" in cpu_flags() or in_features % 2:
        return None
    return cpu_kernels.bf16_linear()


class PackedLinear(nn.Module):
    """`nn.Linear` with a prepacked bf16 weight (no gradients; inference only)."""

    packed_weight: torch.Tensor  # kvray's panels or oneDNN's blocked layout of [out, in]
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self._kernel = _kvray_kernel(self.in_features)
        if self._kernel is not None:
            packed = self._kernel.pack(weight)
        else:
            # NOTE: no batch-size hint: one layout serves decodes and prompt chunks alike.
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.register_buffer("packed_weight", packed, persistent=False)
        bias = None if linear.bias is None else linear.bias.detach()
        if bias is not None and self._kernel is not None:
            bias = bias.float()  # what the kernel adds, before its one rounding to bf16
        self.register_buffer("bias", bias, persistent=False)

    @property
    def kernel(self) -> str:
        return "oneDNN" if self._kernel is None else "kvray"

    @property
    def weight(self) -> torch.Tensor:  # [out_features, in_features]
        """The weight unpacked (a copy): for model code that reads a linear layer's weight."""
        if self._kernel is not None:
            return self._kernel.unpack(self.packed_weight, self.out_features)
        return self.packed_weight.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in_features]
        rows = x.reshape(-1, self.in_features)
        if self._kernel is not None:
            out = self._kernel.linear(rows, self.packed_weight, self.out_features, self.bias)
        else:
            out = torch.ops.mkldnn._linear_pointwise(
                rows, self.packed_weight, self.bias, "none", [], ""
            )
        return out.view(*x.shape[:-1], self.out_features)


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """bf16 on a CPU that multiplies bf16 in hardware: elsewhere oneDNN either refuses bf16
    weights (AVX2) or emulates them no faster and with other rounding (AVX-512 without BF16)."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and cpu_has_native_bf16()
    )


def pack_linears(model: nn.Module) -> dict[str, int]:
    """Replace each plain `nn.Linear` of `model` (bf16, CPU) by a `PackedLinear`; returns how
    many each kernel got. Subclasses (routers, scaled heads, quantized layers) keep their own
    `forward`.

    A weight tied to another (an output layer sharing the embeddings) gets its own packed copy.
    """
    sites = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16
    ]
    packed: dict[int, PackedLinear] = {}  # one packed layer for a layer with two parents
    for parent, name in sites:
        # NOTE: fetched here, not kept in `sites`: each original is freed once replaced, so
        # loading never holds two copies of every weight.
        child = getattr(parent, name)
        if id(child) not in packed:
            packed[id(child)] = PackedLinear(child)
        setattr(parent, name, packed[id(child)])
    counts: dict[str, int] = {}
    for layer in packed.values():
        counts[layer.kernel] = counts.get(layer.kernel, 0) + 1
    return counts
