"""Paged attention plugged into transformers' attention interface.

The model runner flattens a step's sequences into one row of tokens and sets an
`AttentionMetadata` for the duration of the forward; every attention layer then writes its new
keys/values into the paged KV cache and attends over each sequence's blocks. Model code stays
transformers'; only the attention function is ours.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvray.workers import cpu_kernels

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "kvray_paged"


# (q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_left) -> [rows, num_heads, head_dim]
VarlenAttn = Callable[..., torch.Tensor]


def _find_varlen_attn() -> VarlenAttn | None:
    """torch's variable-length flash attention (FlashAttention-2), causal, with a left window
    (-1: none) and GQA: the public `varlen_attn` where it takes those (torch 2.13), else the ATen
    op beneath it where its schema has windows (torch 2.11's public function lacks GQA and
    windows), else None."""
    try:
        varlen_attn = importlib.import_module("torch.nn.attention.varlen").varlen_attn
    except (ImportError, AttributeError):
        varlen_attn = None
    wanted = {"window_size", "enable_gqa", "scale"}
    if varlen_attn is not None and wanted <= inspect.signature(varlen_attn).parameters.keys():

        def public(q, k, v, cu_q, cu_k, max_q, max_k, scale, left):  # type: ignore[no-untyped-def]
            gqa = q.shape[1] != k.shape[1]
            return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale,
                               window_size=(left, 0), enable_gqa=gqa)  # fmt: skip

        return public
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    if op is None or "window_size_left" not in str(op.default._schema):
        return None

    def aten(q, k, v, cu_q, cu_k, max_q, max_k, scale, left):  # type: ignore[no-untyped-def]
        # NOTE: FlashAttention-2 takes GQA as is (key/value heads dividing the query heads), and
        # aligns its causal mask to each sequence's last row.
        return op(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False,
                  scale=scale, window_size_left=left, window_size_right=0)[0]  # fmt: skip

    return aten


_varlen_attn = _find_varlen_attn()
_CPU_DECODE_CHUNK_BYTES = 1 << 20


@dataclass
class PrefillSeq:
    """A sequence computing more than one token this step (a prompt chunk)."""

    start: int  # first row of its tokens in the flattened batch
    num_tokens: int  # query length
    num_computed: int  # tokens already in the cache before this step
    slots: torch.Tensor | None  # [num_computed + num_tokens] cache slots; None if num_computed == 0

    @property
    def context_len(self) -> int:
        return self.num_computed + self.num_tokens


@dataclass
class VarlenLayout:
    cu_seq_q: torch.Tensor  # [num_prefills + 1] int32: first row of each chunk's queries
    cu_seq_k: torch.Tensor  # [num_prefills + 1] int32: first row of each chunk's keys
    max_q: int
    max_k: int
    cached: bool  # some chunk attends over cached context (its keys come from the cache)


@dataclass
class AttentionMetadata:
    """Layout of one step's flattened batch. Built once per step, read by every layer.

    NOTE: sequences computing a single token (decodes, and one-token prompt chunks) come first
    in the batch, rows [0, num_decodes); prompt chunks follow, each a contiguous run of rows.
    """

    slot_mapping: torch.Tensor  # [num_tokens] flat cache slot that each new token's K/V goes to
    block_size: int
    num_decodes: int
    decode_block_ids: torch.Tensor | None  # [num_decodes * max_blocks] block tables, padded, flat
    decode_positions: torch.Tensor | None  # [num_decodes] position of each decode token
    prefills: list[PrefillSeq]
    kv_caches: list[
        tuple[torch.Tensor, torch.Tensor]
    ]  # per layer ([num_slots, kv_heads, dim],) * 2
    decode_kernel: DecodeKernel | None = None  # reads the block tables in place; see below
    decode_context_lens: torch.Tensor | None = None  # [num_decodes] positions + 1, for the kernel
    _masks: dict[tuple[str, int, int | None], torch.Tensor] = field(default_factory=dict)
    _varlen: VarlenLayout | None = None
    _prompt_tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def prompt_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each prompt row as a decode kernel's query reads it (built once a step, on first
        use): ([prompt rows, max blocks] int64, its chunk's block table, padded with block 0;
        [prompt rows] int64, its position + 1: the causal mask as context lengths)."""
        if self._prompt_tables is None:
            b = self.block_size
            tables, lens = [], []
            for seq in self.prefills:
                if seq.slots is None:  # a whole prompt: its context is this step's rows
                    slots = self.slot_mapping[seq.start : seq.start + seq.num_tokens]
                else:
                    slots = seq.slots
                tables.append(slots[::b] // b)
                lens.append(torch.arange(seq.num_computed + 1, seq.context_len + 1))
            width = max(t.numel() for t in tables)
            rows = sum(seq.num_tokens for seq in self.prefills)
            table = torch.zeros(rows, width, dtype=torch.int64, device=self.slot_mapping.device)
            row = 0
            for seq, blocks in zip(self.prefills, tables):
                table[row : row + seq.num_tokens, : blocks.numel()] = blocks
                row += seq.num_tokens
            self._prompt_tables = (table, torch.cat(lens).to(table.device))
        return self._prompt_tables

    def varlen_layout(self) -> VarlenLayout:
        """The prompt chunks as one variable-length batch (built once a step, on first use)."""
        if self._varlen is None:
            q_lens = [s.num_tokens for s in self.prefills]
            k_lens = [s.context_len for s in self.prefills]
            device = self.slot_mapping.device
            self._varlen = VarlenLayout(
                cu_seq_q=torch.tensor(
                    [0, *itertools.accumulate(q_lens)], dtype=torch.int32, device=device
                ),
                cu_seq_k=torch.tensor(
                    [0, *itertools.accumulate(k_lens)], dtype=torch.int32, device=device
                ),
                max_q=max(q_lens),
                max_k=max(k_lens),
                cached=any(s.num_computed for s in self.prefills),
            )
        return self._varlen

    def decode_mask(self, sliding_window: int | None) -> torch.Tensor:
        """[num_decodes, 1, 1, max_context] bool: which gathered slots each decode may attend."""
        key = ("decode", 0, sliding_window)
        if key not in self._masks:
            assert self.decode_block_ids is not None and self.decode_positions is not None
            width = self.decode_block_ids.numel() // self.num_decodes * self.block_size
            kv_pos = torch.arange(width, device=self.decode_block_ids.device)
            q_pos = self.decode_positions[:, None]
            mask = kv_pos[None, :] <= q_pos
            if sliding_window is not None:
                mask &= kv_pos[None, :] > q_pos - sliding_window
            self._masks[key] = mask[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, index: int, sliding_window: int | None) -> torch.Tensor | None:
        """[num_tokens, context_len] bool for a chunk with cached context; None means plain causal."""
        seq = self.prefills[index]
        if seq.num_computed == 0 and sliding_window is None:
            return None
        key = ("prefill", index, sliding_window)
        if key not in self._masks:
            device = self.slot_mapping.device
            q_pos = torch.arange(seq.num_computed, seq.context_len, device=device)[:, None]
            kv_pos = torch.arange(seq.context_len, device=device)[None, :]
            mask = kv_pos <= q_pos
            if sliding_window is not None:
                mask &= kv_pos > q_pos - sliding_window
            self._masks[key] = mask
        return self._masks[key]


_current: AttentionMetadata | None = None


@contextlib.contextmanager
def attention_context(metadata: AttentionMetadata) -> Iterator[None]:
    """Make `metadata` visible to every attention layer for the duration of one forward."""
    global _current
    previous, _current = _current, metadata
    try:
        yield
    finally:
        _current = previous


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, num_heads, num_tokens, head_dim]
    key: torch.Tensor,  # [1, num_kv_heads, num_tokens, head_dim]
    value: torch.Tensor,  # [1, num_kv_heads, num_tokens, head_dim]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function. Returns [1, num_tokens, num_heads, head_dim]."""
    meta = _current
    if meta is None:
        raise RuntimeError(f"{ATTN_IMPLEMENTATION} attention runs only inside kvray's model runner")
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None:
        raise RuntimeError(f"{type(module).__name__} has no layer_idx; kvray cannot page its KV")
    k_cache, v_cache = meta.kv_caches[layer_idx]
    q = query[0].transpose(0, 1)  # [num_tokens, num_heads, head_dim]
    k = key[0].transpose(0, 1)  # [num_tokens, num_kv_heads, head_dim]
    v = value[0].transpose(0, 1)
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)

    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        out[:nd] = _decode_attention(q[:nd], k_cache, v_cache, meta, scaling, sliding_window)
    if meta.prefills:
        if _varlen_applies(q):
            prefill = _prefill_varlen
        elif _paged_prompts_apply(q, meta):
            prefill = _prefill_paged
        else:
            prefill = _prefill_each
        out[nd:] = prefill(q[nd:], k[nd:], v[nd:], k_cache, v_cache, meta, scaling, sliding_window)
    return out.unsqueeze(0), None


