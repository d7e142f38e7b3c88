"""How busy each pipeline stage is, and what a decode step costs at pipeline_parallel_size 2
against 1.

One replica decodes `batch` sequences (128-token prompts), step after step, driven as the
router drives it: `--mode sync` waits for each step's output before sending the next (the
offline LLM; the router with long steps), `--mode pipelined` keeps one step in flight (the
router with short steps, ADR 0001). At 2 the ranks are the offline LLM's processes
(`LocalRanks`, one torch thread each); at 1 the worker runs in this process with `--threads`.
Windows of decode steps of each (pp=1; pp=2 sync; pp=2 pipelined) alternate, so that machine
drift spreads over all three. For each rank it reports the median window's share of the wall
time spent computing (in `step`, less its sends and receives), communicating (sends and
receives to the other stage, waiting for it included) and outside `step` (waiting for the next
step).

    python bench/pipeline_stages.py                       # the tiny model, batches 1 and 16
    python bench/pipeline_stages.py --model smollm2-shape --steps 10 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvray.workers.config import EngineConfig
from kvray.workers.protocol import NewSequence, SamplingParams, StepInput

PROMPT = 128


def decode_steps(batch: int, first_id: int, count: int, computed: int) -> list[StepInput]:
    ids = list(range(batch))
    return [
        StepInput(first_id + k, seq_ids=ids, num_scheduled_tokens=[1] * batch,
                  num_computed_tokens=[computed + k] * batch)
        for k in range(count)
    ]  # fmt: skip


def prefill(batch: int, steps: int) -> tuple[StepInput, int]:
    blocks = -(-(PROMPT + steps + 2) // 16)
    greedy = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True)
    new = [
        NewSequence(i, list(range(10, 10 + PROMPT)), PROMPT, greedy,
                    list(range(i * blocks, (i + 1) * blocks)))
        for i in range(batch)
    ]  # fmt: skip
    step = StepInput(0, new_seqs=new, seq_ids=list(range(batch)),
                     num_scheduled_tokens=[PROMPT] * batch, num_computed_tokens=[0] * batch)  # fmt: skip
    return step, blocks


class Replica:
    """A replica of `stages` pipeline stages, stepped synchronously or one step in flight."""

    def __init__(self, model: str, stages: int, batch: int, steps: int) -> None:
        first, blocks = prefill(batch, steps)
        config = EngineConfig.from_kwargs(
            model=model, dtype="float32", pipeline_parallel_size=stages,
            num_kv_blocks=batch * blocks, max_model_len=blocks * 16, max_num_seqs=max(batch, 2),
        )  # fmt: skip
        if stages == 1:
            from kvray.workers.worker import ModelWorker

            self.worker: Any = ModelWorker(config)
        else:
            from kvray.workers.local_ranks import LocalRanks

            self.worker = LocalRanks(config)
        self.worker.warmup()
        self.worker.step(first)
        self.stages, self.next_id, self.computed = stages, 1, PROMPT

    def run(self, batch: int, count: int, *, pipelined: bool) -> tuple[float, list[tuple]]:
        """Wall seconds of `count` decode steps, and each rank's (step, comm) seconds in them."""
        steps = decode_steps(batch, self.next_id, count, self.computed)
        self.next_id += count
        self.computed += count
        before = self._stage_seconds()
        start = time.perf_counter()
        if self.stages == 1 or not pipelined:
            for step in steps:
                self.worker.step(step)
        else:
            self._pipelined(steps)
        wall = time.perf_counter() - start
        after = self._stage_seconds()
        return wall, [(a[0] - b[0], a[1] - b[1]) for a, b in zip(after, before)]

    def _pipelined(self, steps: list[StepInput]) -> None:
        """Send step k + 1 to every rank before taking step k's answers (StepLoop's order)."""
        ranks = self.worker
        for pipe in ranks.pipes:
            pipe.send(("step", (steps[0],)))
        for k in range(len(steps)):
            if k + 1 < len(steps):
                for pipe in ranks.pipes:
                    pipe.send(("step", (steps[k + 1],)))
            ranks._gather(timeout=None)

    def _stage_seconds(self) -> list[tuple[float, float]]:
        if self.stages == 1:
            return [self.worker.stage_seconds()]
        return self.worker._call("stage_seconds")

    def close(self) -> None:
        getattr(self.worker, "close", lambda: None)()


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def report(stages: int, batch: int, mode: str, count: int, windows: list[tuple]) -> None:
    """The median window's step time; each rank's median shares of the wall time."""
    parts = []
    for rank in range(len(windows[0][1])):
        step_s = [ranks[rank][0] / wall for wall, ranks in windows]
        comm_s = [ranks[rank][1] / wall for wall, ranks in windows]
        compute = [s - c for s, c in zip(step_s, comm_s)]
        idle = [1 - s for s in step_s]
        parts.append(
            f"rank {rank}: compute {median(compute):4.0%} comm {median(comm_s):4.0%} "
            f"idle {median(idle):4.0%}"
        )
    ms = median([wall for wall, _ in windows]) / count * 1e3
    print(f"pp={stages} batch {batch:>2} {mode:>9}: {ms:6.2f} ms/step   " + "   ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="tiny, smollm2-shape, or a checkpoint")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--steps", type=int, default=100, help="decode steps a window")
    parser.add_argument("--repeats", type=int, default=5, help="windows of each, interleaved")
    parser.add_argument("--threads", type=int, default=1, help="torch threads at pp=1")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    model = args.model
    if model == "smollm2-shape":
        from common import smollm2_135m_shaped

        model = str(smollm2_135m_shaped())
    print(f"{args.repeats} interleaved windows of {args.steps} decode steps; medians")
    capacity = 2 * args.repeats * args.steps + 10
    for batch in map(int, args.batches.split(",")):
        one, two = Replica(model, 1, batch, capacity), Replica(model, 2, batch, capacity)
        try:
            runs: dict[tuple[int, str], list[tuple]] = {}
            for replica in (one, two):
                replica.run(batch, 5, pipelined=False)  # warm
            for _ in range(args.repeats):
                for replica, mode in [(one, "sync"), (two, "sync"), (two, "pipelined")]:
                    window = replica.run(batch, args.steps, pipelined=mode == "pipelined")
                    runs.setdefault((replica.stages, mode), []).append(window)
            for (stages, mode), windows in runs.items():
                report(stages, batch, mode, args.steps, windows)
        finally:
            one.close()
            two.close()


if __name__ == "__main__":
    main()
