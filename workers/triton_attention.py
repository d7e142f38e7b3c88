"""Paged decode attention in Triton for CUDA GPUs: a drop-in for csrc/paged_attention.cpp.

One query token per sequence reads its keys and values where they lie in the paged cache, through
its block table: no gather, no mask tensor. The launch is CUDA-graph capturable: the grid depends
only on shapes, and each program reads its context length on the device.

Triton is optional: this module imports without it, and `available()` says whether the kernel can
run (CUDA, or Triton's CPU interpreter with TRITON_INTERPRET=1, which the tests use).
"""

from __future__ import annotations

import functools
import logging
import math
import os

import torch

from kvray.workers import device as devices

try:
    import triton  # type: ignore[import-untyped,import-not-found,unused-ignore]
    import triton.language as tl  # type: ignore[import-untyped,import-not-found,unused-ignore]
except ImportError:
    triton = None

logger = logging.getLogger(__name__)

# Key/value positions per loop step. NOTE: independent of block_size: each position finds its
# own block in the table, so one step can span several small blocks (tl.dot needs >= 16).
_TILE = 64


def available() -> bool:
    """Whether `paged_decode_attention` can run here: Triton, and CUDA or the interpreter."""
    if triton is None:
        return False
    # NOTE: TRITON_INTERPRET is Triton's own variable, not a kvray setting (docs/architecture.md
    # lists the other programs' variables kvray reads).
    return devices.is_cuda_available() or os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel compiles and runs on `device` (once per process): Triton needs a C
    compiler at run time for its launcher, which a slim image may lack. False, with a warning,
    sends decodes to the torch path instead of failing every step."""
    if not available():
        return False
    try:
        q = torch.zeros((1, 2, 16), dtype=dtype, device=device)
        cache = torch.zeros((16, 1, 16), dtype=dtype, device=device)
        table = torch.zeros((1, 1), dtype=torch.long, device=device)
        lens = torch.ones((1,), dtype=torch.long, device=device)
        paged_decode_attention(q, cache, cache, table, lens, 16, 0.25, 0)
    except Exception as e:
        logger.warning(
            "the Triton decode attention does not run here (%s: %s); decodes take the torch path",
            type(e).__name__,
            str(e).strip().splitlines()[0] if str(e).strip() else "",
        )
        return False
    return True


def supports(head_dim: int) -> bool:
    """Whether the kernel takes this head size (a power of two, at least 16: tl.dot's tiles)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def paged_decode_attention(
    q: torch.Tensor,  # [n, num_heads, head_dim], one query token per sequence
    k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]; slot = block * block_size + offset
    v_cache: torch.Tensor,  # same shape
    block_table: torch.Tensor,  # [n, max_blocks] int64 or int32, padded with anything
    context_lens: torch.Tensor,  # [n] int64: positions 0..len-1 are attended
    block_size: int,
    scale: float,
    sliding_window: int,  # 0 = none; else only positions > (len - 1) - sliding_window
) -> torch.Tensor:  # [n, num_heads, head_dim], q's dtype
    """Attention of each sequence's one query token over its cached keys and values."""
    if triton is None:
        raise RuntimeError("paged_decode_attention needs triton, which is not installed")
    n, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    assert supports(head_dim), f"head_dim must be a power of two >= 16, got {head_dim}"
    assert block_size > 0 and block_size & (block_size - 1) == 0, (
        f"block_size must be a power of two, got {block_size}"
    )
    assert num_heads % num_kv_heads == 0, f"{num_heads} heads over {num_kv_heads} kv heads"
    assert k_cache.shape[2] == head_dim and k_cache.stride() == v_cache.stride()
    assert q.stride(2) == k_cache.stride(2) == block_table.stride(1) == 1
    group = num_heads // num_kv_heads
    out = torch.empty((n, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if n == 0:
        return out
    _paged_decode_kernel[(n, num_kv_heads)](
        out,
        q,
        k_cache,
        v_cache,
        block_table,
        context_lens,
        scale * math.log2(math.e),  # NOTE: the softmax runs in exp2
        # NOTE: no window = one wider than any context, so the kernel needs no branch.
        sliding_window if sliding_window > 0 else 1 << 30,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),  # NOTE: v_cache's too (asserted above)
        k_cache.stride(1),
        block_table.stride(0),
        GROUP=group,
        # NOTE: tl.dot needs M >= 16; the padding rows compute on zeros and are never stored.
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        TILE=_TILE,
        # NOTE: fp32 caches get exact fp32 dots; tl.dot's default would round to tf32.
        PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
    )
    return out


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        out_ptr,
        q_ptr,
        k_ptr,
        v_ptr,
        block_table_ptr,
        context_lens_ptr,
        scale_log2,
        sliding_window,
        stride_qn,
        stride_qh,
        stride_on,
        stride_oh,
        stride_kvs,
        stride_kvh,
        stride_bt,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        TILE: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """One program per (sequence, kv head): its GROUP query heads against every position."""
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        context_len = tl.load(context_lens_ptr + seq).to(tl.int32)
        # The window keeps positions >= len - window; whole tiles before it are never read.
        first = tl.maximum(context_len - sliding_window, 0)

        rows = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, HEAD_DIM)
        row_ok = rows < GROUP
        heads = kv_head * GROUP + rows
        q = tl.load(
            q_ptr + seq * stride_qn + heads[:, None] * stride_qh + dims[None, :],
            mask=row_ok[:, None],
            other=0.0,
        ).to(k_ptr.dtype.element_ty)

        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max (log2 units)
        denom = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        for start in range(first, context_len, TILE):
            pos = start + tl.arange(0, TILE)
            valid = pos < context_len  # NOTE: every tile has >= 1 valid position, so m is finite
            block = tl.load(block_table_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=valid)
            slots = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
            k = tl.load(
                k_ptr + slots[:, None] * stride_kvs + kv_head * stride_kvh + dims[None, :],
                mask=valid[:, None],
                other=0.0,
            )
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            denom = denom * alpha + tl.sum(p, axis=1)
            v = tl.load(
                v_ptr + slots[:, None] * stride_kvs + kv_head * stride_kvh + dims[None, :],
                mask=valid[:, None],
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new

        out = acc / tl.where(denom == 0.0, 1.0, denom)[:, None]  # context_len 0: zeros, not NaN
        tl.store(
            out_ptr + seq * stride_on + heads[:, None] * stride_oh + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None],
        )
