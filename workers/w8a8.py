"""int8 weights times int8 activations for CPU linear layers (`quantization: w8a8`).

The weights are `quantize_int8`'s (int8, one bf16 scale per group of 32 inputs of an output
feature); each call quantizes its activations the same way, per row and group of 32, with an
fp32 scale (llama.cpp's Q8_0 x Q8_0), and multiplies 8-bit integers: csrc/w8a8_linear.cpp where
it is built (AVX512-VNNI, or AVX2; AMX-INT8 tiles from 16 rows where the CPU has them), else
`reference_linear`, the same math in torch ops. Weight-only int8 (workers/quantization.py)
keeps the activations exact and widens the weights instead.

On CPUs with AMX, inputs of `AMX_WIDEN_ROWS` rows or more (prompt chunks, big decode batches)
are not quantized: the layer's weights are widened to bf16 (`dequantize`, the same values
weight-only int8 multiplies by) for one oneDNN matmul on the tile unit. The kernel's AMX-INT8
path works a group of 32 inputs per tile product and scales every group's sums with AVX512, so
on big inputs oneDNN's bf16 tiles pass it: SmolLM2-135M's layer shapes, 2 cores, widened
against the kernel 0.97-0.98x at 128 rows, 1.3-1.5x at 512, 1.8-2.2x at 2048 (the kernel:
2.1-2.3x the widened layers at 32 rows). Such a step's products are then weight-only int8's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvray.workers import cpu_kernels
from kvray.workers.device import cpu_flags
from kvray.workers.quantization import GROUP_SIZE, can_quantize, quantize_int8

AMX_WIDEN_ROWS = 128  # rows from which an AMX CPU widens the weights to bf16 (see above)

# Output features per torch-reference chunk: bounds its [groups, rows, chunk] fp32 products.
_REFERENCE_CHUNK = 4096


class Int8ActLinear(nn.Module):
    """`nn.Linear` with int8 weights (a bf16 scale per group of GROUP_SIZE) whose inputs are
    quantized to int8 at every call. CPU only: the constructor refuses other devices. Where the
    kernel is built, the weights are kept in its panels (`to_panels`), else in rows."""

    weight_int8: torch.Tensor  # rows: [out, in]; panels: [ceil(out / 16), in / 4, 16, 4]
    scale: torch.Tensor  # rows: bf16 [out, in / GROUP_SIZE]; panels: fp32 [panels, in / 32, 16]
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.weight.device.type != "cpu":
            raise ValueError(f"w8a8 layers run on CPU only, got a layer on {linear.weight.device}")
        if linear.in_features % GROUP_SIZE:
            raise ValueError(
                f"w8a8 needs in_features divisible by {GROUP_SIZE}, got {linear.in_features}"
            )
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_int8(linear.weight.detach())
        self._ops = cpu_kernels.w8a8()
        if self._ops is not None:
            weight, scale = to_panels(weight, scale)
        self.register_buffer("weight_int8", weight, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias, persistent=False)
        amx = self._ops is not None and "amx_bf16" in cpu_flags()
        self.widen_from: int | None = AMX_WIDEN_ROWS if amx else None

    @property
    def in_panels(self) -> bool:
        """Whether the weights are in the kernel's panels (else in rows: no kernel built)."""
        return self._ops is not None

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 [out, in], bf16 scales [out, in / GROUP_SIZE]), from either layout."""
        if self._ops is None:
            return self.weight_int8, self.scale
        return from_panels(self.weight_int8, self.scale, self.out_features)

    @property
    def weight(self) -> torch.Tensor:  # [out_features, in_features], fp32
        """The dequantized weight (a copy): for model code that reads a linear layer's weight."""
        weight, scale = self.rows()
        groups = weight.view(self.out_features, -1, GROUP_SIZE).float()
        return (groups * scale.float()[:, :, None]).view(self.out_features, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in_features], bf16 or fp32
        rows = x.reshape(-1, self.in_features)
        widen = self.widen_from is not None and rows.shape[0] >= self.widen_from
        if self._ops is not None and widen and rows.dtype == torch.bfloat16:
            weight = self._ops.dequantize(self.weight_int8, self.scale, self.out_features)
            bias = None if self.bias is None else self.bias.to(rows.dtype)
            out = F.linear(rows, weight, bias)
        elif self._ops is not None:
            out = self._ops.linear(rows, self.weight_int8, self.scale, self.out_features, self.bias)
        else:
            out = reference_linear(rows, self.weight_int8, self.scale, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


PANEL = 16  # output features per panel of csrc/w8a8_linear.cpp: one 32-bit lane each
QUAD = 4  # inputs per lane


def to_panels(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_int8`'s rows as the kernel's panels: int8 [panels, in / 4, 16, 4] (quad row q
    of a panel holds its 16 features' weights for inputs 4q .. 4q + 3) and fp32 scales
    [panels, in / GROUP_SIZE, 16]; out_features padded to whole panels with zero weights."""
    pad = -weight.shape[0] % PANEL
    weight = F.pad(weight, (0, 0, 0, pad))
    scale = F.pad(scale.float(), (0, 0, 0, pad))
    panels = weight.shape[0] // PANEL
    packed = weight.view(panels, PANEL, -1, QUAD).permute(0, 2, 1, 3).contiguous()
    return packed, scale.view(panels, PANEL, -1).permute(0, 2, 1).contiguous()


def from_panels(
    packed: torch.Tensor, scale: torch.Tensor, out_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`to_panels` inverted: (int8 [out, in], bf16 [out, in / GROUP_SIZE]); the scales were
    bf16 values, so the round trip is exact."""
    weight = packed.permute(0, 2, 1, 3).reshape(-1, packed.shape[1] * QUAD)[:out_features]
    rows_scale = scale.permute(0, 2, 1).reshape(-1, scale.shape[1])[:out_features]
    return weight.contiguous(), rows_scale.to(torch.bfloat16)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 of each row's groups of GROUP_SIZE: (int8 [rows, in], fp32 scales [rows, in / 32]),
    `round(x * (127 / amax))` (nearest even) and `amax / 127`; an all-zero group gives zeros.
    NOTE: the kernel's fp32 operations in its order, so the two agree bit for bit."""
    rows, in_features = x.shape
    groups = x.float().view(rows, in_features // GROUP_SIZE, GROUP_SIZE)
    amax = groups.abs().amax(dim=2)  # [rows, groups]
    # NOTE: a true division: `127.0 / amax` is torch's `amax.reciprocal() * 127`, rounded twice.
    inverse = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(groups * inverse[:, :, None]).to(torch.int8)
    return q.view(rows, in_features), amax / 127.0


def reference_linear(
    x: torch.Tensor,  # [rows, in_features], bf16 or fp32
    weight: torch.Tensor,  # [out_features, in_features] int8
    scale: torch.Tensor,  # [out_features, in_features / GROUP_SIZE] bf16
    bias: torch.Tensor | None,
) -> torch.Tensor:  # [rows, out_features], x's dtype
    """The kernel's math in torch ops: each group's int8 dot (exact: in fp32, every partial sum
    is an integer below 2^24) times both scales, summed over the groups in fp32."""
    q, x_scale = quantize_activations(x)
    num_groups = x.shape[1] // GROUP_SIZE
    qx = q.float().view(x.shape[0], num_groups, GROUP_SIZE).transpose(0, 1)  # [groups, rows, 32]
    chunks = []
    for start in range(0, weight.shape[0], _REFERENCE_CHUNK):
        w = weight[start : start + _REFERENCE_CHUNK]
        qw = w.float().view(w.shape[0], num_groups, GROUP_SIZE).permute(1, 2, 0)  # [g, 32, n]
        dots = torch.bmm(qx, qw)  # [groups, rows, n]
        scales = (
            x_scale.t()[:, :, None]
            * scale[start : start + _REFERENCE_CHUNK].float().t()[:, None, :]
        )
        chunks.append((dots * scales).sum(dim=0))
    out = torch.cat(chunks, dim=1)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def quantize_linears_w8a8(model: nn.Module) -> int:
    """Replace each plain `nn.Linear` of `model` (see `can_quantize`) by an `Int8ActLinear`;
    returns how many. A layer with two parents (an output layer tied to the embeddings) is
    quantized once; the embeddings themselves stay in the model's dtype."""
    sites = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if can_quantize(child)
    ]
    done: dict[int, Int8ActLinear] = {}
    for parent, name in sites:
        child = getattr(parent, name)  # fetched here: each original is freed once replaced
        if id(child) not in done:
            done[id(child)] = Int8ActLinear(child)
        setattr(parent, name, done[id(child)])
    return len(done)
