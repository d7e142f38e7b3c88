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

from kvray.workers import attention, cpu_kernels
from kvray.workers.attention import ATTN_IMPLEMENTATION, paged_attention_forward
from kvray.workers.packed_linear import PackedLinear
from kvray.workers.quantization import GROUP_SIZE, Int8Linear
from kvray.workers.w8a8 import Int8ActLinear

# model_type -> the class-name prefix of its transformers modules
PREFIXES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}

# (input_ids [1, n], position_ids [1, n], rows to keep: [k] indices or 0 for all) -> [1, k, vocab]
Forward = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | int"], torch.Tensor]


def transformers_forward(model: nn.Module) -> Forward:
    def forward(
        input_ids: torch.Tensor, position_ids: torch.Tensor, keep: torch.Tensor | int
    ) -> torch.Tensor:
        out = model(
            input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=keep
        )
        return out.logits

    return forward


def is_family_model(model: Any) -> bool:
    """Whether kvray's forward can run `model` (`family_forward`)."""
    return _family_layers(model) is not None


def family_forward(
    model: Any, *, one_call: bool = True, cpu_ops: bool | None = None
) -> FamilyForward | None:
    """kvray's forward for `model`, or None where transformers' must run: another architecture,
    modules that are not transformers' own classes for it (remote code, replaced modules),
    another attention implementation, or hooks that calling `forward` directly would skip.
    `one_call`: decode steps may run as one C++ call (`DecodeStack`) where the model allows;
    `cpu_ops`: kvray's C++ norm and rotary ops (the plan's; by default wherever `can_use_cpu_ops`).
    """
    found = _family_layers(model)
    if found is None:
        return None
    layers, model_type, rotate = found
    weight = model.model.embed_tokens.weight
    ops = can_use_cpu_ops(weight.dtype, weight.device) if cpu_ops is None else cpu_ops
    return FamilyForward(
        model, layers, model_type, _fused_rotary(rotate, ops), _fused_norm(ops),
        one_call=one_call,
    )  # fmt: skip


def can_use_cpu_ops(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether kvray's one-pass C++ norm and rotary ops (bitwise transformers' functions) run
    a model of `dtype` on `device`: bf16 on CPU, where the kernels are built. On a GPU,
    transformers' own functions."""
    if dtype != torch.bfloat16 or device.type != "cpu":
        return False
    return cpu_kernels.rotary_embedding() is not None and cpu_kernels.rms_norm() is not None


def _family_layers(model: Any) -> tuple[list[nn.Module], str, Callable] | None:
    """(decoder layers, model type, transformers' rotary function) of a model kvray's forward
    can run, else None (`family_forward`)."""
    config = getattr(model, "config", None)
    model_type: str = getattr(config, "model_type", None) or ""
    prefix = PREFIXES.get(model_type)
    base = getattr(model, "model", None)
    if config is None or prefix is None or base is None or not hasattr(model, "lm_head"):
        return None
    if getattr(config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        return None
    layers = list(base.layers[: config.num_hidden_layers])
    if not layers:
        return None
    expected = [(model, "ForCausalLM"), (base, "Model"), (base.norm, "RMSNorm")]
    for layer in layers:
        attn = layer.self_attn
        expected += [(layer, "DecoderLayer"), (attn, "Attention"), (layer.mlp, "MLP")]
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        norms += [getattr(attn, n) for n in ("q_norm", "k_norm") if hasattr(attn, n)]
        expected += [(n, "RMSNorm") for n in norms]
    source = f"transformers.models.{model_type}.modeling_{model_type}"
    if any(
        type(m).__module__ != source or type(m).__name__ != prefix + name for m, name in expected
    ):
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return None
    rotate = getattr(sys.modules[source], "apply_rotary_pos_emb", None)
    if rotate is None:
        return None
    return layers, model_type, rotate


def _fused_rotary(rotate: Callable, cpu_ops: bool) -> Callable:
    """transformers' `apply_rotary_pos_emb`, as kvray's one-pass C++ op (bitwise the same) for
    a bf16 model on CPU where the kernels are built: ~16 tensor operations a layer fewer."""
    op = cpu_kernels.rotary_embedding() if cpu_ops else None
    return rotate if op is None else op  # q, k, cos, sin are the model's dtype (the op checks)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' `LlamaRMSNorm.forward` (and its Mistral/Qwen2/Qwen3 copies), op for op."""
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype)


Norm = Callable[[torch.Tensor, Any], torch.Tensor]  # (x, an RMSNorm module) -> normed x


def _norm(x: torch.Tensor, module: Any) -> torch.Tensor:
    return rms_norm(x, module.weight, module.variance_epsilon)


def _fused_norm(cpu_ops: bool) -> Norm:
    """`_norm`, as kvray's one-call C++ op (bitwise the same) for a bf16 model's contiguous
    rows on CPU where the kernels are built: 8 tensor operations a norm fewer."""
    op = cpu_kernels.rms_norm() if cpu_ops else None
    if op is None:
        return _norm

    def fused(x: torch.Tensor, module: Any) -> torch.Tensor:
        if x.is_contiguous():  # NOTE: Qwen3's q/k norms get views of the fused projection
            return op(x, module.weight, module.variance_epsilon)
        return _norm(x, module)

    return fused


