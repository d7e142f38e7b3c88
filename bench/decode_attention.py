"""Decode attention on CPU: kvray's compiled paged kernel against the torch path, one run.

Both read the same paged KV cache (blocks scattered over the pool, as a busy cache has them):
the torch path gathers each sequence's blocks into a contiguous tensor and runs batched
matmuls; the kernel (workers/csrc/paged_attention.cpp) reads every key and value row once, in
place. Each line prints both times, their ratio, and the kernel's bytes read per second as a
fraction of this machine's read bandwidth, measured in the same run (a sum over 1 GiB).

    python bench/decode_attention.py                      # SmolLM2-135M's shape, bf16
    python bench/decode_attention.py --heads 32 --kv-heads 8 --head-dim 128   # Llama-3-8B's
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median_seconds, read_bandwidth

from kvray.workers import cpu_kernels
from kvray.workers.attention import AttentionMetadata, _decode_attention

BLOCK = 16


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--contexts", default="128,512,2048")
    args = parser.parse_args()

    kernel = cpu_kernels.paged_decode_attention()
    if kernel is None:
        raise SystemExit("kvray's CPU kernels did not build; see the warning above")
    dtype = getattr(torch, args.dtype)
    bandwidth = read_bandwidth()
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; {args.dtype}, heads {args.heads}/"
          f"{args.kv_heads}, head_dim {args.head_dim}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'batch':>5} {'context':>7} {'torch ms':>9} {'kernel ms':>9} {'ratio':>6} "
          f"{'kernel GB/s':>11} {'of limit':>8}")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for batch in map(int, args.batches.split(",")):
        for context in map(int, args.contexts.split(",")):
            width = -(-context // BLOCK)
            pool = 2 * batch * width  # half the pool in use, blocks scattered
            shape = (pool * BLOCK, args.kv_heads, args.head_dim)
            k = torch.randn(shape, generator=g).to(dtype)
            v = torch.randn(shape, generator=g).to(dtype)
            table = torch.randperm(pool, generator=g)[: batch * width].view(batch, width)
            lengths = torch.full((batch,), context)
            q = torch.randn(batch, args.heads, args.head_dim, generator=g).to(dtype)
            meta = AttentionMetadata(
                slot_mapping=torch.zeros(batch, dtype=torch.long),
                block_size=BLOCK,
                num_decodes=batch,
                decode_block_ids=table.flatten(),
                decode_positions=lengths - 1,
                prefills=[],
                kv_caches=[(k, v)],
            )
            torch_s = median_seconds(lambda: _decode_attention(q, k, v, meta, None, None))  # noqa: B023
            kernel_s = median_seconds(
                lambda: kernel(q, k, v, table, lengths, BLOCK, args.head_dim**-0.5, 0)  # noqa: B023
            )
            read = 2 * batch * context * args.kv_heads * args.head_dim * k.element_size()
            print(f"{batch:>5} {context:>7} {torch_s * 1e3:>9.3f} {kernel_s * 1e3:>9.3f} "
                  f"{torch_s / kernel_s:>5.2f}x {read / kernel_s / 1e9:>11.1f} "
                  f"{read / kernel_s / bandwidth:>7.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
