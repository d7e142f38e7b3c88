"""A replica split over processes on one machine's CPU, against one process, in one run.

Systems (each an offline `LLM` whose KV cache holds every request, as engine_throughput's):
  tp1   tensor_parallel_size 1: this process, `--threads` torch threads (default 2)
  tp1x1 the same with one thread: a control. On a machine that other work keeps busy, threads
        that wait for each other inside every op lose far more than one thread does
  tp2   tensor_parallel_size 2: two rank processes (gloo), each with cores / 2 threads
        (1 on a 2-core machine): the same cores split over two ranks
  pp2   pipeline_parallel_size `--pp` (default 2), where the settings accept it; else skipped,
        the refusal printed
  tp1i8, tp2i8  with `--int8`: tp1 and tp2 with `quantization: int8` (each rank's shards in
        int8 panels or rows, as the execution plan says)
Workloads (bench/common.py's): W1 `uniform`, 32 requests x (128 prompt + 128 output tokens),
batched; W2 `single`'s prompt, one stream of `--w2-tokens` output tokens (default 128;
engine_throughput runs 256): decode speed.

The group's own costs, measured in the same run:
  null step   a step that schedules nothing, sent to every rank and answered (pipes, pickling,
              the ranks' loop): what a split replica pays per step outside the model
  all-reduce  gloo between two processes of one thread each, of [batch, hidden] in the model's
              dtype at batch 1 and 32, and the all-gather of the logits a step ends with; a step
              of kvray's model runs 2 all-reduces a layer and one for the embedding

    python bench/tensor_parallel.py                  # smollm2 (the built-in checkpoint)
    python bench/tensor_parallel.py --quick          # 4 requests, 32-token stream: a smoke run
    python bench/tensor_parallel.py --model shape    # random weights of SmolLM2-135M's shape
    python bench/tensor_parallel.py --int8 --pp 1    # int8 columns, no pipeline row

Ratios are against tp1 of the same run. On a shared machine the numbers move with its load,
which the header prints.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import BenchRequest, log, make_workload, median_seconds
from engine_throughput import bench_model, load_kvray, measure, run_kvray

W1_REQUESTS = 32


def workloads(args: argparse.Namespace) -> dict[str, list[BenchRequest]]:
    """W1 and W2 as bench/common.py makes them (`--quick`: 4 requests, a 32-token stream)."""
    w1 = make_workload("uniform", 4 if args.quick else W1_REQUESTS, seed=args.seed)
    tokens = 32 if args.quick else args.w2_tokens
    # NOTE: another seed: with W1's, W2's prompt would be W1's first, cached by the same LLM
    single = make_workload("single", 1, seed=args.seed + 1)
    w2 = [BenchRequest(r.prompt_token_ids, tokens) for r in single]
    return {"W1": w1, "W2": w2}


def systems(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    found: dict[str, dict[str, object]] = {"tp1": {"threads": args.threads}}
    if args.threads > 1:
        found["tp1x1"] = {"threads": 1}
    found["tp2"] = {"tensor_parallel_size": 2}
    if args.pp > 1:
        found[f"pp{args.pp}"] = {"pipeline_parallel_size": args.pp}
    if args.int8:
        found["tp1i8"] = {"threads": args.threads, "quantization": "int8"}
        found["tp2i8"] = {"tensor_parallel_size": 2, "quantization": "int8"}
    return found


def run_system(
    name: str, options: dict[str, object], model_dir: Path, loads: dict[str, list], args
) -> dict[str, object] | None:
    """W1 and W2 on one system, and its null step; None where the settings refuse it."""
    from kvray.workers.protocol import StepInput

    log(f"{name}: loading ({options})")
    torch.set_num_threads(int(options.pop("threads", args.threads)))  # this process's
    try:
        llm = load_kvray(model_dir, loads["W1"], args.device, args.dtype, **options)
    except ValueError as exc:
        print(f"{name}: skipped, the settings refuse it: {exc}")
        return None
    try:
        info = llm.worker.warmup()
        run_kvray(llm, [BenchRequest(r.prompt_token_ids, 8) for r in loads["W1"][:2]])  # warm
        result: dict[str, object] = {
            "implementation": info.implementation,
            "linear": info.execution_plan.get("linear", ""),
            "dtype": info.dtype,
            "rank_weights_mib": [round(r.weights_bytes / 2**20, 1) for r in info.ranks],
            "rank_kv_mib": [round(r.kv_cache_bytes / 2**20, 1) for r in info.ranks],
        }
        for workload, reqs in loads.items():
            result[workload] = measure(f"{name} {workload}", run_kvray, llm, reqs)
        result["null_step_ms"] = 1e3 * median_seconds(
            lambda: llm.worker.step(StepInput(step_id=-1)), reps=200
        )
        return result
    finally:
        llm.close()


def _collectives(rank: int, init: str, hidden: int, vocab: int, dtype, out) -> None:
    """One of two processes (one thread each): median all-reduce and logits all-gather times."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    times = {}
    for batch in (1, 32):
        x = torch.randn(batch, hidden).to(dtype)
        part = torch.randn(batch, -(-vocab // 2)).to(dtype)
        parts = [torch.empty_like(part) for _ in range(2)]
        times[f"all_reduce_b{batch}_ms"] = 1e3 * median_seconds(
            lambda x=x: dist.all_reduce(x), reps=200
        )
        times[f"all_gather_b{batch}_ms"] = 1e3 * median_seconds(
            lambda part=part, parts=parts: dist.all_gather(parts, part), reps=100
        )
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        out.put(times)


def measure_collectives(model_dir: Path, dtype: torch.dtype) -> dict[str, float]:
    import torch.multiprocessing as mp
    from transformers import AutoConfig

    from kvray.workers.local_ranks import free_port

    config = AutoConfig.from_pretrained(model_dir)
    context = mp.get_context("spawn")
    out = context.SimpleQueue()
    init = f"tcp://127.0.0.1:{free_port()}"
    args = (init, config.hidden_size, config.vocab_size, dtype, out)
    mp.spawn(_collectives, args=args, nprocs=2, join=True)
    times = out.get()
    times["all_reduces_per_step"] = 2 * config.num_hidden_layers + 1
    return times


def print_report(results: dict[str, dict], loads: dict[str, list], comm: dict[str, float]):
    base = results["tp1"]
    for name, r in results.items():
        print(
            f"{name}: {r['implementation']}, {r['dtype']}, linear {r['linear']}; per rank: weights "
            f"{r['rank_weights_mib']} MiB, KV cache {r['rank_kv_mib']} MiB"
        )
    for workload, reqs in loads.items():
        prompt, out = len(reqs[0].prompt_token_ids), reqs[0].max_tokens
        print(f"\n## {workload}: {len(reqs)} x ({prompt} prompt + {out} output tokens)")
        print(f"{'system':<8} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'x tp1':>7}")
        for name, r in results.items():
            m = r[workload]
            ratio = m["tokens_per_s"] / base[workload]["tokens_per_s"]
            print(
                f"{name:<8} {m['output_tokens']:>7} {m['seconds']:>8.1f} "
                f"{m['tokens_per_s']:>8.1f} {ratio:>6.2f}x"
            )
    print("\n## the group's per-step costs")
    for name, r in results.items():
        print(f"null step round trip, {name}: {r['null_step_ms']:.3f} ms")
    n = comm["all_reduces_per_step"]
    for batch in (1, 32):
        reduce, gather = comm[f"all_reduce_b{batch}_ms"], comm[f"all_gather_b{batch}_ms"]
        print(
            f"batch {batch}: all-reduce of [{batch}, hidden] {reduce:.3f} ms, all-gather of the "
            f"logits {gather:.3f} ms; a step's {n} all-reduces + 1 all-gather: "
            f"{n * reduce + gather:.1f} ms"
        )
    if "tp2" in results:
        w2 = results["tp2"]["W2"]
        step_ms = 1e3 * w2["seconds"] / w2["output_tokens"]
        spent = n * comm["all_reduce_b1_ms"] + comm["all_gather_b1_ms"]
        spent += results["tp2"]["null_step_ms"]
        print(
            f"tp2 W2: {step_ms:.1f} ms a token, of which the group's messages and collectives "
            f"(null step + collectives at batch 1) are about {spent:.1f} ms ({spent / step_ms:.0%})"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="smollm2, shape (random), a path")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of tp1")
    parser.add_argument("--pp", type=int, default=2, help="pipeline stages of pp (1: no pp row)")
    parser.add_argument("--w2-tokens", type=int, default=128, help="W2's output tokens")
    parser.add_argument("--quick", action="store_true", help="4 requests, a 32-token stream")
    parser.add_argument("--int8", action="store_true", help="tp1 and tp2 with int8 weights too")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model_dir = bench_model(args.model)
    torch.set_num_threads(args.threads)
    cores = os.cpu_count() or 1
    log(
        f"torch {torch.__version__}; {cores} cores, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; tp1 {args.threads} threads, "
        f"each rank {max(1, cores // 2)}"
    )
    loads = workloads(args)
    results = {}
    for name, options in systems(args).items():
        result = run_system(name, options, model_dir, loads, args)
        if result is not None:
            results[name] = result
    dtype = getattr(torch, str(results["tp1"]["dtype"]).removeprefix("torch."))
    log("all-reduce and all-gather between two processes")
    comm = measure_collectives(model_dir, dtype)
    print(
        f"\n# {args.model} on {cores} CPU cores (load average at the end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}), {time.strftime('%Y-%m-%d %H:%M')}"
    )
    print_report(results, loads, comm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
