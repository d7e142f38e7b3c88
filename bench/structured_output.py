"""What structured output costs on smollm2, in one run:

1. decode: constrained vs unconstrained decode at batch 1 and 32, interleaved (rounds of
   constrained, unconstrained, unconstrained, constrained), the offline engine in this process:
   each decode step's time (StepOutput.forward_s) and, constrained, its mask time
   (StepOutput.mask_s) and the mask's share of the step, over steps where the whole batch
   decodes. Target: mask <= 10% of the step at batch 32. The schema is a typical one (typed
   fields, enums, bounded numbers, an array with maxItems, a nested object); unconstrained
   requests ignore end of sequence so that both run as long.
2. compile: the router's GrammarChecker on smollm2's tokenizer: its tokenizer index (built
   once), each of 20 distinct schemas compiled cold, then the same 20 again (cache hits), as its
   counters report them.
3. stall: the event loop's largest lag (a probe that sleeps 1 ms and measures how late it
   wakes) while 20 requests with 20 new schemas arrive: (a) 20 `GrammarChecker.check` calls on
   a running loop; (b) a running smollm2 cluster (router in this process, replica in Ray, a
   stream decoding throughout), the requests sent by another (already connected) process over
   gRPC, beside the stream alone, the same 20 requests without a schema, and with the schemas
   already compiled. Target: no stall over 5 ms: (a) absolute; (b) over the same requests
   without a schema, as bench/front_door.py measures gaps over idle (on two cores the loop
   lags by milliseconds with nothing compiling: its share of the CPUs, the VM's scheduling).

    python bench/structured_output.py                      # all parts (~10 minutes on 2 cores)
    python bench/structured_output.py --part decode --rounds 1 --max-tokens 32
    python bench/structured_output.py --dtype bfloat16      # default: the model's (fp32 here)
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log
from grammar_workloads import TYPICAL_SCHEMA
from structured_workloads import SCHEMAS

MASK_SHARE_TARGET = 0.10  # of a decode step at batch 32
STALL_TARGET_S = 0.005
BATCHES = (1, 32)
ITEMS = ["novel", "film", "album", "board game", "cookbook", "documentary", "concert DVD",
         "video game", "poetry book", "comic", "thriller", "biography", "jazz record",
         "puzzle game", "travel guide", "sci-fi film"]  # fmt: skip


def ms(seconds: float) -> str:
    if seconds < 0.001:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1000:.2f} ms"


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


# -- 1. decode --------------------------------------------------------------------------------


def decode_prompts(n: int) -> list[Any]:
    from kvray.cluster.input_processor import ChatPrompt

    texts = [
        f"Write a catalogue entry for a {ITEMS[i % len(ITEMS)]} (entry {i + 1}) as JSON: title, "
        "category, rating, price, tags, stock and publisher."
        for i in range(n)
    ]
    return [ChatPrompt(({"role": "user", "content": t},), True) for t in texts]


def run_batch(
    llm: Any, batch: int, constrained: bool, max_tokens: int
) -> list[tuple[float, float]]:
    """Run `batch` requests to their end; (forward_s, mask_s) of every step in which all
    `batch` sequences decode one token."""
    from kvray.workers.grammar_spec import GrammarSpec
    from kvray.workers.protocol import SamplingParams

    if constrained:
        spec = GrammarSpec.json_schema(TYPICAL_SCHEMA)
        params = SamplingParams(temperature=0, max_tokens=max_tokens, structured_output=spec)
    else:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for prompt in decode_prompts(batch):
        llm.add_request(prompt, params)
    steps = []

    def execute(step_input: Any) -> Any:
        out = llm.worker.step(step_input)
        if len(step_input.seq_ids) == batch and step_input.num_tokens == batch:
            steps.append((out.forward_s, out.mask_s))
        return out

    while llm.engine.has_unfinished():
        llm.engine.step(execute)
    return steps


def run_decode(args: argparse.Namespace) -> list[str]:
    from kvray.cluster.llm import LLM

    llm = LLM("smollm2", dtype=args.dtype, max_num_seqs=max(BATCHES), max_model_len=1024)
    log(f"decode: smollm2 in {llm.engine.info.dtype} on {llm.engine.info.device}")
    for constrained in (True, False):  # warm-up: the worker's compile, first-step costs
        run_batch(llm, 2, constrained, 8)
    steps: dict[tuple[int, bool], list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        for batch in BATCHES:
            for constrained in (True, False, False, True):  # ABBA: drift cancels
                got = run_batch(llm, batch, constrained, args.max_tokens)
                steps.setdefault((batch, constrained), []).extend(got)
                log(f"round {r + 1} batch {batch} {'constrained' if constrained else 'free'}: "
                    f"{len(got)} full decode steps")  # fmt: skip
    return print_decode(steps)


def print_decode(steps: dict[tuple[int, bool], list[tuple[float, float]]]) -> list[str]:
    print("\n## decode steps, constrained vs unconstrained (steps where the whole batch decodes)")
    print(f"{'batch':>5} {'mode':<13} {'steps':>6} {'step p50':>11} {'mask p50':>11} "
          f"{'per row':>10} {'mask share':>10} {'vs free':>9}")  # fmt: skip
    verdicts = []
    for batch in BATCHES:
        free = statistics.median(f for f, _ in steps[(batch, False)])
        for constrained in (False, True):
            rows = steps[(batch, constrained)]
            step = statistics.median(f for f, _ in rows)
            mask = statistics.median(m for _, m in rows)
            share = sum(m for _, m in rows) / sum(f for f, _ in rows)
            mode = "constrained" if constrained else "unconstrained"
            print(f"{batch:>5} {mode:<13} {len(rows):>6} {ms(step):>11} {ms(mask):>11} "
                  f"{ms(mask / batch):>10} {share:>10.1%} {step / free - 1:>+9.1%}")  # fmt: skip
            if constrained and batch == max(BATCHES):
                verdicts.append(
                    f"mask share of a decode step at batch {batch}: {share:.1%} "
                    f"(target <= {MASK_SHARE_TARGET:.0%}): {verdict(share <= MASK_SHARE_TARGET)}"
                )
    return verdicts


# -- 2. compile -------------------------------------------------------------------------------


def make_checker() -> Any:
    from transformers import AutoConfig

    from kvray.cluster.structured_output import GrammarChecker
    from kvray.cluster.tokenizer import load_tokenizer
    from kvray.workers.checkpoints import resolve_model

    path = resolve_model("smollm2")
    tokenizer = load_tokenizer(path)
    vocab_size = AutoConfig.from_pretrained(path).vocab_size
    return GrammarChecker(tokenizer, vocab_size=vocab_size, eos_token_ids=[tokenizer.eos_token_id])


def grammar_specs() -> list[Any]:
    from kvray.workers.grammar_spec import GrammarSpec

    return [GrammarSpec.json_schema(s, param="response_format") for s in SCHEMAS.values()]


def warm(checker: Any) -> float:
    """Build the checker's engine (the tokenizer index) with a regex; its seconds."""
    from kvray.workers.grammar_spec import GrammarSpec

    start = time.perf_counter()
    checker.check_sync(GrammarSpec("regex", "[a-z]+"))
    return time.perf_counter() - start


