"""kvray's Llama-family model (Llama, Mistral, Qwen2, Qwen3), built from `layers.py` so that a
tensor-parallel rank holds only its shard of each weight and its own KV heads.

The architectures differ only where the config says: Qwen2's q/k/v biases, Qwen3's q/k norms,
Llama's optional attention and MLP biases, the sliding windows (Mistral: every layer; Qwen2 and
Qwen3: the layers `layer_types` names). Attention is the worker's paged attention
(`workers/attention.py`) over this rank's KV cache, laid out as the model runner expects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from kvray.workers import cpu_kernels
from kvray.workers.attention import paged_attention_forward
from kvray.workers.kv_cache import KVCacheSpec
from kvray.workers.models.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    Placement,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    Shard,
    VocabParallelEmbedding,
    apply_rotary,
)
from kvray.workers.models.loader import Weight
from kvray.workers.models.pipeline import Stage, make_stage

logger = logging.getLogger(__name__)

# a checkpoint's separate projections -> the fused layer that holds them, and the part
FUSED: dict[str, tuple[str, Shard]] = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def num_kv_heads_of(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _sliding_window(config: Any, layer_idx: int) -> int | None:
    """The window transformers gives this layer's attention (None: every position)."""
    if config.model_type == "mistral":
        return getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types and layer_types[layer_idx] == "sliding_attention":
        return getattr(config, "sliding_window", None)
    return None


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, layer_idx: int, placement: Placement) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # NOTE: the paged attention finds this layer's cache by it
        self.head_dim = head_dim_of(config)
        attention_bias = bool(getattr(config, "attention_bias", False))
        qwen2 = config.model_type == "qwen2"  # q/k/v biases, none on o_proj
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, config.num_attention_heads, num_kv_heads_of(config),
            bias=qwen2 or attention_bias, placement=placement,
        )  # fmt: skip
        # NOTE: o_proj's input is this rank's heads' outputs, so it splits as the heads do
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim, config.hidden_size,
            bias=attention_bias and not qwen2, placement=placement,
            what="num_attention_heads * head_dim",
            input_sizes=[s.num_heads * self.head_dim for s in self.qkv_proj.shards],
        )  # fmt: skip
        self.q_norm = self.k_norm = None
        if config.model_type == "qwen3":  # per head, so replicated like any norm
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, placement)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, placement)
        self.scaling = self.head_dim**-0.5
        self.sliding_window = _sliding_window(config, layer_idx)
        self.rotate: Callable[..., tuple[torch.Tensor, torch.Tensor]] = apply_rotary

    # NOTE: submodules are called by their `forward` here and below, not `nn.Module.__call__`
    # (no hooks on kvray's own modules): a decode step's Python time is most of its time on CPU.
    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:  # h [1, n, hidden], cos/sin [1, n, head_dim] -> [1, n, hidden]
        shape = h.shape[:-1]
        heads = (*shape, -1, self.head_dim)
        q, k, v = (x.view(heads) for x in self.qkv_proj.forward(h))  # [1, n, rank's heads, dim]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm.forward(q), self.k_norm.forward(k)
        q, k = self.rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        out, _ = paged_attention_forward(
            self, q, k, v.transpose(1, 2), None,
            scaling=self.scaling, sliding_window=self.sliding_window,
        )  # fmt: skip
        return self.o_proj.forward(out.reshape(*shape, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, placement: Placement) -> None:
        from transformers.activations import ACT2FN

        super().__init__()
        size, bias = config.intermediate_size, bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = ColumnParallelLinear(
            config.hidden_size, [size, size], bias=bias, placement=placement,
            what="intermediate_size",
        )  # fmt: skip
        self.down_proj = RowParallelLinear(
            size, config.hidden_size, bias=bias, placement=placement, what="intermediate_size"
        )
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [1, n, hidden] -> [1, n, hidden]
        gate, up = self.gate_up_proj.forward(x).chunk(2, dim=-1)
        return self.down_proj.forward(self.act.forward(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int, placement: Placement) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, placement)
        self.self_attn = LlamaAttention(config, layer_idx, placement)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, placement)
        self.mlp = LlamaMLP(config, placement)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn.forward(self.input_layernorm.forward(h), cos, sin)
        return h + self.mlp.forward(self.post_attention_layernorm.forward(h))


class LlamaModel(nn.Module):
    """The decoder of one pipeline stage: its layers, the embedding on the first stage and
    the final norm on the last (with one stage, all of them)."""

    def __init__(self, config: Any, placement: Placement, stage: Stage) -> None:
        super().__init__()
        self.stage = stage
        self.embed_tokens = (
            VocabParallelEmbedding(config.vocab_size, config.hidden_size, placement)
            if stage.is_first
            else None
        )
        layers = [LlamaDecoderLayer(config, i, placement) for i in stage.layers]
        for cache_index, layer in enumerate(layers):
            # NOTE: the paged attention finds a layer's cache by `layer_idx`; a stage's cache
            # holds its own layers only, from 0
            layer.self_attn.layer_idx = cache_index
        # NOTE: keyed by global index, so a stage's parameters keep the checkpoint's names
        self.layers = nn.ModuleDict({str(i): layer for i, layer in zip(stage.layers, layers)})
        qkv = layers[0].self_attn.qkv_proj
        self.num_kv_heads, self.head_dim = qkv.num_kv_heads, qkv.head_dim  # this rank's
        self.norm = (
            RMSNorm(config.hidden_size, config.rms_norm_eps, placement) if stage.is_last else None
        )
        self.rotary_emb = RotaryEmbedding(config, head_dim_of(config), placement.device)
        self.hidden_size, self.dtype = config.hidden_size, placement.dtype

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:  # [1, n], [1, n] -> [1, n, hidden]: normed on the last stage
        if self.embed_tokens is not None:
            h = self.embed_tokens(input_ids)
        else:
            assert self.stage.links is not None
            h = self.stage.links.receive_hidden((*input_ids.shape, self.hidden_size), self.dtype)
        cos, sin = self.rotary_emb(positions, h.dtype)
        for layer in self.layers.values():
            h = layer.forward(h, cos, sin)
        return h if self.norm is None else self.norm.forward(h)


