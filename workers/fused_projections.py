"""Sibling projections that read the same input (q/k/v, gate/up) computed as one matmul.

transformers' Llama-family attention calls `q_proj(x)`, `k_proj(x)` and `v_proj(x)` one after
the other, and its MLP `gate_proj(x)` and `up_proj(x)`: per layer five small matmuls where two
would do. `fuse_projections(model)` swaps each such set for one linear layer over the
concatenated weights (which `pack_linears` or `quantize_linears` then convert as any other) and
leaves a `ProjectionSlice` in each original's place: the first slice called with an input runs
the fused layer, the others return their columns of the same output. The model's code is
unchanged.

NOTE: only where exactness is not promised (bf16, fp16): a fused fp32 matmul may sum in another
order than Hugging Face's three. int8 layers are fused too (quantized per row after fusing, so
to the same values), which the one-call decode step needs. Only for model types whose attention
and MLP are known to pass the same tensor to every sibling; a slice given another input
computes its own result anyway, so a wrong guess costs time, never correctness.
"""

from __future__ import annotations

import torch
from torch import nn

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedInputProjection(nn.Module):
    """One linear layer whose output columns belong to several sibling projections."""

    def __init__(self, fused: nn.Linear, sizes: list[int]) -> None:
        super().__init__()
        self.fused = fused  # replaced in place by PackedLinear / Int8Linear later
        self.bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._unread = 0

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if x is not self._input:  # a new input: run the fused layer once for every sibling
            self._input, self._output = x, self.fused(x)
            self._unread = len(self.bounds) - 1
        assert self._output is not None
        out = self._output[..., self.bounds[index] : self.bounds[index + 1]]
        self._unread -= 1
        if self._unread == 0:  # every sibling has its part: hold no activations past the layer
            self._input = self._output = None
        return out


class ProjectionSlice(nn.Module):
    """Stands where one sibling projection was; its output is a column range of the fused one."""

    def __init__(self, shared: SharedInputProjection, index: int, linear: nn.Linear) -> None:
        super().__init__()
        self.shared = shared
        self.index = index
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self) -> torch.Tensor:  # [out_features, in_features] (a copy where packed)
        """For model code that reads a projection's weight (its dtype, its shape)."""
        start, end = self.shared.bounds[self.index], self.shared.bounds[self.index + 1]
        return self.shared.fused.weight[start:end]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.part(self.index, x)


def fuse_projections(model: nn.Module) -> int:
    """Fuse each sibling set of plain `nn.Linear` layers in `model`; returns how many sets."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None else None
    if getattr(text, "model_type", None) not in MODEL_TYPES:
        return 0
    count = 0
    for parent in list(model.modules()):
        for names in SIBLINGS:
            found = [getattr(parent, name, None) for name in names]
            layers = [layer for layer in found if type(layer) is nn.Linear]
            if len(layers) < len(names) or not _fusable(layers):
                continue
            fused = _concatenate(layers)
            shared = SharedInputProjection(fused, [layer.out_features for layer in layers])
            for index, (name, layer) in enumerate(zip(names, layers)):
                setattr(parent, name, ProjectionSlice(shared, index, layer))
            # NOTE: registered on the parent, so `model.modules()` finds the fused layer for
            # pack_linears / quantize_linears.
            parent.add_module("fused_" + "_".join(n.removesuffix("_proj") for n in names), shared)
            count += 1
    return count


def _fusable(layers: list[nn.Linear]) -> bool:
    first = layers[0]
    return all(
        layer.in_features == first.in_features
        and (layer.bias is None) == (first.bias is None)
        and layer.weight.dtype == first.weight.dtype
        and layer.weight.device == first.weight.device
        for layer in layers
    )


def _concatenate(layers: list[nn.Linear]) -> nn.Linear:
    first = layers[0]
    fused = nn.Linear(
        first.in_features,
        sum(layer.out_features for layer in layers),
        bias=first.bias is not None,
        device="meta",
    )
    weight = torch.cat([layer.weight.detach() for layer in layers])
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if first.bias is not None:
        bias = torch.cat([layer.bias.detach() for layer in layers if layer.bias is not None])
        fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused
