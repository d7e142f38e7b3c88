"""Offline engine throughput: kvray against Hugging Face baselines on the same requests, one run.

Baselines (measured in the same process, on the same model and requests):
  hf-single   `generate` one request at a time (a subset; tokens/s is what is compared)
  hf-static   `generate` on one static, left-padded batch (pays for padding and for running
              every row to the longest output)
  hf-cb       transformers' own continuous batching (`init_continuous_batching`, the manager
              behind `generate_batch`), with each request's own max_new_tokens and the same
              step budget as kvray (2048 tokens, all requests in one batch) and a paged cache
              that, like kvray's, holds every request at once: on CPU faster than its
              defaults, which also fill 60% of the free RAM with cache

Beam search (`--workloads beam`): kvray's beam search against Hugging Face's
`generate(num_beams=4)`, on one request and on 16 at once (128-token prompts, 32 new tokens,
the best beam's tokens counted).

    python bench/engine_throughput.py            # full: 64 requests per workload
    python bench/engine_throughput.py --quick    # 4 requests, uniform only (~1.5 min on 2 cores)
    python bench/engine_throughput.py --workloads beam
    python bench/engine_throughput.py --model smollm2 --dtype bfloat16 --workloads single

A quick run is a smoke test of the table: its ratios say little about batching, so the
targets (set for 64 requests) are not judged there. `RSS GiB` is this process's peak resident
memory while a system ran (weights and what earlier systems left behind included).

`--model smollm2` runs the real SmolLM2-135M-Instruct (the built-in checkpoint) instead of the
random-weight model of its shape; `single` is one request (128 + 256 tokens): decode speed.
`--systems kvray,kvray-int8,...` adds kvray variants to the same run: `kvray-int8`
(`quantization: int8`), `kvray-w8a8` (`quantization: w8a8`), `kvray-graphs` and `kvray-eager`
(`decode_graphs: on` / `off`; kvray's default is graphs on a GPU, eager on CPU),
`kvray-int8-graphs` (both). Each
kvray row is also printed as a share of this machine's limits, measured in the same run: the
FLOP/s of one large matmul (batches) and the read bandwidth (one stream).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import (
    BenchRequest,
    HardwareLimits,
    PeakMemory,
    linear_weight_count,
    log,
    make_workload,
    measure_limits,
    smollm2_135m_shaped,
)

if TYPE_CHECKING:
    from transformers import ContinuousBatchingConfig

MAX_BATCHED_TOKENS = 2048  # per step, for kvray and hf-cb alike
FULL_REQUESTS = 64  # requests per workload in a full run, the size the targets are set for
NUM_BEAMS, BEAM_TOKENS, BEAM_REQUESTS = 4, 32, 16
TARGETS = {  # workload -> {baseline: minimum kvray/baseline ratio} at FULL_REQUESTS requests
    "uniform": {"hf-static": 0.9, "hf-cb": 3.0},
    "mixed": {"hf-static": 1.5, "hf-cb": 3.0},
}


def bench_model(name: str) -> Path:
    """The checkpoint directory a `--model` value names."""
    if name == "shape":
        return smollm2_135m_shaped()
    from kvray.workers.checkpoints import resolve_model

    return Path(resolve_model(name))


def max_positions(model_dir: Path) -> int:
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(model_dir).get_text_config()
    return int(getattr(text, "max_position_embeddings", None) or MAX_BATCHED_TOKENS)


# kvray's variants: engine options on top of the defaults.
KVRAY_SYSTEMS: dict[str, dict[str, object]] = {
    "kvray": {},
    "kvray-int8": {"quantization": "int8"},
    "kvray-w8a8": {"quantization": "w8a8"},
    "kvray-graphs": {"decode_graphs": "on"},  # the default on a GPU; opt-in on CPU
    "kvray-eager": {"decode_graphs": "off"},
    "kvray-int8-graphs": {"quantization": "int8", "decode_graphs": "on"},
}


def load_kvray(
    model_dir: Path,
    reqs: list[BenchRequest],
    device: str,
    dtype: str,
    *,
    num_beams: int = 1,
    **options: object,
):
    """An offline engine whose KV cache holds every request at once (as a static batch's would)."""
    from kvray import LLM

    block_size = 16
    num_blocks = num_beams * sum(
        -(-(len(r.prompt_token_ids) + r.max_tokens) // block_size) for r in reqs
    )
    llm = LLM(
        str(model_dir),
        device=device,
        dtype=dtype,
        max_num_seqs=len(reqs) * num_beams,
        # NOTE: not SmolLM2's own 8192, which would need 4x the blocks
        max_model_len=min(MAX_BATCHED_TOKENS, max_positions(model_dir)),
        max_num_batched_tokens=MAX_BATCHED_TOKENS,
        block_size=block_size,
        num_kv_blocks=max(num_blocks, MAX_BATCHED_TOKENS // block_size) + 8,
        **options,
    )
    return llm


def run_kvray(llm, reqs: list[BenchRequest]) -> int:
    from kvray import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in reqs]
    outputs = llm.generate([r.prompt_token_ids for r in reqs], params)
    log(f"kvray: {llm.engine.scheduler.num_preemptions} preemptions so far")
    return sum(len(o.token_ids) for o in outputs)


def load_hf(model_dir: Path, device: str, dtype: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvray.workers import device as devices

    dev = devices.resolve_device(device)
    saved = getattr(
        AutoConfig.from_pretrained(model_dir), "dtype", None
    )  # as kvray's auto reads it
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=devices.resolve_dtype(dtype, dev, checkpoint_dtype=saved),
        attn_implementation="sdpa",
    )
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(dev).eval()


@torch.inference_mode()
def run_hf_single(model: torch.nn.Module, reqs: list[BenchRequest]) -> int:
    total = 0
    for r in reqs:
        ids = torch.tensor([r.prompt_token_ids], device=model.device)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.max_tokens, do_sample=False
        )
        total += out.shape[1] - ids.shape[1]
    return total


def left_padded(reqs: list[BenchRequest]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as one left-padded batch: (ids, attention mask), [num_reqs, longest]."""
    width = max(len(r.prompt_token_ids) for r in reqs)
    ids = torch.zeros(len(reqs), width, dtype=torch.long)
    mask = torch.zeros(len(reqs), width, dtype=torch.long)
    for i, r in enumerate(reqs):
        ids[i, width - len(r.prompt_token_ids) :] = torch.tensor(r.prompt_token_ids)
        mask[i, width - len(r.prompt_token_ids) :] = 1
    return ids, mask


@torch.inference_mode()
def run_hf_static(model: torch.nn.Module, reqs: list[BenchRequest]) -> int:
    ids, mask = left_padded(reqs)
    longest = max(r.max_tokens for r in reqs)
    model.generate(
        ids.to(model.device),
        attention_mask=mask.to(model.device),
        max_new_tokens=longest,
        do_sample=False,
    )
    # Every row runs to the longest output; only each request's own tokens are useful.
    return sum(r.max_tokens for r in reqs)


def run_kvray_beams(llm, reqs: list[BenchRequest]) -> int:
    from kvray import SamplingParams

    params = SamplingParams(num_beams=NUM_BEAMS, max_tokens=BEAM_TOKENS, ignore_eos=True)
    outputs = llm.generate([r.prompt_token_ids for r in reqs], params)
    return sum(len(o.token_ids) for o in outputs)


@torch.inference_mode()
def run_hf_beams(model: torch.nn.Module, reqs: list[BenchRequest]) -> int:
    ids, mask = left_padded(reqs)
    out = model.generate(
        ids.to(model.device),
        attention_mask=mask.to(model.device),
        max_new_tokens=BEAM_TOKENS,
        num_beams=NUM_BEAMS,
        do_sample=False,
    )
    return len(reqs) * (out.shape[1] - ids.shape[1])


def hf_cb_config(reqs: list[BenchRequest]) -> ContinuousBatchingConfig:
    """hf-cb's paged cache and step budget, as kvray's: every request's prompt and output at
    once (at least one step's tokens), MAX_BATCHED_TOKENS per step, every request in one batch.

    NOTE: left to its defaults, transformers sizes the cache from memory (on CPU, 60% of the
    RAM this process does not hold: 13.4 GiB resident on a 24 GB machine, for any workload)
    and takes 8192 tokens a step.
    """
    from transformers import ContinuousBatchingConfig

    page = ContinuousBatchingConfig().page_size
    pages = sum(-(-(len(r.prompt_token_ids) + r.max_tokens) // page) for r in reqs)
    return ContinuousBatchingConfig(
        num_blocks=max(pages, -(-MAX_BATCHED_TOKENS // page)) + 1,
        max_batch_tokens=MAX_BATCHED_TOKENS,
        max_requests_per_batch=len(reqs),
        # NOTE: the cache holds every request, so no prefill need wait for free pages (the
        # default 15% margin would hold the last requests back, as kvray never does)
        safety_margin=0.0,
    )


@torch.inference_mode()
def run_hf_cb(model: torch.nn.Module, reqs: list[BenchRequest]) -> int:
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max(r.max_tokens for r in reqs),
        eos_token_id=-1,  # none: every request runs to its max_new_tokens
        pad_token_id=0,
    )
    manager = model.init_continuous_batching(
        generation_config=config, continuous_batching_config=hf_cb_config(reqs)
    )
    manager.start()
    try:
        ids = [
            manager.add_request(r.prompt_token_ids, request_id=f"r{i}", max_new_tokens=r.max_tokens)
            for i, r in enumerate(reqs)
        ]
        total, done = 0, set()
        while len(done) < len(ids):
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching stopped early")
                continue
            if result.is_finished() and result.request_id not in done:
                done.add(result.request_id)
                total += len(result.generated_tokens)
        return total
    finally:
        manager.stop(block=True)


def measure(name: str, fn, *args) -> dict:
    log(f"{name}: running")
    with PeakMemory() as mem:
        start = time.perf_counter()
        tokens = fn(*args)
        elapsed = time.perf_counter() - start
    result = {
        "system": name,
        "output_tokens": tokens,
        "seconds": round(elapsed, 2),
        "tokens_per_s": tokens / elapsed,
        "peak_rss_gib": round(mem.peak_rss / 2**30, 2),
        "peak_gpu_gib": round(mem.peak_gpu / 2**30, 2),
    }
    log(f"{name}: {tokens} tokens in {elapsed:.1f}s = {tokens / elapsed:.1f} tok/s")
    return result


def first_token_ms(fn, *args: object, reps: int = 5) -> float:
    """Median time to first token of one W2-length prompt, in ms: `fn(*args, [request])` with a
    1-token request, each rep on new token ids (a repeated prompt would hit kvray's prefix
    cache and skip its prefill)."""
    times = []
    for rep in range(reps):
        prompt = make_workload("single", 1, seed=1000 + rep)[0].prompt_token_ids
        start = time.perf_counter()
        fn(*args, [BenchRequest(prompt, 1)])
        times.append(time.perf_counter() - start)
    return sorted(times)[reps // 2] * 1e3


def run_workload(args: argparse.Namespace, workload: str, model_dir: Path) -> list[dict]:
    num_requests = 1 if workload == "single" else args.num_requests
    reqs = make_workload(workload, num_requests, seed=args.seed)
    single = reqs[: args.single_requests]
    # NOTE: every system gets the same untimed warm-up first (two requests, 8 tokens each):
    # a first run pays for page faults and allocator growth that later runs do not.
    warmup = [BenchRequest(r.prompt_token_ids, 8) for r in reqs[:2]]
    results = []
    for system, options in KVRAY_SYSTEMS.items():
        if system not in args.systems:
            continue
        llm = load_kvray(model_dir, reqs, args.device, args.dtype, **options)
        run_kvray(llm, warmup)
        result = measure(system, run_kvray, llm, reqs)
        result["prompt_tokens"] = sum(len(r.prompt_token_ids) for r in reqs)
        result["weight_bytes"] = 1 if options.get("quantization") else llm.worker.dtype.itemsize
        if workload == "single":
            result["ttft_ms"] = first_token_ms(run_kvray, llm)
        results.append(result)
        del llm
    model = None
    for system, fn, subset in (
        ("hf-single", run_hf_single, single),
        ("hf-static", run_hf_static, reqs),
        ("hf-cb", run_hf_cb, reqs),
    ):
        if system not in args.systems:
            continue
        model = model or load_hf(model_dir, args.device, args.dtype)
        if system != "hf-cb":  # hf-cb sets up (and warms) its own manager on every run
            fn(model, warmup[: len(subset)])
        results.append(measure(system, fn, model, subset))
        if workload == "single" and system != "hf-cb":
            results[-1]["ttft_ms"] = first_token_ms(fn, model)
    return results


def run_beam_workload(args: argparse.Namespace, model_dir: Path) -> list[dict]:
    """kvray's beam search and HF's, on one request and on BEAM_REQUESTS at once."""
    reqs = [
        BenchRequest(r.prompt_token_ids, BEAM_TOKENS)
        for r in make_workload("uniform", BEAM_REQUESTS, seed=args.seed)
    ]
    llm = load_kvray(model_dir, reqs, args.device, args.dtype, num_beams=NUM_BEAMS)
    model = load_hf(model_dir, args.device, args.dtype)
    run_kvray_beams(llm, reqs[:1])  # untimed warm-up, as for the other workloads
    run_hf_beams(model, reqs[:1])
    results = []
    for subset in (reqs[:1], reqs):
        results.append(measure(f"kvray x{len(subset)}", run_kvray_beams, llm, subset))
        results.append(measure(f"hf x{len(subset)}", run_hf_beams, model, subset))
    return results


def print_beam_table(results: list[dict]) -> None:
    print(f"\n## beam search: {NUM_BEAMS} beams, 128-token prompts, {BEAM_TOKENS} new tokens")
    print(f"{'system':<10} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'kvray/hf':>9}")
    for kvray, hf in zip(results[::2], results[1::2]):
        for r in (kvray, hf):
            print(
                f"{r['system']:<10} {r['output_tokens']:>7} {r['seconds']:>8.1f} "
                f"{r['tokens_per_s']:>8.1f}"
            )
        print(f"{'':<36}{kvray['tokens_per_s'] / hf['tokens_per_s']:>8.2f}x")


def print_table(workload: str, results: list[dict], *, num_requests: int) -> None:
    by = {r["system"]: r for r in results}
    print(f"\n## {workload}")
    print(
        f"{'system':<10} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'kvray/x':>8} {'RSS GiB':>8} {'GPU GiB':>8}"
    )
    for r in results:
        ratio = by["kvray"]["tokens_per_s"] / r["tokens_per_s"] if "kvray" in by else float("nan")
        print(
            f"{r['system']:<10} {r['output_tokens']:>7} {r['seconds']:>8.1f} {r['tokens_per_s']:>8.1f} "
            f"{ratio:>7.2f}x {r['peak_rss_gib']:>8.2f} {r['peak_gpu_gib']:>8.2f}"
        )
    if any("ttft_ms" in r for r in results):
        prompt = len(make_workload(workload, 1)[0].prompt_token_ids)
        print(f"time to first token, one {prompt}-token prompt (median of 5 new prompts, warm): " + ", ".join(
            f"{r['system']} {r['ttft_ms']:.0f} ms" for r in results if "ttft_ms" in r))  # fmt: skip
    for variant in ("kvray-int8", "kvray-w8a8"):
        if "kvray" in by and variant in by:
            ratio = by[variant]["tokens_per_s"] / by["kvray"]["tokens_per_s"]
            print(f"{variant} / kvray: {ratio:.2f}x")
    print_targets(workload, by, num_requests=num_requests)


def print_targets(workload: str, by: dict[str, dict], *, num_requests: int) -> None:
    """kvray's ratio to each baseline against its target, where the run is the workload the
    target was set for (FULL_REQUESTS requests); otherwise one line saying why there is none."""
    targets = {b: t for b, t in TARGETS.get(workload, {}).items() if "kvray" in by and b in by}
    if not targets:
        return
    if num_requests != FULL_REQUESTS:
        wanted = ", ".join(f"kvray >= {t}x {b}" for b, t in targets.items())
        print(f"no target verdicts ({wanted}): the targets are set for {FULL_REQUESTS} "
              f"requests, and this run has {num_requests}")  # fmt: skip
        return
    for baseline, target in targets.items():
        ratio = by["kvray"]["tokens_per_s"] / by[baseline]["tokens_per_s"]
        verdict = "meets" if ratio >= target else "MISSES"
        print(f"target kvray >= {target}x {baseline}: {ratio:.2f}x ({verdict})")


def print_limits(workload: str, results: list[dict], limits: HardwareLimits, weights: int) -> None:
    """kvray's figure as a fraction of the machine's limit: compute for batches (every prompt
    and output token is 2 FLOPs per weight), weight reads for one stream (each decode step
    reads every weight once)."""
    for kvray in (r for r in results if r["system"].startswith("kvray")):
        name = kvray["system"]
        if workload == "single":
            rate = weights * kvray["weight_bytes"] * kvray["tokens_per_s"]
            print(f"{name} reads weights at {rate / 1e9:.1f} GB/s = "
                  f"{share(rate / limits.read_bytes)} of the {limits.read_bytes / 1e9:.1f} GB/s "
                  "measured read bandwidth")  # fmt: skip
            continue
        tokens = kvray["prompt_tokens"] + kvray["output_tokens"]
        rate = 2 * weights * tokens / kvray["seconds"]
        print(f"{name} computes {rate / 1e9:.0f} GFLOP/s in linear layers = "
              f"{share(rate / limits.matmul_flops)} of the {limits.matmul_flops / 1e9:.0f} GFLOP/s "
              "measured for one large matmul")  # fmt: skip


def share(fraction: float) -> str:
    """A fraction of a limit as a percentage, with decimals where it is small (GPUs)."""
    return f"{fraction:.0%}" if fraction >= 0.1 else f"{fraction:.2%}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="4 requests, uniform workload only (a smoke run)"
    )
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--single-requests", type=int, default=None, help="hf-single subset size")
    parser.add_argument(
        "--workloads", help="uniform, mixed, single, beam (default: uniform,mixed; quick: uniform)"
    )
    parser.add_argument("--model", default="shape", help="shape (random weights), smollm2, a path")
    parser.add_argument("--systems", default="kvray,hf-single,hf-static,hf-cb")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    args.num_requests = args.num_requests or (4 if args.quick else FULL_REQUESTS)
    model_dir = bench_model(args.model)
    args.single_requests = args.single_requests or (1 if args.quick else 4)
    args.workloads = args.workloads or ("uniform" if args.quick else "uniform,mixed")
    args.systems = set(args.systems.split(","))
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device={args.device}")
    all_results = {}
    measured = any(s.startswith("kvray") for s in args.systems)
    limits = measure_limits(args.dtype, args.device) if measured else None
    weights = linear_weight_count(model_dir)
    for workload in args.workloads.split(","):
        if workload == "beam":
            all_results[workload] = run_beam_workload(args, model_dir)
            print_beam_table(all_results[workload])
            continue
        results = run_workload(args, workload, model_dir)
        all_results[workload] = results
        print_table(workload, results, num_requests=args.num_requests)
        if limits is not None:
            print_limits(workload, results, limits, weights)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(all_results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