def run_compile(args: argparse.Namespace) -> list[str]:
    checker = make_checker()
    index_s = warm(checker)
    specs = grammar_specs()
    before = checker.stats.num_misses, checker.stats.num_hits
    times: dict[str, list[float]] = {"cold": [], "cached": []}
    for kind in times:
        for spec in specs:
            start = time.perf_counter()
            checker.check_sync(spec)
            times[kind].append(time.perf_counter() - start)
    compiles, hits = checker.stats.num_misses - before[0], checker.stats.num_hits - before[1]
    checker.close()
    print(f"\n## the router's GrammarChecker: {len(specs)} distinct schemas on smollm2")
    print(f"tokenizer index (once, first check): {ms(index_s)}")
    print(f"{'':<8} {'p50':>10} {'max':>10} {'total':>10}")
    for kind, t in times.items():
        print(f"{kind:<8} {ms(statistics.median(t)):>10} {ms(max(t)):>10} {ms(sum(t)):>10}")
    for name, t in zip(SCHEMAS, times["cold"]):
        print(f"  {name:<12} cold {ms(t)}")
    print(f"counters: {compiles} compiles, {hits} cache hits")
    ok = compiles == len(specs) and hits == len(specs)
    return [f"compiles {compiles}/{len(specs)} cold, cache hits {hits}/{len(specs)} again "
            f"(cold p50 {ms(statistics.median(times['cold']))}): "
            f"{'as expected' if ok else 'UNEXPECTED'}"]  # fmt: skip


# -- 3. stall ---------------------------------------------------------------------------------


def schema_variants(trial: int) -> list[dict[str, Any]]:
    """The 20 schemas, made new for `trial` (a description changes the spec, so each trial's
    schemas miss every cache)."""
    return [{**s, "description": f"trial {trial}"} for s in SCHEMAS.values()]


@dataclass
class Lags:
    """How late a probe that sleeps 1 ms woke up, over one window."""

    samples: list[float] = field(default_factory=list)

    @property
    def largest(self) -> float:
        return max(self.samples, default=0.0)

    def num_over(self, seconds: float) -> int:
        return sum(lag > seconds for lag in self.samples)


