"""The layers kvray's own models are built from: norm, rotary embedding, and linear layers that
hold one tensor-parallel rank's shard of their weights.

Each layer's `load_weight(name, weight, shard)` copies its rank's part of a checkpoint tensor
(`loader.narrow`: only that part is read). Column-parallel layers split output features and
need no communication; row-parallel layers split input features and all-reduce their partial
sums; the vocabulary layers split the vocabulary (the embedding all-reduces its masked lookup,
the output layer all-gathers its logits). A size the ranks do not divide is split unevenly,
the first ranks taking more (attention by GQA groups: `partition_heads`); the vocabulary is
padded instead. With one rank every collective is the identity and every layer computes what
transformers' does, op for op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvray.workers.llama_family import rms_norm
from kvray.workers.models.loader import Weight, narrow, shape_of, whole
from kvray.workers.models.parallel import ParallelContext, shard_size, split_sizes

# Which part of a fused layer a checkpoint tensor fills: "q", "k", "v"; 0 (gate), 1 (up).
Shard = str | int | None


@dataclass(frozen=True)
class Placement:
    """Where a layer's weights live: its rank in the tensor-parallel group, dtype, device.

    `split_unit`: the MLP's intermediate features split over ranks in whole multiples of it
    where they divide into them (int8's group size: a rank's part of the down projection then
    holds whole groups of the one-rank layer, quantized to the same values)."""

    parallel: ParallelContext
    dtype: torch.dtype
    device: torch.device
    split_unit: int = 1

    def empty(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(
            torch.empty(shape, dtype=self.dtype, device=self.device), requires_grad=False
        )


def _copy(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(
            f"{name}: checkpoint shard {tuple(value.shape)}, expected {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.copy_(value)


class RMSNorm(nn.Module):
    """Replicated on every rank (a vector as wide as what it normalises)."""

    def __init__(self, dim: int, eps: float, placement: Placement) -> None:
        super().__init__()
        self.weight = placement.empty(dim)
        self.eps = eps
        self.op: Callable[..., torch.Tensor] | None = None  # kvray's C++ op (`use_cpu_ops`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim]
        if self.op is not None and x.is_contiguous():  # NOTE: q/k norms get views
            return self.op(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)

    def load_weight(self, name: str, weight: Weight, shard: Shard = None) -> None:
        _copy(self.weight, whole(weight), name)


class RotaryEmbedding:
    """cos/sin tables for positions, as transformers' Llama-family `*RotaryEmbedding` computes
    them, for every rope type transformers knows (`rope_parameters["rope_type"]`): `default`,
    and those of its `ROPE_INIT_FUNCTIONS` (`linear`, `llama3`, `yarn`, ...). Two types
    depend on the step: `dynamic` (NTK) rescales once positions pass `max_position_embeddings`,
    `longrope` takes its long factors there; both decide from the step's largest position, as
    transformers does from its batch's. Replicated: no weights."""

    def __init__(self, config: Any, head_dim: int, device: torch.device) -> None:
        params = getattr(config, "rope_parameters", None) or {}
        self.rope_type = params.get("rope_type", "default")
        self.config, self.head_dim, self.device = config, head_dim, device
        inv_freq, self.attention_scaling = self._init(None)
        self.inv_freq = inv_freq  # [head_dim // 2] fp32
        # NOTE: the length past which the step's frequencies change, as transformers decides it
        self.original_max = int(
            params["original_max_position_embeddings"]
            if self.rope_type == "longrope"
            else config.max_position_embeddings
        )
        self._long: tuple[torch.Tensor, float] | None = None

    def _init(self, seq_len: int | None) -> tuple[torch.Tensor, float]:
        if self.rope_type == "default":
            base = self.config.rope_parameters["rope_theta"]
            dim = self.head_dim
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            return inv_freq.to(self.device), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if self.rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"rope_type {self.rope_type!r} is not one transformers knows")
        # NOTE: on the CPU, then moved, as transformers computes them at init.
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[self.rope_type](self.config, None, seq_len=seq_len)
        return inv_freq.to(self.device), float(scaling)

    def _frequencies(self, positions: torch.Tensor) -> tuple[torch.Tensor, float]:
        if self.rope_type not in ("dynamic", "longrope"):
            return self.inv_freq, self.attention_scaling
        seq_len = int(positions.max()) + 1
        if seq_len <= self.original_max:
            return self.inv_freq, self.attention_scaling
        if self.rope_type == "dynamic":
            return self._init(seq_len)
        if self._long is None:
            self._long = (self._init(self.original_max + 1)[0], self.attention_scaling)
        return self._long

    def __call__(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:  # positions [1, n] -> cos, sin [1, n, head_dim]
        inv_freq, scaling = self._frequencies(positions)
        freqs = positions[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    q: torch.Tensor,  # [1, heads, n, head_dim]
    k: torch.Tensor,  # [1, kv_heads, n, head_dim]
    cos: torch.Tensor,  # [1, n, head_dim]
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `apply_rotary_pos_emb`, op for op."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# An `nn.Linear` -> a module computing the same product from its own copy of the weights
# (`quantization.Int8Linear`, `packed_linear.PackedLinear`)
MakeKernel = Callable[[nn.Linear], nn.Module]


class _Linear(nn.Module):
    """`weight` [out_features, in_features] of this rank, `bias` [out_features] or None; or,
    once `use_kernel` moved them, `kernel`, which holds them in its own layout."""

    def __init__(self, in_features: int, out_features: int, bias: bool, placement: Placement):
        super().__init__()
        self.parallel = placement.parallel
        self.in_features, self.out_features = in_features, out_features
        self.weight = placement.empty(out_features, in_features)
        self.bias = placement.empty(out_features) if bias else None
        self.kernel: nn.Module | None = None

    def use_kernel(self, make: MakeKernel, *, with_bias: bool = True) -> None:
        """Move this rank's weights (and the bias, `with_bias`) into `make`'s module, which
        computes `matmul` from then on; the plain copies are freed. After loading only."""
        bias = self.bias if with_bias else None
        self.kernel = make(_as_linear(self.weight, bias))
        del self.weight
        if with_bias:
            del self.bias
            self.bias = None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # [..., in_features] -> [..., out]
        """`x @ weight.T + bias`, by the kernel where `use_kernel` chose one (which holds the
        bias where it was given one)."""
        if self.kernel is not None:
            return self.kernel.forward(x)
        return F.linear(x, self.weight, self.bias)

    def param(self, name: str) -> torch.Tensor:
        param = self.weight if name.endswith("weight") else self.bias
        if param is None:
            raise ValueError(f"{name}: the checkpoint has a bias that the model's config denies")
        return param


class ColumnParallelLinear(_Linear):
    """Output features split over ranks (rank r: the r-th contiguous part, `split_sizes`: even
    where the ranks divide them); no communication. `output_sizes` are the parts of a fused
    layer (gate and up), each split on its own, so a rank holds its columns of every part:
    shard ids 0, 1, ... in `load_weight`."""

    def __init__(
        self,
        in_features: int,
        output_sizes: list[int],
        *,
        bias: bool,
        placement: Placement,
        what: str,
    ) -> None:
        size, rank = placement.parallel.world_size, placement.parallel.rank
        splits = [split_sizes(n, size, what, unit=placement.split_unit) for n in output_sizes]
        self.local_sizes = [split[rank] for split in splits]
        self.starts = [sum(split[:rank]) for split in splits]  # in each part of the checkpoint
        super().__init__(in_features, sum(self.local_sizes), bias, placement)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out of this rank]
        return self.matmul(x)

    def load_weight(self, name: str, weight: Weight, shard: Shard = None) -> None:
        part = shard if isinstance(shard, int) else 0
        n = self.local_sizes[part]
        offset = sum(self.local_sizes[:part])
        rows = narrow(weight, 0, self.starts[part], n)
        _copy(self.param(name)[offset : offset + n], rows, name)


@dataclass(frozen=True)
class HeadShard:
    """One rank's attention heads: query heads `[first, first + num_heads)` and key/value heads
    `[first_kv, first_kv + num_kv_heads)`."""

    first: int
    num_heads: int
    first_kv: int
    num_kv_heads: int


def partition_heads(num_heads: int, num_kv_heads: int, world_size: int) -> list[HeadShard]:
    """Every rank's attention heads (rank order), split by GQA groups: a key/value head and
    the query heads that read it are never on different ranks.

    With at least as many key/value heads as ranks, the key/value heads are split as evenly as
    they go (`split_sizes`: SmolLM2's 3 over 2 ranks, 2 and 1) and each rank takes their query
    heads (6 and 3). Where they do not divide, the ranks differ in heads, weights and KV cache,
    and the one with the most sets the step's pace. With fewer key/value heads than ranks,
    each is replicated on the `world_size / num_kv_heads` ranks whose query heads share it;
    those query heads must split evenly.

    Raises:
        ValueError: fewer key/value heads than ranks where they do not divide the ranks or
            the query heads do not split, naming tensor_parallel_size.
    """
    group = num_heads // num_kv_heads  # query heads a key/value head serves
    if num_kv_heads >= world_size:
        shards, first_kv = [], 0
        for n in split_sizes(num_kv_heads, world_size, "num_key_value_heads"):
            shards.append(HeadShard(first_kv * group, n * group, first_kv, n))
            first_kv += n
        return shards
    if world_size % num_kv_heads:
        raise ValueError(
            f"num_key_value_heads ({num_kv_heads}) is fewer than tensor_parallel_size "
            f"({world_size}) and does not divide it; choose a tensor_parallel_size that "
            f"{num_kv_heads} divides, or one of at most {num_kv_heads}"
        )
    per_rank = shard_size(num_heads, world_size, "num_attention_heads")
    # NOTE: replicated: ranks r with the same r * kv_heads // tp share a head
    return [
        HeadShard(rank * per_rank, per_rank, rank * num_kv_heads // world_size, 1)
        for rank in range(world_size)
    ]


class QKVParallelLinear(_Linear):
    """q, k and v projections as one column-parallel layer: a rank holds its `HeadShard`'s
    query heads and the key/value heads they read (`partition_heads`; `shards` lists every
    rank's, which the output projection's split follows)."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        *,
        bias: bool,
        placement: Placement,
    ) -> None:
        parallel = placement.parallel
        self.head_dim = head_dim
        self.shards = partition_heads(num_heads, num_kv_heads, parallel.world_size)
        self.heads = self.shards[parallel.rank]
        self.num_heads, self.num_kv_heads = self.heads.num_heads, self.heads.num_kv_heads
        q, kv = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.bounds = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
        super().__init__(hidden_size, q + 2 * kv, bias, placement)

    def forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # [..., hidden] -> q, k, v [..., width]
        qkv = self.matmul(x)
        _, k_start, v_start = (start for start, _ in self.bounds.values())
        return qkv[..., :k_start], qkv[..., k_start:v_start], qkv[..., v_start:]

    def load_weight(self, name: str, weight: Weight, shard: Shard = None) -> None:
        start, end = self.bounds[str(shard)]
        first = self.heads.first if shard == "q" else self.heads.first_kv
        rows = narrow(weight, 0, first * self.head_dim, end - start)
        _copy(self.param(name)[start:end], rows, name)


class RowParallelLinear(_Linear):
    """Input features split over ranks; the partial products are all-reduced, then the bias
    (replicated) added once. Its input is a column-parallel layer's output, already split:
    `input_sizes` is every rank's part (rank order) where that layer's split is not
    `split_sizes`' (the output projection follows the ranks' query heads)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        placement: Placement,
        what: str,
        input_sizes: list[int] | None = None,
    ) -> None:
        size, rank = placement.parallel.world_size, placement.parallel.rank
        parts = input_sizes or split_sizes(in_features, size, what, unit=placement.split_unit)
        assert len(parts) == size and sum(parts) == in_features, (parts, in_features)
        self.start = sum(parts[:rank])  # this rank's first input feature
        super().__init__(parts[rank], out_features, bias, placement)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in of this rank] -> [..., out]
        if self.parallel.world_size == 1:
            return self.matmul(x)
        # NOTE: the bias is added once, after the sum (`use_kernel` leaves it out of a kernel)
        partial = F.linear(x, self.weight) if self.kernel is None else self.kernel.forward(x)
        y = self.parallel.all_reduce(partial)
        return y if self.bias is None else y + self.bias

    def use_kernel(self, make: MakeKernel, *, with_bias: bool = True) -> None:
        super().use_kernel(make, with_bias=with_bias and self.parallel.world_size == 1)

    def load_weight(self, name: str, weight: Weight, shard: Shard = None) -> None:
        if self.bias is not None and name.endswith("bias"):
            _copy(self.bias, whole(weight), name)
            return
        n = self.weight.shape[1]
        _copy(self.weight, narrow(weight, 1, self.start, n), name)