class LlamaForCausalLM(nn.Module):
    """One rank of a Llama, Mistral, Qwen2 or Qwen3 model: its tensor-parallel shard of its
    pipeline stage's layers (`stage`: by default the whole model).

    `model(input_ids, positions, keep)` is the runner's forward contract
    (`llama_family.Forward`), inside `attention.attention_context`: the logits of rows `keep`
    ([k] indices, or an int: the last `keep` rows, 0 for all) over the whole vocabulary, on
    every rank of the last stage. An earlier stage sends its hidden states on to the next
    (`pipeline.StageLinks`) and returns no rows ([1, 0, vocab]); a later one takes its input
    from the previous stage, not from `input_ids` (whose shape it still reads).
    `kv_cache_spec` sizes this rank's cache (its own layers and KV heads only);
    `load_weights` copies this rank's shard of each checkpoint tensor.
    """

    def __init__(self, config: Any, placement: Placement, stage: Stage | None = None) -> None:
        super().__init__()
        self.config = config
        self.placement = placement
        self.stage = stage or make_stage(config.num_hidden_layers)
        self.model = LlamaModel(config, placement, self.stage)
        self.lm_head = (
            ParallelLMHead(config.vocab_size, config.hidden_size, placement)
            if self.stage.is_last
            else None
        )
        self.is_tied = bool(getattr(config, "tie_word_embeddings", False))
        if self.is_tied and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight
        # NOTE: a last stage without the embedding keeps its own copy of a tied weight
        self.loads_tied_head = self.is_tied and self.lm_head is not None and not self.stage.is_first

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor | int
    ) -> torch.Tensor:  # [1, n], [1, n] -> [1, k, vocab]
        h = self.model(input_ids, positions)
        if self.lm_head is None:  # an earlier stage: the next one goes on from here
            assert self.stage.links is not None
            self.stage.links.send_hidden(h)
            return h.new_empty(1, 0, self.config.vocab_size)
        if isinstance(keep, torch.Tensor):
            h = h[:, keep, :]
        elif keep:
            h = h[:, -keep:, :]
        return self.lm_head(h)

    def use_cpu_ops(self) -> None:
        """Norms and rotary embeddings as kvray's C++ ops (bf16 on CPU, bitwise the torch
        functions: `llama_family.can_use_cpu_ops`); the execution plan decides."""
        rotate, norm = cpu_kernels.rotary_embedding(), cpu_kernels.rms_norm()
        assert rotate is not None and norm is not None, "the plan chose ops that are not built"
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.op = norm
            elif isinstance(module, LlamaAttention):
                module.rotate = rotate

    def kv_cache_spec(self, dtype: torch.dtype) -> KVCacheSpec:
        """This rank's KV cache: its stage's layers, its own key/value heads (one where they
        are replicated)."""
        base = self.model
        return KVCacheSpec(len(self.stage.layers), base.num_kv_heads, base.head_dim, dtype)

    def load_weights(self, weights: Iterable[tuple[str, Weight]]) -> None:
        """Copy this rank's part of each (Hugging Face name, tensor); raise ValueError naming
        any weight the checkpoint lacks. Tensors the model has no place for (a checkpoint's
        rotary buffers, layers past `num_hidden_layers` or of other stages) are skipped and
        logged."""
        modules = dict(self.named_modules())
        loaded: set[tuple[str, str, Shard]] = set()
        skipped: list[str] = []
        for name, weight in weights:
            path, _, param = name.rpartition(".")
            parent, _, leaf = path.rpartition(".")
            shard: Shard = None
            if self.loads_tied_head and name == "model.embed_tokens.weight":
                path = "lm_head"
            elif leaf in FUSED:
                fused, shard = FUSED[leaf]
                path = f"{parent}.{fused}"
            module = modules.get(path)
            if module is None or not hasattr(module, "load_weight"):
                skipped.append(name)
                continue
            module.load_weight(name, weight, shard)
            loaded.add((path, param, shard))
        missing = self._expected_weights() - loaded
        if missing:
            names = sorted(f"{path}.{param}" + (f" ({s})" if s is not None else "")
                           for path, param, s in missing)  # fmt: skip
            raise ValueError(f"the checkpoint lacks {len(names)} weights: {', '.join(names[:8])}")
        if skipped:
            logger.info("skipped %d checkpoint tensors: %s", len(skipped), ", ".join(skipped[:8]))

    def _expected_weights(self) -> set[tuple[str, str, Shard]]:
        expected: set[tuple[str, str, Shard]] = set()
        for path, module in self.named_modules():
            is_shared_head = module is self.lm_head and self.is_tied and not self.loads_tied_head
            if not hasattr(module, "load_weight") or is_shared_head:
                continue
            if isinstance(module, QKVParallelLinear):
                shards: list[Shard] = ["q", "k", "v"]
            elif isinstance(module, ColumnParallelLinear) and len(module.local_sizes) > 1:
                shards = list(range(len(module.local_sizes)))
            else:
                shards = [None]
            for param, value in module.named_parameters(recurse=False):
                if value is not None:
                    expected |= {(path, param, s) for s in shards}
        return expected