class _Layer:
    """One decoder layer's modules, called by their `forward`s (no `nn.Module.__call__`).

    NOTE: modules, not their tensors: torch.compile (decode graphs) treats a module's weights
    as parameters, static and frozen into the graph; tensors held by a plain object would be
    graph inputs with symbolic sizes (a 2-layer model compiled in 34 s instead of 21)."""

    def __init__(self, layer: Any, model_type: str, rotate: Callable, norm: Norm) -> None:
        attn, mlp = layer.self_attn, layer.mlp  # transformers' modules: attributes untyped
        self.attn: nn.Module = attn  # kvray's attention reads its layer_idx
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.q_norm = getattr(attn, "q_norm", None)  # Qwen3
        self.k_norm = getattr(attn, "k_norm", None)
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.rotate, self.norm = rotate, norm
        self.sliding_window = (
            getattr(attn.config, "sliding_window", None)
            if model_type == "mistral"
            else getattr(attn, "sliding_window", None)  # Qwen2/3: per layer type; Llama: none
        )
        # NOTE: the fused projections of workers/fused_projections.py where the worker made
        # them (one matmul, split as the model's slices would), else the model's own.
        fused = getattr(attn, "fused_q_k_v", None)
        self.qkv = fused.fused if fused is not None else None
        self.qkv_bounds = fused.bounds if fused is not None else None
        self.q_proj, self.k_proj, self.v_proj = attn.q_proj, attn.k_proj, attn.v_proj
        self.o_proj = attn.o_proj
        fused = getattr(mlp, "fused_gate_up", None)
        self.gate_up = fused.fused if fused is not None else None
        self.gate_up_bounds = fused.bounds if fused is not None else None
        self.gate_proj, self.up_proj = mlp.gate_proj, mlp.up_proj
        self.act, self.down_proj = mlp.act_fn, mlp.down_proj

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape = h.shape[:-1]
        heads = (*shape, -1, self.head_dim)
        x = self.norm(h, self.norm1)
        if self.qkv is not None:
            q, k, v = _split(self.qkv.forward(x), self.qkv_bounds)
        else:
            q, k, v = self.q_proj.forward(x), self.k_proj.forward(x), self.v_proj.forward(x)
        q, k, v = q.view(heads), k.view(heads), v.view(heads)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.norm(q, self.q_norm), self.norm(k, self.k_norm)
        q, k = self.rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        out, _ = paged_attention_forward(
            self.attn, q, k, v.transpose(1, 2), None,
            scaling=self.scaling, sliding_window=self.sliding_window,
        )  # fmt: skip
        h = h + self.o_proj.forward(out.reshape(*shape, -1).contiguous())
        x = self.norm(h, self.norm2)
        if self.gate_up is not None:
            gate, up = _split(self.gate_up.forward(x), self.gate_up_bounds)
        else:
            gate, up = self.gate_proj.forward(x), self.up_proj.forward(x)
        return h + self.down_proj.forward(self.act.forward(gate) * up)


class FamilyForward:
    """`forward(input_ids, position_ids, keep)`: the logits of rows `keep` (0: every row), as
    `model(input_ids=..., position_ids=..., use_cache=False, logits_to_keep=keep).logits`.
    Built once the model's layers are final (after fusing, packing or quantizing)."""

    def __init__(
        self,
        model: Any,
        layers: list[nn.Module],
        model_type: str,
        rotate: Callable,
        norm: Norm,
        *,
        one_call: bool = True,
    ) -> None:
        base = model.model
        self.embed: nn.Module = base.embed_tokens
        self.rotary: nn.Module = base.rotary_emb  # a module call a step: rope scaling is its own
        self.final_norm: nn.Module = base.norm
        self.norm = norm
        self.lm_head: nn.Module = model.lm_head
        self.layers = [_Layer(layer, model_type, rotate, norm) for layer in layers]
        self.stack = DecodeStack.build(model.config, self.layers) if one_call else None

    def __call__(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, keep: torch.Tensor | int
    ) -> torch.Tensor:
        h = self.embed.forward(input_ids)
        cos, sin = self.rotary(h, position_ids=position_ids)
        meta = attention._current
        if self.stack is not None and meta is not None and self.stack.takes(meta):
            h = self.stack(h, cos, sin, meta)
        else:
            for layer in self.layers:
                h = layer(h, cos, sin)
        h = self.norm(h, self.final_norm)
        if isinstance(keep, torch.Tensor):
            h = h[:, keep, :]
        elif keep:  # the last `keep` rows, as transformers' int `logits_to_keep`
            h = h[:, -keep:, :]
        return self.lm_head.forward(h)


def _split(x: torch.Tensor, bounds: list[int] | None) -> list[torch.Tensor]:
    """The column ranges of a fused projection's output, as its slices return them."""
    assert bounds is not None
    return [x[..., start:end] for start, end in itertools.pairwise(bounds)]