class _VocabParallel(nn.Module):
    """The vocabulary split over ranks in contiguous parts of `ceil(vocab / tp)` rows, the last
    padded with zero rows, so any vocabulary size splits: weight [ceil(vocab / tp), hidden]."""

    def __init__(self, vocab_size: int, hidden_size: int, placement: Placement) -> None:
        super().__init__()
        self.parallel = placement.parallel
        self.vocab_size = vocab_size
        self.num_rows = -(-vocab_size // self.parallel.world_size)
        self.first_row = self.parallel.rank * self.num_rows
        self.weight = placement.empty(self.num_rows, hidden_size)

    def load_weight(self, name: str, weight: Weight, shard: Shard = None) -> None:
        if shape_of(weight)[0] != self.vocab_size:
            raise ValueError(f"{name}: {shape_of(weight)[0]} rows, vocab_size {self.vocab_size}")
        rows = max(0, min(self.num_rows, self.vocab_size - self.first_row))
        with torch.no_grad():
            self.weight[rows:].zero_()
        if rows:
            _copy(self.weight[:rows], narrow(weight, 0, self.first_row, rows), name)


class VocabParallelEmbedding(_VocabParallel):
    """A rank looks up the ids in its part of the vocabulary, zeroes the rows of the others'
    ids, and the ranks all-reduce: the sum is each id's one real row."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [1, n] -> [1, n, hidden]
        if self.parallel.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.first_row
        outside = (local < 0) | (local >= self.num_rows)
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.parallel.all_reduce(h.masked_fill_(outside[..., None], 0.0))


class ParallelLMHead(_VocabParallel):
    """The output layer, split like the embedding (tied weights: the same parameter). Each rank
    computes its part of the vocabulary's logits; one all-gather gives every rank all of them,
    so any rank can sample."""

    def __init__(self, vocab_size: int, hidden_size: int, placement: Placement) -> None:
        super().__init__(vocab_size, hidden_size, placement)
        self.kernel: nn.Module | None = None

    def use_kernel(self, make: MakeKernel) -> None:
        """As `_Linear.use_kernel`. A tied weight stays the embedding's: the kernel's is a copy
        in its own layout (as `quantize_linears` and `pack_linears` do at one rank)."""
        self.kernel = make(_as_linear(self.weight, None))
        del self.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [1, k, hidden] -> [1, k, vocab]
        logits = F.linear(h, self.weight) if self.kernel is None else self.kernel(h)
        if self.parallel.world_size == 1:
            return logits
        return self.parallel.all_gather(logits, dim=-1)[..., : self.vocab_size]


def _as_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An `nn.Linear` holding `weight` [out, in] and `bias` (no copy), for a kernel's maker."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return linear


def use_kernels(model: nn.Module, make: MakeKernel, *, can_use: Callable[[int], bool]) -> int:
    """Move the weights of every linear layer of `model` (this rank's shards, the output
    layer's included) whose input width `can_use` accepts into `make`'s modules; returns how
    many. The embedding keeps its plain weights (a lookup, not a product)."""
    layers = [m for m in model.modules() if isinstance(m, _Linear | ParallelLMHead)]
    count = 0
    for layer in layers:
        if can_use(layer.weight.shape[1]):
            layer.use_kernel(make)
            count += 1
    return count
