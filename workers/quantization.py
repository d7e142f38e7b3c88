"""Weight-only int8 linear layers for CPU (`quantization: int8`).

Each output feature's weights are scaled to [-127, 127] and rounded (symmetric, per channel, as
llama.cpp's Q8_0 and torchao's int8 weight-only do per block or channel); activations stay in
the model's dtype. A decode step reads every weight once, so halving the bytes per weight
against bf16 is what makes it faster: kvray's kernel (csrc/int8_linear.cpp) multiplies a few
rows straight from the int8 weights, about 3x packed bf16 for one row and 1.5x for eight. Past
~8 rows the step is compute-bound and int8 is slower than bf16 (0.7x at 32 rows); past 32
(prompt chunks) the weights are widened to the activations' dtype for one oneDNN matmul.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from kvray.workers import cpu_kernels

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("int8",)
# Rows up to which the kernel is at least as fast as widening the weights for oneDNN (bench:
# 30 layers of SmolLM2-135M's shapes, bf16, 2 cores: 16 rows 0.83x of packed bf16 against
# 0.62x widened, 32 rows 0.70x both, 128 rows 0.67x against 0.87x).
KERNEL_MAX_ROWS = 32


class Int8Linear(nn.Module):
    """`nn.Linear` with int8 weights and one fp32 scale per output feature (inference only)."""

    weight_int8: torch.Tensor  # [out_features, in_features]
    scale: torch.Tensor  # [out_features] fp32: weight ~= scale[:, None] * weight_int8
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_int8(linear.weight.detach())
        self.register_buffer("weight_int8", weight, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias, persistent=False)
        self._kernel = cpu_kernels.int8_linear() if weight.device.type == "cpu" else None

    @property
    def weight(self) -> torch.Tensor:  # [out_features, in_features], fp32
        """The dequantized weight (a copy): for model code that reads a linear layer's weight."""
        return self.weight_int8.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in_features]
        rows = x.reshape(-1, self.in_features)
        if self._kernel is not None and rows.shape[0] <= KERNEL_MAX_ROWS:
            out = self._kernel(rows, self.weight_int8, self.scale, self.bias)
        else:
            # NOTE: the int8 values are exact in bf16 and fp16; the fp32 scale (and the bias)
            # apply to the output in fp32, as in the kernel, so no bf16 scale skews a channel.
            out = F.linear(rows, self.weight_int8.to(x.dtype)).float() * self.scale
            if self.bias is not None:
                out += self.bias
            out = out.to(x.dtype)
        return out.view(*x.shape[:-1], self.out_features)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-feature int8: ([out, in] int8, [out] fp32 scales)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def quantize_linears(model: nn.Module) -> int:
    """Replace each plain `nn.Linear` of `model` by an `Int8Linear`; returns how many. A layer
    with two parents (an output layer tied to the embeddings) is quantized once; the embeddings
    themselves stay in the model's dtype."""
    sites = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    done: dict[int, Int8Linear] = {}
    for parent, name in sites:
        child = getattr(parent, name)  # fetched here: each original is freed once replaced
        if id(child) not in done:
            done[id(child)] = Int8Linear(child)
        setattr(parent, name, done[id(child)])
    return len(done)
