"""Decode-step time of two engine configurations, interleaved so that machine drift cancels.

Both workers live in this process; after one prefill each (128-token prompts), their decode
steps alternate A, B, A, B, ... and the medians are compared. On a shared, drifting machine this
is steadier than two benchmark runs one after the other (which can differ by 25%).

    python bench/step_ab.py --a dtype=bfloat16 --b dtype=bfloat16,quantization=int8
    python bench/step_ab.py --a dtype=float32 --b dtype=bfloat16 --batches 1,8,32
    python bench/step_ab.py --a dtype=bfloat16,linear=onednn --b dtype=bfloat16

`linear=onednn`, `forward=transformers` and `forward=layers` are the bench's own options, not
the engine's: that worker's bf16 layers take oneDNN's kernel even where kvray's own
(workers/csrc/bf16_linear.cpp) would be used; or its eager steps run transformers' model
forward instead of kvray's own for the Llama family (workers/llama_family.py); or kvray's
forward runs decode steps layer by layer in Python instead of in one C++ call
(csrc/decode_layers.cpp).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import smollm2_135m_shaped

from kvray.workers.config import EngineConfig
from kvray.workers.protocol import NewSequence, SamplingParams, StepInput

PROMPT = 128


def parse_options(text: str) -> dict[str, object]:
    options: dict[str, object] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        options[key] = int(value) if value.isdigit() else value
    return options


class Stepper:
    """One worker decoding `batch` sequences, a step at a time."""

    def __init__(self, model: str, batch: int, steps: int, options: dict[str, object]) -> None:
        from kvray.workers import packed_linear  # torch: not needed for --help
        from kvray.workers.worker import ModelWorker

        options = dict(options)
        forward = options.pop("forward", "kvray")
        kvray_kernel = packed_linear._kvray_kernel
        if options.pop("linear", "kvray") == "onednn":
            packed_linear._kvray_kernel = lambda in_features: None
        blocks_per_seq = -(-(PROMPT + steps + 1) // 16)
        config = EngineConfig.from_kwargs(
            model=model,
            num_kv_blocks=batch * blocks_per_seq,
            max_model_len=blocks_per_seq * 16,
            **options,
        )
        try:
            self.worker = ModelWorker(config)
        finally:
            packed_linear._kvray_kernel = kvray_kernel
        self.worker.warmup()
        assert self.worker.runner is not None
        if forward == "transformers":
            from kvray.workers.llama_family import transformers_forward

            self.worker.runner.forward = transformers_forward(self.worker.model)
        elif forward == "layers":
            self.worker.runner.forward.stack = None  # type: ignore[union-attr]
        self.batch, self.computed, self.step_id = batch, PROMPT, 1
        greedy = SamplingParams(temperature=0, max_tokens=steps + 1)
        new = [
            NewSequence(i, list(range(10, 10 + PROMPT)), PROMPT, greedy,
                        list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)))
            for i in range(batch)
        ]  # fmt: skip
        ids = list(range(batch))
        self.worker.step(StepInput(0, new_seqs=new, seq_ids=ids,
                                   num_scheduled_tokens=[PROMPT] * batch,
                                   num_computed_tokens=[0] * batch))  # fmt: skip

    def step(self) -> float:
        ids = list(range(self.batch))
        start = time.perf_counter()
        self.worker.step(StepInput(self.step_id, seq_ids=ids,
                                        num_scheduled_tokens=[1] * self.batch,
                                        num_computed_tokens=[self.computed] * self.batch))  # fmt: skip
        self.computed += 1
        self.step_id += 1
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--a", default="dtype=bfloat16", help="engine options, key=value,...")
    parser.add_argument("--b", default="dtype=bfloat16,quantization=int8")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--model", default=None, help="default: the SmolLM2-135M shape")
    args = parser.parse_args()
    model = args.model or str(smollm2_135m_shaped())
    print(f"A: {args.a}   B: {args.b}   ({args.steps} interleaved decode steps each)")
    for batch in map(int, args.batches.split(",")):
        a = Stepper(model, batch, args.steps, parse_options(args.a))
        b = Stepper(model, batch, args.steps, parse_options(args.b))
        times_a, times_b = [], []
        for _ in range(args.steps):
            times_a.append(a.step())
            times_b.append(b.step())
        ma = sorted(times_a)[len(times_a) // 2] * 1e3
        mb = sorted(times_b)[len(times_b) // 2] * 1e3
        print(f"batch {batch:>3}: A {ma:6.1f} ms/step ({batch * 1e3 / ma:6.1f} tok/s)   "
              f"B {mb:6.1f} ms/step ({batch * 1e3 / mb:6.1f} tok/s)   B/A speed {ma / mb:.2f}x")  # fmt: skip
        del a, b


if __name__ == "__main__":
    main()
