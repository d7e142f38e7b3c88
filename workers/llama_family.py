"""kvray's own forward for the Llama family (Llama, Mistral, Qwen2, Qwen3).

On a CPU an eager decode step of SmolLM2-135M spent about as long in Python as in arithmetic:
~10 of ~20 ms went to transformers' module machinery (~450 `nn.Module` calls a step, keyword
plumbing, output capture, mask construction), not to the ~2,000 tensor operations, which cost
~1 us each. `FamilyForward` runs the same tensor operations, in the same order and dtypes, as
transformers' code for these architectures, straight from the model's own modules' weights and
`forward` methods: the logits are bitwise those of `model(...)` (tests compare them for each
architecture, in fp32 and bf16), and loading, projection fusing, packing and quantizing are
unchanged. Every other architecture keeps transformers' forward.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kvray.workers.attention import paged_attention_forward

# model_type -> the class-name prefix of its transformers modules
PREFIXES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}

# (input_ids [1, n], position_ids [1, n], rows to keep: [k] indices or 0 for all) -> [1, k, vocab]
Forward = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | int"], torch.Tensor]


def model_forward(model: nn.Module, device: torch.device) -> Forward:
    """The forward a runner calls: kvray's own for the Llama family on CPU, else transformers'.

    NOTE: CPU only until checked on a GPU, where decode steps replay CUDA graphs anyway."""
    own = family_forward(model) if device.type == "cpu" else None
    return own if own is not None else transformers_forward(model)


def transformers_forward(model: nn.Module) -> Forward:
    def forward(
        input_ids: torch.Tensor, position_ids: torch.Tensor, keep: torch.Tensor | int
    ) -> torch.Tensor:
        out = model(
            input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=keep
        )
        return out.logits

    return forward


def family_forward(model: Any) -> FamilyForward | None:
    """kvray's forward for `model`, or None where transformers' must run: another architecture,
    or modules that are not the ones this code mirrors."""
    config = getattr(model, "config", None)
    model_type: str = getattr(config, "model_type", None) or ""
    prefix = PREFIXES.get(model_type)
    base = getattr(model, "model", None)
    if config is None or prefix is None or base is None or not hasattr(model, "lm_head"):
        return None
    layers = list(base.layers[: config.num_hidden_layers])
    norm = f"{prefix}RMSNorm"
    names = [type(base.norm).__name__]
    for layer in layers:
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        norms += [
            getattr(layer.self_attn, n) for n in ("q_norm", "k_norm") if hasattr(layer.self_attn, n)
        ]
        if (type(layer).__name__, type(layer.self_attn).__name__, type(layer.mlp).__name__) != (
            f"{prefix}DecoderLayer",
            f"{prefix}Attention",
            f"{prefix}MLP",
        ):
            return None
        names += [type(n).__name__ for n in norms]
    module = sys.modules[type(layers[0].self_attn).__module__] if layers else None
    rotate = getattr(module, "apply_rotary_pos_emb", None)
    if rotate is None or any(name != norm for name in names):
        return None
    return FamilyForward(model, layers, model_type, rotate)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' `LlamaRMSNorm.forward` (and its Mistral/Qwen2/Qwen3 copies), op for op."""
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype)


class _Layer:
    """One decoder layer's weights and bound `forward`s."""

    def __init__(self, layer: Any, model_type: str, rotate: Callable) -> None:
        attn, mlp = layer.self_attn, layer.mlp  # transformers' modules: attributes untyped
        self.attn: nn.Module = attn  # kvray's attention reads its layer_idx
        self.norm1 = _norm(layer.input_layernorm)
        self.norm2 = _norm(layer.post_attention_layernorm)
        self.q_norm = _norm(attn.q_norm) if hasattr(attn, "q_norm") else None  # Qwen3
        self.k_norm = _norm(attn.k_norm) if hasattr(attn, "k_norm") else None
        self.head_dim, self.scaling, self.rotate = attn.head_dim, attn.scaling, rotate
        self.sliding_window = (
            getattr(attn.config, "sliding_window", None)
            if model_type == "mistral"
            else getattr(attn, "sliding_window", None)  # Qwen2/3: per layer type; Llama: none
        )
        # NOTE: the fused projections of workers/fused_projections.py where the worker made
        # them (one matmul, split as the model's slices would), else the model's own.
        fused = getattr(attn, "fused_q_k_v", None)
        self.qkv = fused.fused.forward if fused is not None else None
        self.qkv_bounds = fused.bounds if fused is not None else None
        self.q, self.k, self.v = attn.q_proj.forward, attn.k_proj.forward, attn.v_proj.forward
        self.o = attn.o_proj.forward
        fused = getattr(mlp, "fused_gate_up", None)
        self.gate_up = fused.fused.forward if fused is not None else None
        self.gate_up_bounds = fused.bounds if fused is not None else None
        self.gate, self.up = mlp.gate_proj.forward, mlp.up_proj.forward
        self.act, self.down = mlp.act_fn.forward, mlp.down_proj.forward

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape = h.shape[:-1]
        heads = (*shape, -1, self.head_dim)
        x = rms_norm(h, *self.norm1)
        if self.qkv is not None:
            q, k, v = _split(self.qkv(x), self.qkv_bounds)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = q.view(heads), k.view(heads), v.view(heads)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = rms_norm(q, *self.q_norm), rms_norm(k, *self.k_norm)
        q, k = self.rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        out, _ = paged_attention_forward(
            self.attn, q, k, v.transpose(1, 2), None,
            scaling=self.scaling, sliding_window=self.sliding_window,
        )  # fmt: skip
        h = h + self.o(out.reshape(*shape, -1).contiguous())
        x = rms_norm(h, *self.norm2)
        if self.gate_up is not None:
            gate, up = _split(self.gate_up(x), self.gate_up_bounds)
        else:
            gate, up = self.gate(x), self.up(x)
        return h + self.down(self.act(gate) * up)


class FamilyForward:
    """`forward(input_ids, position_ids, keep)`: the logits of rows `keep` (0: every row), as
    `model(input_ids=..., position_ids=..., use_cache=False, logits_to_keep=keep).logits`.
    Built once the model's layers are final (after fusing, packing or quantizing)."""

    def __init__(
        self, model: Any, layers: list[nn.Module], model_type: str, rotate: Callable
    ) -> None:
        base = model.model
        self.embed: Callable[[torch.Tensor], torch.Tensor] = base.embed_tokens.forward
        self.rotary: nn.Module = base.rotary_emb  # a module call a step: rope scaling is its own
        self.norm = _norm(base.norm)
        self.lm_head: Callable[[torch.Tensor], torch.Tensor] = model.lm_head.forward
        self.layers = [_Layer(layer, model_type, rotate) for layer in layers]

    def __call__(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, keep: torch.Tensor | int
    ) -> torch.Tensor:
        h = self.embed(input_ids)
        cos, sin = self.rotary(h, position_ids=position_ids)
        for layer in self.layers:
            h = layer(h, cos, sin)
        h = rms_norm(h, *self.norm)
        if isinstance(keep, torch.Tensor):
            h = h[:, keep, :]
        elif keep:
            h = h[:, -keep:, :]
        return self.lm_head(h)


def _norm(module: Any) -> tuple[torch.Tensor, float]:
    """An RMSNorm's weight and epsilon."""
    return module.weight, float(module.variance_epsilon)


def _split(x: torch.Tensor, bounds: list[int] | None) -> list[torch.Tensor]:
    """The column ranges of a fused projection's output, as its slices return them."""
    assert bounds is not None
    return [x[..., start:end] for start, end in itertools.pairwise(bounds)]
