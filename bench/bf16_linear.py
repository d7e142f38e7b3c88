"""bf16 linear layers on CPU: kvray's kernel against oneDNN's, over a whole model's layers.

Every linear layer of a model shape (SmolLM2-135M's by default: 30 x fused q/k/v, o, fused
gate/up, down, then the output layer, 269 MB of bf16 weights) is multiplied once per pass by
`rows` rows, so a decode's weights come from memory, not from a cache, as in a real step. Each
line prints both kernels' median pass, their ratio, the weight bytes read per second (the limit
at a few rows) and the FLOP/s (the limit for batches and prompts), next to this machine's read
bandwidth measured in the same run.

    python bench/bf16_linear.py
    python bench/bf16_linear.py --hidden 4096 --intermediate 14336 --layers 4   # Llama-3-8B's
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median_seconds, read_bandwidth

from kvray.workers import cpu_kernels


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--kv-width", type=int, default=192, help="kv heads x head dim")
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rows", default="1,2,4,8,16,32,128,512")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    kernel = cpu_kernels.bf16_linear()
    if kernel is None:
        raise SystemExit("kvray's bf16 kernel is not built here (it needs AVX512-BF16)")
    h, i = args.hidden, args.intermediate
    per_layer = [(h + 2 * args.kv_width, h), (h, h), (2 * i, h), (h, i)]
    shapes = per_layer * args.layers + [(args.vocab, h)]
    torch.manual_seed(0)
    weights = [torch.randn(n, k, dtype=torch.bfloat16) * 0.05 for n, k in shapes]
    ours = [kernel.pack(w) for w in weights]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
    del weights
    nbytes = sum(n * k * 2 for n, k in shapes)
    bandwidth = read_bandwidth(nbytes)
    print(f"{len(shapes)} layers, {nbytes / 1e6:.0f} MB of bf16 weights; "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s")  # fmt: skip
    for rows in map(int, args.rows.split(",")):
        # NOTE: big inputs are compute-bound: one layer of each shape is enough to time them.
        count = len(shapes) if rows <= 32 else 4
        xs = {k: torch.randn(rows, k, dtype=torch.bfloat16) for k in {k for _, k in shapes}}
        layers = list(zip(shapes, ours, onednn))[:count]
        flops = sum(2 * rows * n * k for n, k in shapes[:count])
        read = sum(2 * n * k for n, k in shapes[:count])

        def run_ours(xs=xs, layers=layers) -> None:
            for (n, k), packed, _ in layers:
                kernel.linear(xs[k], packed, n, None)

        def run_onednn(xs=xs, layers=layers) -> None:
            for (_, k), _, packed in layers:
                torch.ops.mkldnn._linear_pointwise(xs[k], packed, None, "none", [], "")

        t_ours, t_onednn = (
            median_seconds(run_ours, args.reps),
            median_seconds(run_onednn, args.reps),
        )
        print(
            f"rows {rows:>4}: kvray {t_ours * 1e3:7.2f} ms ({read / t_ours / 1e9:5.1f} GB/s, "
            f"{read / t_ours / bandwidth:4.0%} of read; {flops / t_ours / 1e9:5.0f} GFLOP/s)   "
            f"oneDNN {t_onednn * 1e3:7.2f} ms ({read / t_onednn / 1e9:5.1f} GB/s; "
            f"{flops / t_onednn / 1e9:5.0f} GFLOP/s)   kvray/oneDNN speed {t_onednn / t_ours:.2f}x"
        )


if __name__ == "__main__":
    main()