async def probe_lag(stop: threading.Event, lags: Lags, interval_s: float = 0.001) -> None:
    """Sleep `interval_s` until `stop`; record how late each wake-up is."""
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(interval_s)
        lags.samples.append(time.perf_counter() - start - interval_s)


async def watch(window: Any) -> Lags:
    """The loop's lags while `window` (a coroutine) runs."""
    stop, lags = threading.Event(), Lags()
    probe = asyncio.create_task(probe_lag(stop, lags))
    await window
    stop.set()
    await probe
    return lags


async def checker_trials(checker: Any, trials: int) -> tuple[list[Lags], list[Lags]]:
    """Per trial, the loop's lags idle and while 20 new schemas are checked at once (on the
    checker's threads, as the router does), each window as long as the checks take."""
    from kvray.workers.grammar_spec import GrammarSpec

    idle, busy = [], []
    for trial in range(trials):
        specs = [GrammarSpec.json_schema(s) for s in schema_variants(trial)]
        start = time.perf_counter()
        busy.append(await watch(asyncio.gather(*(checker.check(s) for s in specs))))
        elapsed = time.perf_counter() - start
        idle.append(await watch(asyncio.sleep(max(elapsed, 0.1))))
    return idle, busy


def send_requests(
    target: str, schemas: list[dict] | None, max_tokens: int, go: Any, out: mp.Queue
) -> None:
    """20 requests at once (one per schema, or free text), in a process of its own, once `go` is
    set; puts None on `out` when connected, then the requests' finish reasons."""
    from concurrent.futures import ThreadPoolExecutor

    from kvray.client import KvrayClient

    def send(i: int) -> str:
        # NOTE: free text ignores end of sequence so that it runs as long as the JSON does.
        kwargs = {"json_schema": schemas[i]} if schemas else {"ignore_eos": True}
        prompt = f"Describe item {i} in a few words."
        reply = client.generate(prompt, temperature=0, max_tokens=max_tokens, **kwargs)
        return reply.finish_reason or ""

    with KvrayClient(target, max_retries=0) as client:
        client.generate("hi", max_tokens=1)  # the connection is up
        with ThreadPoolExecutor(len(SCHEMAS)) as pool:
            out.put(None)
            go.wait()
            out.put(list(pool.map(send, range(len(SCHEMAS)))))


def keep_decoding(target: str, done: Any) -> None:
    """One long greedy stream until `done`: the cluster is running while requests arrive."""
    from kvray.client import KvrayClient

    with KvrayClient(target, max_retries=0) as client:
        for _ in client.stream("Once upon a time", temperature=0, max_tokens=1900, ignore_eos=True):
            if done.is_set():
                break


IDLE_LOAD = "one stream, nothing arriving"
CLUSTER_LOADS = (IDLE_LOAD, "no schema", "20 new schemas", "the same 20 again")


def cluster_load(cluster: Any, name: str, trial: int, max_tokens: int) -> tuple[Lags, str]:
    """The router loop's lags while one load's 20 requests arrive and run (or, for IDLE_LOAD,
    over 3 s of the background stream alone); what the router's compile counters say about it."""
    spawn = mp.get_context("spawn")  # NOTE: not fork: this process runs gRPC's threads
    if name == IDLE_LOAD:
        lags = asyncio.run_coroutine_threadsafe(watch(asyncio.sleep(3.0)), cluster.loop)
        return lags.result(timeout=60), "0 compiles, 0 hits"
    schemas = None if name == "no schema" else schema_variants(trial)

    def counters() -> tuple[int, int]:
        stats = cluster.run(lambda: cluster.router.processor.grammars.stats)
        return stats.num_misses, stats.num_hits

    # NOTE: the sender starts (a Python process importing gRPC) and connects before the window
    # opens: on two cores its start-up alone delays the loop by milliseconds
    go, out = spawn.Event(), spawn.Queue()
    args = (cluster.target, schemas, max_tokens, go, out)
    sender = spawn.Process(target=send_requests, args=args)
    sender.start()
    out.get(timeout=120)
    time.sleep(0.5)
    before = counters()
    stop, lags = threading.Event(), Lags()
    probe = asyncio.run_coroutine_threadsafe(probe_lag(stop, lags), cluster.loop)
    go.set()
    out.get(timeout=600)
    sender.join()
    stop.set()
    probe.result(timeout=10)
    after = counters()
    return lags, f"{after[0] - before[0]} compiles, {after[1] - before[1]} hits"


