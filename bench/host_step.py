"""Host work of a decode step, phase by phase: with a null replay, and with the real forward.

One `ModelWorker` (SmolLM2-135M's shape, random weights, vocabulary 49152: sampling's cost
grows with it) and one `EngineCore` run decode steps of `batch` sequences as the offline engine
does (schedule, the worker's step, process), timing each phase of a step:

- `schedule`: `EngineCore.schedule` (the router's side: the scheduler builds the StepInput);
- `pickle`: the StepInput and StepOutput pickled and unpickled (what a Ray call adds);
- `diffs`: `SequenceTable.apply` (the worker's copy of each sequence kept in step);
- `inputs`: the forward's inputs (`ModelRunner.prepare`; a replay's persistent buffers filled);
- `forward`: the forward, or the replay: `null`, a replay that returns preallocated logits
  (the decode-graph path with nothing replayed), or `real`, the model's eager forward;
- `sampling prep`: `prepare_sampling_batch` (each row's knobs as tensors);
- `sampling`: `Sampler.sample` (the token ids copied back included) and the tokens appended;
- `worker rest`: the rest of `ModelWorker.step` (its scheduled list, the StepOutput);
- `process`: `EngineCore.process` (stop rules, detokenizing, one chunk per sequence).

Mixes: `greedy` (temperature 0) and `sampled` (rows cycle through top-p, top-k with a seed,
penalties with min-p, plain temperature with a seed, and greedy). The fastest 80% of the timed
steps are averaged (a shared machine's outliers dropped); each phase's share is of the whole
step. On CUDA the device runs ahead of the host: the sampler's copy back waits for the forward.

    python bench/host_step.py                                # null replay, batch 1/32/256
    python bench/host_step.py --real-batches 1,32 --dtype bfloat16
    python bench/host_step.py --batches 256 --mixes sampled --json out.json
    python bench/host_step.py --threads 1 --clock cpu     # on a shared machine
"""

from __future__ import annotations

import argparse
import functools
import json
import pickle
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import smollm2_135m_shaped

from kvray.workers.protocol import SamplingParams

PHASES = [
    "schedule",
    "pickle",
    "diffs",
    "inputs",
    "forward",
    "sampling prep",
    "sampling",
    "worker rest",
    "process",
]


def sampling_params(mix: str, index: int, max_tokens: int) -> SamplingParams:
    """Row `index`'s parameters in `mix` (every row runs to `max_tokens`)."""
    common: dict[str, Any] = {"max_tokens": max_tokens, "ignore_eos": True}
    if mix == "greedy":
        return SamplingParams(temperature=0.0, **common)
    kinds: list[dict[str, Any]] = [
        {"temperature": 0.8, "top_p": 0.9},
        {"temperature": 0.7, "top_k": 50, "seed": index},
        {"temperature": 1.0, "repetition_penalty": 1.1, "presence_penalty": 0.5,
         "frequency_penalty": 0.3, "min_p": 0.05},
        {"temperature": 0.9, "seed": 1000 + index},
        {"temperature": 0.0},
    ]  # fmt: skip
    return SamplingParams(**kinds[index % len(kinds)], **common)


