"""Time of a prompt step (many prompt chunks at once) under three prompt paths, interleaved.

One worker, one model; each repetition runs the same step under every variant in turn, and the
medians are compared (machine drift cancels). The steps:

- `fresh`: W3's first 32 prompts (16-512 tokens, `bench/common.py`), nothing cached;
- `chunks`: 16 prompts of 256 tokens, each a second chunk of 128 over 128 cached tokens,
  beside 16 decodes (a mixed step of a chunked prefill).

The variants:

- `kvray`: the default (on CUDA in bf16/fp16, one variable-length flash attention a layer);
- `per-prompt`: one SDPA per prompt chunk (what CPUs, fp32 and older torches run);
- `transformers`: transformers' model forward instead of kvray's own for the Llama family.

Each variant's logits are compared with the default's (max abs difference printed).

    python bench/prompt_step.py --device cuda --dtype bfloat16
    python bench/prompt_step.py --device cpu --dtype bfloat16 --reps 3
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import make_workload, smollm2_135m_shaped

BLOCK = 16


def steps() -> dict[str, list[tuple[list[int], int, int]]]:
    """step name -> [(token ids, tokens cached, tokens computed this step)]."""
    fresh = [(r.prompt_token_ids, 0, len(r.prompt_token_ids)) for r in make_workload("mixed", 32)]
    prompts = [r.prompt_token_ids for r in make_workload("uniform", 16, seed=1)]
    chunks = [(p * 2, 128, 128) for p in prompts]
    decodes = [([*p, 7], 128, 1) for p in prompts]
    return {"fresh": fresh, "chunks": decodes + chunks}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--model", default=None, help="default: the SmolLM2-135M shape")
    args = parser.parse_args()

    import torch

    from kvray.workers import attention
    from kvray.workers.config import EngineConfig
    from kvray.workers.llama_family import transformers_forward
    from kvray.workers.model_runner import ScheduledSeq
    from kvray.workers.worker import ModelWorker

    model = args.model or str(smollm2_135m_shaped())
    config = EngineConfig.from_kwargs(
        model=model, device=args.device, dtype=args.dtype, num_kv_blocks=2048,
        max_model_len=1024, decode_graphs="off",
    )  # fmt: skip
    worker = ModelWorker(config)
    worker.warmup()
    runner = worker.runner
    assert runner is not None
    default_forward, varlen = runner.forward, attention._varlen_attn

    @contextlib.contextmanager
    def variant(name: str) -> Iterator[None]:
        if name == "per-prompt":
            attention._varlen_attn = None
        elif name == "transformers":
            runner.forward = transformers_forward(worker.model)
        try:
            yield
        finally:
            runner.forward, attention._varlen_attn = default_forward, varlen

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    print(f"{args.device} {args.dtype}: torch's varlen_attn {'found' if varlen else 'absent'}, "
          f"forward {type(default_forward).__name__}")  # fmt: skip
    names = ["kvray", "per-prompt", "transformers"]
    for step_name, layout in steps().items():
        seqs, next_block = [], 0
        for ids, cached, n in layout:
            blocks = list(range(next_block, next_block + -(-len(ids) // BLOCK)))
            next_block = blocks[-1] + 1
            seqs.append(ScheduledSeq(ids, blocks, cached, n))
        times: dict[str, list[float]] = {n: [] for n in names}
        logits: dict[str, torch.Tensor] = {}
        for rep in range(args.reps + 1):  # the first repetition warms up
            for name in names:
                with variant(name):
                    sync()
                    start = time.perf_counter()
                    out = runner.execute(runner.prepare(seqs))
                    sync()
                    if rep:
                        times[name].append(time.perf_counter() - start)
                    logits[name] = out.float()
        base = statistics.median(times["kvray"])
        tokens = sum(n for _, _, n in layout)
        print(f"{step_name} ({len(seqs)} sequences, {tokens} tokens):")
        for name in names:
            t = statistics.median(times[name])
            diff = (logits[name] - logits["kvray"]).abs().max().item()
            print(f"  {name:<13} {t * 1e3:8.2f} ms   kvray's speed-up {t / base:5.2f}x   "
                  f"max |logits - kvray's| {diff:.3g}")  # fmt: skip


if __name__ == "__main__":
    main()