def cluster_trials(args: argparse.Namespace) -> dict[str, list[tuple[Lags, str]]]:
    import ray

    from kvray.client import KvrayClient
    from kvray.cluster.config import load
    from kvray.cluster.launcher import BackgroundCluster

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    settings = {"model": "smollm2", "replicas": 1, "max_model_len": 2048, "dtype": args.dtype}
    config = load({**settings, "host": "127.0.0.1", "port": 0, "http_port": 0}, environ={})
    spawn = mp.get_context("spawn")
    runs: dict[str, list[tuple[Lags, str]]] = {name: [] for name in CLUSTER_LOADS}
    with BackgroundCluster(config) as cluster:
        with KvrayClient(cluster.target) as client:  # the router's tokenizer index, built once
            client.wait_until_serving(timeout=300)
            client.generate("Say a word.", regex="[a-z]+", max_tokens=4)
        done = spawn.Event()
        streamer = spawn.Process(target=keep_decoding, args=(cluster.target, done))
        streamer.start()
        time.sleep(3.0)
        try:
            for trial in range(args.stall_trials):
                for name in CLUSTER_LOADS:
                    lags, counted = cluster_load(cluster, name, trial, args.stall_tokens)
                    runs[name].append((lags, counted))
                    log(f"trial {trial + 1}, {name}: largest lag {ms(lags.largest)} ({counted})")
        finally:
            done.set()
            streamer.join(timeout=60)
    return runs


def lag_row(name: str, windows: list[Lags], note: str = "") -> str:
    largest = [w.largest for w in windows]
    over = sum(w.num_over(STALL_TARGET_S) for w in windows)
    return (f"{name:<40} {ms(max(largest)):>10} {ms(statistics.median(largest)):>10} "
            f"{over:>6}  {note}")  # fmt: skip


def run_stall(args: argparse.Namespace) -> list[str]:
    checker = make_checker()
    warm(checker)
    idle, busy = asyncio.run(checker_trials(checker, args.stall_trials))
    checker.close()
    runs = cluster_trials(args)
    print(f"\n## the event loop's largest lag while 20 new schemas compile ({args.stall_trials} "
          "trials; a probe sleeps 1 ms and measures how late it wakes)")  # fmt: skip
    print(f"{'window':<40} {'max':>10} {'median':>10} {'>5 ms':>6}  (largest lag per trial)")
    print("a GrammarChecker on a loop of its own:")
    print(lag_row("  idle", idle))
    print(lag_row("  20 checks at once, new schemas", busy))
    print("a running smollm2 cluster's router loop, 20 requests arriving:")
    for name, windows in runs.items():
        counted = "; ".join(sorted({c for _, c in windows}))
        print(lag_row(f"  {name}", [w for w, _ in windows], counted))
    own = max(w.largest for w in busy)
    compiling = max(w.largest for w, _ in runs["20 new schemas"])
    plain = max(w.largest for w, _ in runs["no schema"])
    floor = max(w.largest for w, _ in runs[IDLE_LOAD])
    # NOTE: as bench/front_door.py measures a gap above idle: the cluster's loop lags by
    # milliseconds with no compile at all (its share of two cores, the VM's scheduling), so
    # what compiling adds is the lag over the same 20 requests without a schema.
    return [
        f"20 new schemas checked on a loop of their own: largest lag {ms(own)} (target <= "
        f"{ms(STALL_TARGET_S)}): {verdict(own <= STALL_TARGET_S)}",
        f"the cluster's loop while 20 new schemas compile: {ms(compiling)}, {ms(compiling - plain)}"
        f" over the same requests without a schema ({ms(plain)}; one stream alone {ms(floor)})"
        f" (target <= {ms(STALL_TARGET_S)} over): {verdict(compiling - plain <= STALL_TARGET_S)}",
    ]


# -- the run ----------------------------------------------------------------------------------

PARTS = {"decode": run_decode, "compile": run_compile, "stall": run_stall}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=(*PARTS, "all"), default="all")
    parser.add_argument("--dtype", default="auto", help="the worker's dtype (auto: the model's)")
    parser.add_argument("--rounds", type=int, default=1, help="ABBA rounds per batch size")
    parser.add_argument("--max-tokens", type=int, default=48, help="each decode request's")
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="this process's torch threads (0: torch's)"
    )
    parser.add_argument("--stall-tokens", type=int, default=16, help="each stall request's")
    parser.add_argument("--stall-trials", type=int, default=3, help="fresh schemas each trial")
    args = parser.parse_args()
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    verdicts = []
    for name, run in PARTS.items():
        if args.part in (name, "all"):
            verdicts += run(args)
    print("\n## targets")
    for line in verdicts:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
