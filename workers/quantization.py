"""Weight-only int8 linear layers for CPU (`quantization: int8`).

Every group of `GROUP_SIZE` consecutive weights of an output feature is scaled to [-127, 127]
and rounded, with one bf16 scale per group (llama.cpp's Q8_0 layout: 8.5 bits per weight);
activations stay in the model's dtype. A decode step reads every weight once, so halving the
bytes per weight against bf16 is what makes it faster. Every path multiplies by the same
dequantized weights, `dtype(weight * scale)`:

- bf16 models, where csrc/int8_panel.cpp is built (AVX512-BF16): the weights in bf16_linear's
  panels, widened in registers, for any number of rows. On SmolLM2-135M's shapes (2 cores): a
  decode step 1.48x bf16's at one stream, 1.05x at 8, 0.85x at 32 (compute-bound: widening
  costs more than the bytes saved); a 128-row prompt chunk 1.0-1.2x bf16's time. On CPUs
  with AMX, past `AMX_MIN_ROWS` rows the panels are widened to bf16 for one oneDNN matmul on
  the tile unit instead (the panels' AVX512-BF16 arithmetic runs at a fraction of it).
- fp32 models, and CPUs without AVX512-BF16: the weights in rows, csrc/int8_linear.cpp up to
  `KERNEL_MAX_ROWS` rows; past that (prompt chunks) the layer is widened to the activations'
  dtype for one oneDNN matmul.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from kvray.workers import cpu_kernels
from kvray.workers.device import cpu_flags

logger = logging.getLogger(__name__)

GROUP_SIZE = 32  # weights per scale; the kernel needs a multiple of 32 dividing in_features
# Rows up to which the row-layout kernel beats widening the weights for oneDNN (bench: 30 layers
# of SmolLM2-135M's shapes, bf16, 2 cores: 32 rows 64 against 149 ms, 64 rows 146 against 155).
KERNEL_MAX_ROWS = 64
# Rows from which a bf16 layer's panels are widened for oneDNN where the CPU has AMX (2-core
# Xeon, SmolLM2-135M's shapes: at 64 rows 1.3-1.5x the panels' speed, at 128 2.2-2.4x, at 512
# 4.7-5.4x; at 32 rows the widening costs about what the tile unit saves).
AMX_MIN_ROWS = 64


class Int8Linear(nn.Module):
    """`nn.Linear` with int8 weights and a bf16 scale per group of GROUP_SIZE weights.

    A bf16 layer keeps them in bf16_linear's panels of 32 output features (`PANEL`), for
    csrc/int8_panel.cpp, where that kernel is built; others (fp32 layers, CPUs without
    AVX512-BF16) keep rows, for csrc/int8_linear.cpp."""

    weight_int8: torch.Tensor  # rows: [out, in]; panels: [ceil(out / 32), in / 2, 32, 2]
    scale: torch.Tensor  # bf16; rows: [out, in / GROUP_SIZE]; panels: [panels, in / GROUP_SIZE, 32]
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_int8(linear.weight.detach())
        on_cpu = weight.device.type == "cpu"
        self._panel = (
            cpu_kernels.int8_panel() if on_cpu and linear.weight.dtype == torch.bfloat16 else None
        )
        if self._panel is not None:
            weight, scale = to_panels(weight, scale)
        self.register_buffer("weight_int8", weight, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias, persistent=False)
        self._kernel = cpu_kernels.int8_linear() if on_cpu else None
        self._dequantize = cpu_kernels.int8_dequantize() if on_cpu else None
        self.widen_from: int | None = AMX_MIN_ROWS if "amx_bf16" in cpu_flags() else None

    @property
    def layout(self) -> str:
        return "rows" if self._panel is None else "panels"

    @property
    def weight(self) -> torch.Tensor:  # [out_features, in_features], fp32
        """The dequantized weight (a copy): for model code that reads a linear layer's weight."""
        return self.dequantized(torch.float32)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:  # [out_features, in_features]
        """`dtype(weight_int8 * scale)`: the weights every path multiplies by."""
        if self._panel is not None and dtype == torch.bfloat16:
            panels = self._panel.dequantize(self.weight_int8, self.scale, GROUP_SIZE)
            return from_panels(panels, self.out_features)
        weight, scale = self.rows()
        if self._dequantize is not None and dtype in (torch.bfloat16, torch.float32):
            return self._dequantize(weight, scale, GROUP_SIZE, dtype)
        groups = weight.view(self.out_features, -1, GROUP_SIZE).float()
        product = groups * scale.float()[:, :, None]  # exact in fp32
        return product.view(self.out_features, -1).to(dtype)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 [out, in], bf16 scales [out, in / GROUP_SIZE]), from either layout."""
        if self._panel is None:
            return self.weight_int8, self.scale
        scale = self.scale.permute(0, 2, 1).reshape(-1, self.scale.shape[1])
        return from_panels(self.weight_int8, self.out_features), scale[: self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in_features]
        rows = x.reshape(-1, self.in_features)
        few = rows.shape[0] <= KERNEL_MAX_ROWS
        panel = self._panel if x.dtype == torch.bfloat16 else None
        if panel is not None and (self.widen_from is None or rows.shape[0] < self.widen_from):
            out = panel.linear(
                rows, self.weight_int8, self.scale, GROUP_SIZE, self.out_features, self.bias
            )
        elif self._panel is None and self._kernel is not None and few:
            out = self._kernel(rows, self.weight_int8, self.scale, GROUP_SIZE, self.bias)
        else:
            out = F.linear(rows, self.dequantized(x.dtype), self.bias)
        return out.view(*x.shape[:-1], self.out_features)


PANEL = 32  # output features per panel (csrc/bf16_linear.cpp, csrc/int8_panel.cpp)


def to_panels(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_int8`'s rows as panels: int8 [panels, in / 2, 32, 2] (each k-pair row the 32
    features' weights for inputs 2i, 2i + 1) and bf16 scales [panels, in / GROUP_SIZE, 32];
    out_features padded to whole panels with zero weights (scale 1)."""
    out_features, in_features = weight.shape
    pad = -out_features % PANEL
    weight = F.pad(weight, (0, 0, 0, pad))
    scale = F.pad(scale, (0, 0, 0, pad), value=1.0)
    panels = weight.shape[0] // PANEL
    packed = weight.view(panels, PANEL, in_features // 2, 2).permute(0, 2, 1, 3).contiguous()
    return packed, scale.view(panels, PANEL, -1).permute(0, 2, 1).contiguous()


def from_panels(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """`[panels, in / 2, 32, 2]` back to `[out_features, in]` (a copy).

    NOTE: each pair of inputs moves as one element twice as wide: torch's strided copy of
    2-element runs took 6x as long (0.88 against 0.14 ms for a 1536 x 576 bf16 layer)."""
    num_panels, half, panel, two = packed.shape
    pairs = packed.reshape(num_panels, half, panel * two).view(_PAIRS[packed.element_size()])
    rows = pairs.transpose(1, 2).contiguous().view(num_panels * panel, half)
    return rows.view(packed.dtype)[:out_features]


_PAIRS = {1: torch.int16, 2: torch.int32, 4: torch.int64}  # a pair's bytes as one element


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 in groups of GROUP_SIZE along the input features:
    ([out, in] int8, [out, in // GROUP_SIZE] bf16 scales)."""
    out_features, in_features = weight.shape
    groups = weight.float().view(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
    scale = (groups.abs().amax(dim=2) / 127).to(torch.bfloat16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale
    q = torch.round(groups / scale.float()[:, :, None]).clamp(-127, 127).to(torch.int8)
    return q.view(out_features, in_features).contiguous(), scale


def can_quantize(linear: nn.Module) -> bool:
    """A plain `nn.Linear` whose input features split into whole groups (all common LLM widths
    do; others keep their weights)."""
    return type(linear) is nn.Linear and linear.in_features % GROUP_SIZE == 0


def quantize_linears(model: nn.Module) -> int:
    """Replace each plain `nn.Linear` of `model` (see `can_quantize`) by an `Int8Linear`;
    returns how many. A layer with two parents (an output layer tied to the embeddings) is
    quantized once; the embeddings themselves stay in the model's dtype."""
    sites = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if can_quantize(child)
    ]
    done: dict[int, Int8Linear] = {}
    for parent, name in sites:
        child = getattr(parent, name)  # fetched here: each original is freed once replaced
        if id(child) not in done:
            done[id(child)] = Int8Linear(child)
        setattr(parent, name, done[id(child)])
    return len(done)
