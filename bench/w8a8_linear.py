"""Linear layers on CPU, int8 x int8 (`quantization: w8a8`) against weight-only int8, bf16 and
fp32, over a model's layer shapes (SmolLM2-135M's by default).

Each pass multiplies `rows` rows by a list of layers: every layer of the model (30 x fused
q/k/v, o, fused gate/up, down, then the output layer) up to 8 rows, so a decode's weights come
from memory as in a real step; past that, the first two layers' worth and the output layer
(compute-bound: a few layers time the arithmetic). The variants run interleaved, one pass each
per round, so a load change on a shared machine hits them all alike; each line is the median
pass, its GFLOP/s and its speed against fp32 and weight-only int8, by the wall clock and by CPU
time (on a shared, loaded machine: the time the threads ran). Activations are fp32 for
fp32, int8 and w8a8, bf16 for bf16, `int8-bf16` (weight-only int8 of a bf16 model: what
`quantization: int8` runs with `dtype: bfloat16`, in int8_panel.cpp's panels where built) and
`w8a8-bf16` (w8a8 with bf16 activations in and out). The first line names the w8a8 path built.

    python bench/w8a8_linear.py
    python bench/w8a8_linear.py --rows 1,32 --rounds 5 --threads 1   # on a loaded machine
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
from torch import nn

from kvray.workers import cpu_kernels
from kvray.workers.quantization import Int8Linear
from kvray.workers.w8a8 import Int8ActLinear

Layers = list[nn.Module]


def make_layers(shapes: list[tuple[int, int]]) -> dict[str, Layers]:
    """Each variant's copy of the same random weights."""
    torch.manual_seed(0)
    names = ("fp32", "bf16", "int8", "int8-bf16", "w8a8")
    variants: dict[str, Layers] = {name: [] for name in names}
    for n, k in shapes:
        linear = nn.Linear(k, n, bias=False)
        nn.init.normal_(linear.weight, std=0.05)
        variants["int8"].append(Int8Linear(linear))
        variants["w8a8"].append(Int8ActLinear(linear))
        variants["bf16"].append(nn.Linear(k, n, bias=False).to(torch.bfloat16))
        variants["bf16"][-1].weight.data.copy_(linear.weight.data)
        variants["int8-bf16"].append(Int8Linear(variants["bf16"][-1]))
        variants["fp32"].append(linear)
    variants["w8a8-bf16"] = variants["w8a8"]
    return variants


def one_pass(layers: Layers, xs: dict[int, torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        for layer in layers:
            layer(xs[layer.in_features])

    return run


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--kv-width", type=int, default=192, help="kv heads x head dim")
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rows", default="1,32,512")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ops = cpu_kernels.w8a8()
    if ops is None:
        raise SystemExit("kvray's w8a8 kernel is not built here (it needs AVX2 and a compiler)")
    h, i = args.hidden, args.intermediate
    per_layer = [(h + 2 * args.kv_width, h), (h, h), (2 * i, h), (h, i)]
    shapes = per_layer * args.layers + [(args.vocab, h)]
    variants = make_layers(shapes)
    print(f"w8a8 path: {ops.isa}; {len(shapes)} layers of {h}/{i}/{args.vocab}; "
          f"{torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.1f} at start")  # fmt: skip
    for rows in map(int, args.rows.split(",")):
        picked = list(range(len(shapes))) if rows <= 8 else [*range(8), len(shapes) - 1]
        flops = sum(2 * rows * shapes[j][0] * shapes[j][1] for j in picked)
        torch.manual_seed(rows)
        xs = {k: torch.randn(rows, k) for k in {k for _, k in shapes}}
        xs_bf16 = {k: x.to(torch.bfloat16) for k, x in xs.items()}
        runs = {
            name: one_pass([layers[j] for j in picked], xs_bf16 if "bf16" in name else xs)
            for name, layers in variants.items()
        }
        wall, cpu = interleaved(runs, args.rounds)
        for clock, median in (("wall", wall), ("cpu", cpu)):
            line = "  ".join(
                f"{name} {median[name] * 1e3:7.1f} ms {flops / median[name] / 1e9:5.1f}"
                for name in runs
            )
            print(f"rows {rows:>4} {clock:>4} ms, GFLOP/s: {line}")
            print(
                f"                w8a8 speed: {median['fp32'] / median['w8a8']:.2f}x fp32, "
                f"{median['int8'] / median['w8a8']:.2f}x int8, "
                f"{median['bf16'] / median['w8a8-bf16']:.2f}x bf16, "
                f"{median['int8-bf16'] / median['w8a8-bf16']:.2f}x int8-bf16 (bf16 activations)"
            )
        print(f"                load average {os.getloadavg()[0]:.1f}")


def interleaved(
    runs: dict[str, Callable[[], None]], rounds: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Each run's median wall time and median CPU time (this process's, every thread's: on a
    loaded machine the time its threads ran, not the time they waited for a core)."""
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm up: caches, oneDNN's primitives
        run()
    for _ in range(rounds):
        for name, run in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return (
        {name: sorted(t)[len(t) // 2] for name, t in wall.items()},
        {name: sorted(t)[len(t) // 2] for name, t in cpu.items()},
    )


if __name__ == "__main__":
    main()