class DecodeStack:
    """Every layer of a decode-only step in one C++ call (csrc/decode_layers.cpp): the same
    operations as `_Layer` and the paged attention, so bitwise the same logits, without ~100
    Python-level calls a layer. For bf16 models on CPU whose every layer has fused projections
    in kvray's panels (bf16 `PackedLinear`s, int8 `Int8Linear`s or w8a8 `Int8ActLinear`s),
    kvray's norm and rotary ops and a SiLU MLP; `build` returns None for anything else, which
    keeps `_Layer`."""

    def __init__(self, op: Callable, config: Any, layers: list[_Layer]) -> None:
        self.op = op
        self.kernel = cpu_kernels.paged_decode_attention()
        head_dim = layers[0].head_dim
        self.head_sizes = [config.num_attention_heads, config.num_key_value_heads, head_dim]
        self.layer_ids = [int(layer.attn.layer_idx) for layer in layers]  # type: ignore[arg-type]
        self.weights: list[torch.Tensor] = []
        self.sizes: list[int] = []
        self.floats: list[float] = []
        # NOTE: batches from which a layer widens its weights for oneDNN (int8 on AMX CPUs) run
        # a layer a call, as the layers decide: the op calls the panels' kernels only
        widths = [getattr(m, "widen_from", None) for layer in layers for m in _linears(layer)]
        self.max_rows = min((w for w in widths if w is not None), default=None)
        none = torch.empty(0)
        for layer in layers:
            q_norm, k_norm = layer.q_norm, layer.k_norm
            assert layer.qkv_bounds is not None and layer.gate_up_bounds is not None
            qkv, o, gate_up, down = (_packed(m) for m in _linears(layer))
            self.weights += [
                layer.norm1.weight, *qkv,
                none if q_norm is None else q_norm.weight,
                none if k_norm is None else k_norm.weight,
                *o, layer.norm2.weight, *gate_up, *down,
            ]  # fmt: skip
            _, q_end, k_end, qkv_out = layer.qkv_bounds
            self.sizes += [qkv_out, q_end, k_end - q_end, config.hidden_size,
                           layer.gate_up_bounds[1], layer.sliding_window or 0]  # fmt: skip
            self.floats += [
                layer.norm1.variance_epsilon, layer.norm2.variance_epsilon,
                0.0 if q_norm is None else q_norm.variance_epsilon,
                0.0 if k_norm is None else k_norm.variance_epsilon,
                head_dim**-0.5 if layer.scaling is None else layer.scaling,
            ]  # fmt: skip

    @classmethod
    def build(cls, config: Any, layers: list[_Layer]) -> DecodeStack | None:
        if getattr(config, "hidden_act", None) != "silu":
            return None
        for layer in layers:
            if not all(_in_panels(m) for m in _linears(layer)):
                return None
            assert layer.gate_up_bounds is not None
            gate, up = itertools.pairwise(layer.gate_up_bounds)
            if gate[1] - gate[0] != up[1] - up[0] or type(layer.act).__name__ != "SiLUActivation":
                return None
            if layer.rotate is not cpu_kernels.rotary_embedding() or layer.norm.__name__ != "fused":
                return None
        # NOTE: last: panels mean the kernels are built; a GPU worker never builds them here.
        op = cpu_kernels.decode_layers()
        return None if op is None else cls(op, config, layers)

    def takes(self, meta: attention.AttentionMetadata) -> bool:
        """Whether this step is one the stack runs: every sequence decodes one token, with
        kvray's CPU decode kernel, fewer sequences than any layer widens its weights for."""
        fits = self.max_rows is None or meta.num_decodes < self.max_rows
        return (
            fits and not meta.prefills and meta.num_decodes > 0
            and meta.decode_kernel is self.kernel
        )  # fmt: skip

    def __call__(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: attention.AttentionMetadata,
    ) -> torch.Tensor:
        assert meta.decode_block_ids is not None
        caches = [cache for i in self.layer_ids for cache in meta.kv_caches[i]]
        return self.op(
            h, cos, sin, meta.slot_mapping, meta.decode_block_ids.view(meta.num_decodes, -1),
            meta.decode_context_lens, self.weights, caches,
            [*self.head_sizes, meta.block_size, GROUP_SIZE, *self.sizes],
            self.floats,
        )  # fmt: skip


def _linears(layer: _Layer) -> tuple[Any, ...]:
    return (layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj)


def _in_panels(linear: Any) -> bool:
    """A linear layer whose weights are in kvray's panels: bf16, int8 or w8a8."""
    if type(linear) is PackedLinear:
        return linear.kernel == "kvray"
    if type(linear) is Int8ActLinear:
        return linear.in_panels
    return type(linear) is Int8Linear and linear.layout == "panels"


def _packed(linear: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A linear layer as the op takes it: weight, scales, bias (an empty tensor for none)."""
    none = torch.empty(0)
    bias = none if linear.bias is None else linear.bias
    if type(linear) in (Int8Linear, Int8ActLinear):
        return linear.weight_int8, linear.scale, bias
    return linear.packed_weight, none, bias