def _prefill_each(
    q: torch.Tensor,  # [prompt rows, num_heads, head_dim]: the step's rows past its decodes
    k: torch.Tensor,  # [prompt rows, num_kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim], this step's keys written
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scaling: float | None,
    sliding_window: int | None,
) -> torch.Tensor:  # [prompt rows, num_heads, head_dim]
    """Prompt attention, one SDPA per prompt chunk."""
    out = torch.empty_like(q)
    for i, seq in enumerate(meta.prefills):
        rows = slice(seq.start - meta.num_decodes, seq.start - meta.num_decodes + seq.num_tokens)
        if seq.slots is None:
            seq_k, seq_v = k[rows], v[rows]
        else:
            seq_k, seq_v = k_cache[seq.slots], v_cache[seq.slots]
        out[rows] = _sdpa(
            q[rows].transpose(0, 1),
            seq_k.transpose(0, 1),
            seq_v.transpose(0, 1),
            meta.prefill_mask(i, sliding_window),
            scaling,
        ).transpose(0, 1)
    return out


def _paged_prompts_apply(q: torch.Tensor, meta: AttentionMetadata) -> bool:
    """Whether prompt attention takes kvray's CPU decode kernel, one query row at a time: where
    the kernel runs its AVX512-BF16 path (bf16, head_dim 64 or 128), which passes ATen's flash
    kernel at every prompt length measured; its AVX2 path does not (`_prefill_paged`)."""
    return (
        q.device.type == "cpu"
        and meta.decode_kernel is not None
        and q.dtype == torch.bfloat16
        and q.shape[-1] in (64, 128)
        and _cpu_dots_bf16()
    )