class Phases:
    """Self time per phase: a phase nested in another counts only for the inner one."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.seconds: dict[str, float] = {}
        self._stack: list[list[float]] = []  # [start, time spent in nested phases]

    def timed(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            frame = [self.clock(), 0.0]
            self._stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
                elapsed = self.clock() - frame[0]
                self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed - frame[1]
                if self._stack:
                    self._stack[-1][1] += elapsed

        return call

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        setattr(owner, name, self.timed(phase, getattr(owner, name)))

    def take(self) -> dict[str, float]:
        seconds, self.seconds = self.seconds, {}
        return seconds


def make_worker(args: argparse.Namespace, model: str) -> Any:
    from kvray.workers.config import EngineConfig
    from kvray.workers.worker import ModelWorker

    max_batch = max(map(int, (args.batches + "," + args.real_batches).strip(",").split(",")))
    max_len = -(-(args.prompt + args.warm_steps + args.steps + 8) // 16) * 16
    config = EngineConfig.from_kwargs(
        model=model, device=args.device, dtype=args.dtype, decode_graphs="off",
        num_kv_blocks=max_batch * (max_len // 16) + 16, max_model_len=max_len,
        max_num_seqs=max_batch, max_num_batched_tokens=max(4096, max_len),
    )  # fmt: skip
    worker = ModelWorker(config)
    worker.warmup()
    return worker


def install_null_replays(worker: Any, phases: Phases) -> Callable[[], None]:
    """Decode steps as replays that compute nothing, and prompt steps as a forward that computes
    nothing: each returns preallocated logits. Returns an undo (the real eager forward back)."""
    import torch

    from kvray.workers.decode_graphs import DecodeGraphs

    runner = worker.runner
    max_batch = worker.limits.max_num_seqs
    graphs = DecodeGraphs(
        lambda *a: None, runner.kv_cache, None, worker.device, max(max_batch, 2),
        worker.max_model_len,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, graphs.sizes[-1], worker.vocab_size, generator=generator)
    logits = logits.to(worker.device, worker.dtype)  # [1, max_batch, vocab], as the model's
    for b in graphs.sizes:
        graphs._replays[b] = phases.timed("forward", lambda b=b: logits[:, :b])
    eager = runner.forward

    def null_forward(input_ids: Any, positions: Any, keep: Any) -> Any:
        return logits[:, : keep.numel()]  # a prompt step's: its sampled rows' logits

    runner.graphs, runner.forward = graphs, phases.timed("forward", null_forward)

    def undo() -> None:
        runner.graphs, runner.forward = None, eager

    return undo


def instrument(worker: Any, phases: Phases) -> None:
    """Time the worker's phases (instance attributes and the worker module's helper)."""
    from kvray.workers import worker as worker_module

    runner = worker.runner
    phases.wrap(worker.table, "apply", "diffs")
    phases.wrap(runner, "prepare", "inputs")
    phases.wrap(runner, "execute", "inputs")  # a replay's buffers; the forward nested in it
    phases.wrap(runner, "forward", "forward")  # the eager forward
    phases.wrap(worker, "_sample", "sampling")
    if not hasattr(worker_module, "_original_prepare_sampling_batch"):
        worker_module._original_prepare_sampling_batch = worker_module.prepare_sampling_batch
        worker_module.prepare_sampling_batch = phases.timed(
            "sampling prep", worker_module.prepare_sampling_batch
        )


def run_case(
    worker: Any, processor: Any, phases: Phases, batch: int, mix: str, args: argparse.Namespace
) -> dict[str, float]:
    """Decode steps of `batch` sequences; each phase's mean seconds per step (fastest 80%)."""
    from kvray.cluster.engine import EngineCore

    worker.table.seqs.clear()
    engine = EngineCore(worker.info, worker.limits)
    schedule = phases.timed("schedule", engine.schedule)
    process = phases.timed("process", engine.process)
    step = phases.timed("worker rest", worker.step)

    def wire(message: Any) -> Any:
        return pickle.loads(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    wire = phases.timed("pickle", wire)
    rng = random.Random(batch)
    max_tokens = args.warm_steps + args.steps + 4
    for i in range(batch):
        prompt = [rng.randrange(10, worker.vocab_size) for _ in range(args.prompt)]
        engine.add(processor.process(prompt, sampling_params(mix, i, max_tokens), f"r{i}"))
    steps: list[dict[str, float]] = []
    num_decode_steps = 0
    while num_decode_steps < args.warm_steps + args.steps:
        phases.take()
        start = phases.clock()
        step_input = schedule()
        output = wire(step(wire(step_input)))
        process(output)
        total = phases.clock() - start
        if step_input.num_tokens != batch or len(step_input.seq_ids) != batch:
            continue  # a prompt step
        num_decode_steps += 1
        seconds = phases.take()
        if num_decode_steps > args.warm_steps:
            steps.append({**seconds, "total": total})
    engine.abort_all()
    steps.sort(key=lambda s: s["total"])
    kept = steps[: max(1, len(steps) * 4 // 5)]
    return {p: sum(s.get(p, 0.0) for s in kept) / len(kept) for p in [*PHASES, "total"]}


def print_table(title: str, rows: list[tuple[str, dict[str, float]]]) -> None:
    print(title)
    print(f"{'case':<18}" + "".join(f"{p:>16}" for p in [*PHASES, "step"]) + f"{'host':>17}")
    for name, r in rows:
        total = r["total"]
        cells = "".join(f"{r[p] * 1e6:9.0f} {r[p] / total:6.1%}" for p in PHASES)
        host = total - r["forward"]
        print(f"{name:<18}{cells}{total * 1e6:16.0f}{host * 1e6:10.0f} {host / total:6.1%}")
    print("(us per step and share of the step; host: the step less its forward)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="1,32,256", help="null replay's batch sizes")
    parser.add_argument("--real-batches", default="", help="the real forward's (e.g. 1,32)")
    parser.add_argument("--mixes", default="greedy,sampled")
    parser.add_argument("--steps", type=int, default=30, help="timed decode steps per case")
    parser.add_argument("--warm-steps", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--model", default=None, help="default: the SmolLM2-135M shape")
    parser.add_argument("--threads", type=int, default=0, help="torch's threads (0: its own)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this process's CPU time (steadier on a shared machine; with --threads 1)",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from kvray.cluster.input_processor import InputProcessor
    from kvray.cluster.tokenizer import load_tokenizer

    worker = make_worker(args, args.model or str(smollm2_135m_shaped()))
    processor = InputProcessor(worker.info, load_tokenizer(worker.info.model))
    phases = Phases(time.process_time if args.clock == "cpu" else time.perf_counter)
    instrument(worker, phases)
    results: dict[str, dict[str, float]] = {}
    mixes = args.mixes.split(",")
    for forward, batches in (("null", args.batches), ("real", args.real_batches)):
        undo = install_null_replays(worker, phases) if forward == "null" else lambda: None
        rows = []
        for batch in [int(b) for b in batches.split(",") if b]:
            for mix in mixes:
                name = f"{forward} b{batch} {mix}"
                rows.append((name, run_case(worker, processor, phases, batch, mix, args)))
                results[name] = rows[-1][1]
        undo()
        if rows:
            print_table(f"{forward} forward, {args.device} {args.dtype}:", rows)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
