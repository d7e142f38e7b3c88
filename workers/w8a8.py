"""int8 weights times int8 activations for CPU linear layers (`quantization: w8a8`).

Every call quantizes its activations with one scale per row (per token), and the weights carry
one scale per output feature, so a row's whole dot is summed in integers before anything is
scaled: on AMX CPUs in the tile unit's registers, the full depth of the layer. One scale for a
whole row would be set by its few large inputs (outlier channels) and leave the rest of the row
few levels, so each row is first rotated, a block of 32 inputs at a time, by the 32 x 32
Hadamard matrix H (+-1 entries, H H = 32 I), which spreads an outlier over its block; the
weights are rotated alike once, at load (W H / 32), so the product is the layer's. On
SmolLM2-135M, quantizing per token without the rotation multiplies the KL to fp32 by ~8 (0.125
against 0.016 with it); the rotated scheme's KL is ~1.2x that of a scale per group of 32 inputs
on both operands (llama.cpp's Q8_0 x Q8_0), whose per-group scaling halves the tile unit's
rate (ADR 0009). The arithmetic: csrc/w8a8_linear.cpp where it is built (AVX512-VNNI, or AVX2;
AMX-INT8 tiles from 16 rows where the CPU has them), else `reference_linear`, the same math in
torch ops. Weight-only int8 (workers/quantization.py) keeps the activations exact and widens
the weights instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvray.workers import cpu_kernels
from kvray.workers.quantization import can_quantize

BLOCK = 32  # inputs per rotated block: a layer's inputs must be whole blocks
DEPTH = 64  # inputs are padded to a multiple of this (one AMX tile product's)
_REFERENCE_CHUNK = 4096  # output features per float64 product of the torch reference


class Int8ActLinear(nn.Module):
    """`nn.Linear` with rotated int8 weights (an fp32 scale per output feature) whose inputs are
    rotated and quantized to int8 at every call. CPU only: the constructor refuses other
    devices. Where the kernel is built, the weights are kept in its panels (`to_panels`), else
    in rows."""

    weight_int8: torch.Tensor  # rows: [out, padded]; panels: [ceil(out / 32), padded / 4, 32, 4]
    scale: torch.Tensor  # fp32; rows: [out]; panels: [panels, 1, 16]
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.weight.device.type != "cpu":
            raise ValueError(f"w8a8 layers run on CPU only, got a layer on {linear.weight.device}")
        if linear.in_features % BLOCK:
            raise ValueError(
                f"w8a8 needs in_features divisible by {BLOCK}, got {linear.in_features}"
            )
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_rows(linear.weight.detach(), weights=True)
        self._ops = cpu_kernels.w8a8()
        if self._ops is not None:
            weight, scale = to_panels(weight, scale)
        self.register_buffer("weight_int8", weight, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias, persistent=False)

    @property
    def in_panels(self) -> bool:
        """Whether the weights are in the kernel's panels (else in rows: no kernel built)."""
        return self._ops is not None

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 [out, padded], fp32 scales [out]): the rotated weights, from either layout."""
        if self._ops is None:
            return self.weight_int8, self.scale
        return from_panels(self.weight_int8, self.scale, self.out_features)

    @property
    def weight(self) -> torch.Tensor:  # [out_features, in_features], fp32
        """The dequantized weight (a copy), rotated back: for model code that reads a linear
        layer's weight. (W H / 32) H = W."""
        weight, scale = self.rows()
        rotated = weight[:, : self.in_features].float() * scale[:, None]
        return hadamard32(rotated)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in_features], bf16 or fp32
        rows = x.reshape(-1, self.in_features)
        if self._ops is not None:
            out = self._ops.linear(rows, self.weight_int8, self.scale, self.out_features, self.bias)
        else:
            out = reference_linear(rows, self.weight_int8, self.scale, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


# Output features per panel of csrc/w8a8_linear.cpp: two slices of 16 (one 32-bit lane each) side
# by side, so a tile reads its weights as one stream of 128-byte quad rows.
PANEL = 32
QUAD = 4  # inputs per lane


def to_panels(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows`' rows as the kernel's panels: int8 [panels, padded / 4, 32, 4] (quad row
    q of a panel holds its 32 features' weights for inputs 4q .. 4q + 3) and fp32 scales
    [panels, 1, 32]; out_features padded to whole panels with zero weights."""
    pad = -weight.shape[0] % PANEL
    weight = F.pad(weight, (0, 0, 0, pad))
    scale = F.pad(scale.float(), (0, pad))
    panels = weight.shape[0] // PANEL
    packed = weight.view(panels, PANEL, -1, QUAD).permute(0, 2, 1, 3).contiguous()
    return packed, scale.view(panels, 1, PANEL)


def from_panels(
    packed: torch.Tensor, scale: torch.Tensor, out_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`to_panels` inverted: (int8 [out, padded], fp32 [out])."""
    weight = packed.permute(0, 2, 1, 3).reshape(-1, packed.shape[1] * QUAD)[:out_features]
    return weight.contiguous(), scale.reshape(-1)[:out_features]


def hadamard32(x: torch.Tensor) -> torch.Tensor:  # [rows, in], in a multiple of 32 -> fp32
    """Each block of 32 of each row times the 32 x 32 Hadamard matrix (+-1, unnormalized: H H
    = 32 I): butterflies (a + b, a - b) on pairs i, i + h for h = 1, 2, 4, 8, 16, in fp32.
    NOTE: the kernel's additions in its order, so the two agree bit for bit."""
    z = x.float().reshape(-1, BLOCK)
    for h in (1, 2, 4, 8, 16):
        pairs = z.view(-1, BLOCK // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        z = torch.stack((a + b, a - b), dim=2).view(-1, BLOCK)
    return z.view(x.shape)


def quantize_rows(
    x: torch.Tensor, weights: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:  # int8 [rows, padded], fp32 [rows]
    """Each row rotated (`hadamard32`) and quantized with one scale: `round(z * (127 / amax))`
    (nearest even) and `amax / 127` (an all-zero row: zeros and a zero scale), padded with zeros
    to a multiple of DEPTH inputs. Activations as the kernel quantizes them; `weights`: a
    layer's rows (one per output feature), rotated by H / 32, so that (W H / 32)(H x) = W x."""
    z = hadamard32(x)
    if weights:
        z = z / BLOCK  # exact: a power of two
    amax = z.abs().amax(dim=1)
    # NOTE: a true division: `127.0 / amax` is torch's `amax.reciprocal() * 127`, rounded twice.
    inverse = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(z * inverse[:, None]).to(torch.int8)
    return F.pad(q, (0, -x.shape[1] % DEPTH)), amax / 127.0


def reference_linear(
    x: torch.Tensor,  # [rows, in_features], bf16 or fp32
    weight: torch.Tensor,  # [out_features, padded] int8, `quantize_rows(..., weights=True)`
    scale: torch.Tensor,  # [out_features] fp32
    bias: torch.Tensor | None,
) -> torch.Tensor:  # [rows, out_features], x's dtype
    """The kernel's math in torch ops: the exact integer dots (in float64: every sum is an
    integer below 2^53), rounded to fp32, times both scales (their fp32 product), plus the bias
    in fp32: the kernel's operations, so the two agree bit for bit."""
    q, x_scale = quantize_rows(x)
    qx = q.double()
    dots = torch.cat(
        [qx @ w.double().t() for w in weight.split(_REFERENCE_CHUNK)], dim=1
    ).float()  # chunks of output features bound the float64 copies of the weights
    out = dots * (x_scale[:, None] * scale[None, :])
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