@functools.cache
def _cpu_dots_bf16() -> bool:
    return "avx512_bf16" in cpu_kernels.cpu_flags()


def _prefill_paged(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scaling: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """`_prefill_each`'s attention from the paged decode kernel: each prompt row is a query over
    its chunk's blocks (this step's keys are in the cache by now) up to its own position, so a
    step's prompts are one call a layer, with cached context and sliding windows as decodes
    have them, and rows handed to the cores longest first.

    NOTE: one prompt's attention on a 2-core Zen 4 (AVX512-BF16), causal, bf16, the kernel's
    speed over ATen's flash kernel (its GFLOP/s): SmolLM2's 9/3 heads of 64 at 32 / 128 / 512
    / 1024 / 2048 / 4096 tokens 1.4x / 2.2x / 2.0x / 1.4x / 1.15x / 1.1x (flash 20-124);
    32/8 heads of 128 (Llama-3-8B's) 2.3x / 2.6x / 2.3x / 1.7x / 1.3x / 1.06x. The kernel's
    AVX2 path (8-lane FMAs after widening, no bf16 dot products) ran at 0.35-0.9x flash."""
    assert meta.decode_kernel is not None
    table, context_lens = meta.prompt_tables()
    return meta.decode_kernel(
        q.contiguous(),
        k_cache,
        v_cache,
        table,
        context_lens,
        meta.block_size,
        q.shape[-1] ** -0.5 if scaling is None else scaling,
        sliding_window or 0,
    )


def _varlen_applies(q: torch.Tensor) -> bool:
    """Whether prompt attention takes torch's variable-length flash kernel: CUDA, fp16/bf16, a
    head size flash supports, and a torch that has the kernel (`_find_varlen_attn`)."""
    return (
        _varlen_attn is not None
        and q.device.type == "cuda"
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
    )


def _prefill_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scaling: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """`_prefill_each`'s result from one flash-attention launch over every prompt chunk.

    On an H200, one SDPA per prompt (the math kernel: 3-d inputs) made a step of 32 prompts cost
    0.3 s in launches; this is one kernel a layer. Chunks with cached context attend over their
    whole context, gathered from the cache; the causal mask is aligned to each chunk's last
    row, as a chunk's positions are."""
    global _varlen_attn
    layout = meta.varlen_layout()
    keys, values = k, v
    if layout.cached:
        nd = meta.num_decodes
        rows = [slice(s.start - nd, s.start - nd + s.num_tokens) for s in meta.prefills]
        keys = torch.cat(
            [k[r] if s.slots is None else k_cache[s.slots] for s, r in zip(meta.prefills, rows)]
        )
        values = torch.cat(
            [v[r] if s.slots is None else v_cache[s.slots] for s, r in zip(meta.prefills, rows)]
        )
    assert _varlen_attn is not None
    try:
        return _varlen_attn(
            q.contiguous(), keys.contiguous(), values.contiguous(),
            layout.cu_seq_q, layout.cu_seq_k, layout.max_q, layout.max_k,
            scaling, -1 if sliding_window is None else sliding_window - 1,
        )  # fmt: skip
    except RuntimeError as e:  # a GPU or build without the kernel: per-prompt SDPA from now on
        logger.warning("variable-length flash attention failed (%s); prompts use SDPA", e)
        _varlen_attn = None
        return _prefill_each(q, k, v, k_cache, v_cache, meta, scaling, sliding_window)


DecodeKernel = Callable[..., torch.Tensor]


def decode_kernel(
    cache_dtype: torch.dtype, device: torch.device, head_dim: int
) -> DecodeKernel | None:
    """The paged decode attention kernel where one applies, else None (the torch path).

    - CPU, bf16: kvray's C++ kernel (csrc/paged_attention.cpp), 3-8x the torch path
      (bench/decode_attention.py); it builds here, at warmup, not in a step.
    - CUDA, bf16/fp16: the Triton kernel (workers/triton_attention.py), when Triton is installed.
      It reads the blocks in place, where the torch path gathers every block of every sequence,
      and it is what lets a decode step be captured as a CUDA graph (workers/decode_graphs.py).

    NOTE: fp32 keeps SDPA everywhere: the exactness tests compare it with Hugging Face's, and
    the kernels sum in another order.
    """
    if device.type == "cpu" and cache_dtype == torch.bfloat16 and head_dim % 16 == 0:
        return cpu_kernels.paged_decode_attention()
    if device.type == "cuda" and cache_dtype in (torch.bfloat16, torch.float16):
        from kvray.workers import triton_attention

        if triton_attention.supports(head_dim) and triton_attention.works(device, cache_dtype):
            return triton_attention.paged_decode_attention
    return None


def _decode_attention(
    q: torch.Tensor,  # [num_decodes, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scaling: float | None,
    sliding_window: int | None,
) -> torch.Tensor:  # [num_decodes, num_heads, head_dim]
    assert meta.decode_block_ids is not None
    num_decodes = meta.num_decodes
    if meta.decode_kernel is not None:
        return meta.decode_kernel(
            q,
            k_cache,
            v_cache,
            meta.decode_block_ids.view(num_decodes, -1),
            meta.decode_context_lens,
            meta.block_size,
            q.shape[-1] ** -0.5 if scaling is None else scaling,
            sliding_window or 0,
        )
    num_blocks = meta.decode_block_ids.numel() // num_decodes  # per sequence, padded
    mask = meta.decode_mask(sliding_window)
    chunk = _decode_chunk_size(k_cache, num_blocks * meta.block_size)
    out = torch.empty_like(q)
    for start in range(0, num_decodes, chunk):
        end = min(start + chunk, num_decodes)
        block_ids = meta.decode_block_ids[start * num_blocks : end * num_blocks]
        k = _gather_blocks(k_cache, block_ids, end - start, meta.block_size)
        v = _gather_blocks(v_cache, block_ids, end - start, meta.block_size)
        if q.dtype == torch.bfloat16 and q.device.type == "cpu":
            out[start:end] = _attend_one_token(q[start:end], k, v, mask[start:end], scaling)
        else:
            attended = _sdpa(q[start:end, :, None, :], k, v, mask[start:end], scaling)
            out[start:end] = attended[:, :, 0]
    return out


def _attend_one_token(
    q: torch.Tensor,  # [n, num_heads, head_dim]
    k: torch.Tensor,  # [n, num_kv_heads, context, head_dim]
    v: torch.Tensor,
    mask: torch.Tensor,  # [n, 1, 1, context] bool
    scaling: float | None,
) -> torch.Tensor:  # [n, num_heads, head_dim]
    """Attention of one query token per sequence as two batched matmuls, softmax in fp32.

    NOTE: for bf16 on CPU only: there SDPA's kernel with a mask and one query row costs
    8-12x these matmuls (bench: 32 sequences x 160 tokens, 3.6 ms against 0.43 ms). fp32 keeps
    SDPA, which the exactness tests compare with Hugging Face's; GPUs keep SDPA (unmeasured);
    fp16 keeps it too (unscaled fp16 scores could overflow).
    """
    n, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q = q.view(n, num_kv_heads, num_heads // num_kv_heads, head_dim)  # GQA: heads share a kv head
    scores = torch.matmul(q, k.transpose(-1, -2)).float()  # [n, kv_heads, group, context]
    scores *= head_dim**-0.5 if scaling is None else scaling
    scores.masked_fill_(~mask.view(n, 1, 1, -1), float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype)
    return torch.matmul(probs, v).view(n, num_heads, head_dim)


def _decode_chunk_size(cache: torch.Tensor, context_width: int) -> int:
    """How many decodes to gather and attend at once.

    On CPU, chunks whose gathered keys fit in ~1 MiB stay in cache between the gather and the
    attention that reads them (measured ~20% faster than one big gather on 2 cores). GPUs take
    every decode in one launch.
    """
    if cache.device.type != "cpu":
        return 1 << 30
    per_seq = context_width * cache.shape[1] * cache.shape[2] * cache.element_size()
    return max(1, _CPU_DECODE_CHUNK_BYTES // per_seq)


def _gather_blocks(
    cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    block_ids: torch.Tensor,  # [num_seqs * blocks_per_seq]
    num_seqs: int,
    block_size: int,
) -> torch.Tensor:  # [num_seqs, num_kv_heads, blocks_per_seq * block_size, head_dim]
    """Copy whole blocks (not single slots) out of the pool, one sequence per row."""
    num_slots, num_kv_heads, head_dim = cache.shape
    blocks = cache.view(num_slots // block_size, -1)  # [num_blocks, block_size * heads * dim]
    gathered = blocks.index_select(0, block_ids)
    return gathered.view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)


def _sdpa(
    q: torch.Tensor,  # [..., num_heads, q_len, dim]
    k: torch.Tensor,  # [..., num_kv_heads, kv_len, dim]
    v: torch.Tensor,
    mask: torch.Tensor | None,  # bool, broadcastable to [..., q_len, kv_len]; None = causal
    scaling: float | None,
) -> torch.Tensor:  # [..., num_heads, q_len, dim]
    if q.dim() == 3 and q.device.type == "cpu":
        # NOTE: with a batch dimension: on CPU, 3-d inputs take SDPA's math path (bmm, where,
        # softmax) and 4-d ones its flash kernel, 2.6-3.5x faster for a 256-512 token prompt
        # chunk in bf16 and fp32 alike (and the kernel transformers' own `sdpa` runs). Not on
        # CUDA: there 4-d inputs made a step of 32 prompts of different lengths 5-12x slower on
        # an H200 (0.3 s -> 1.6-3.6 s; W3 with decode graphs 3,300 -> 930-1,690 tok/s).
        return _sdpa(q[None], k[None], v[None], mask, scaling)[0]
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=mask is None,
        scale=scaling,
        enable_gqa=q.shape[-3] != k.shape[-3],
    )


def register() -> str:
    """Register the paged attention with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    return ATTN_IMPLEMENTATION
