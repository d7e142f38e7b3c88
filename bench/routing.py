"""Routing benchmark: cache-aware routing against least-loaded, and least-loaded with a session
per conversation (stickiness), through the real router (in this process, on local Ray).

Workloads (seeded, deterministic request lists):
- multi-turn: conversations of 4-8 turns, interleaved; each turn is sent when the previous
  answer has arrived, and its prompt is the whole history plus a new user message.
- shared-system: K system prompts x M short questions, interleaved, at a steady rate.
- unique: prompts that share nothing, closed loop (throughput: cache-aware must cost nothing).

Back ends: 4 fake replicas (20 ms per step + 0.1 ms per token computed, about a 135M model on
a CPU; a KV cache that holds only some of the system prompts), then 2 replicas of `smollm2` on
CPU with chat prompts through its template (fewer requests). Per system and workload: the
prefix-cache hit rate (cached / prompt tokens, from each request's usage), the cached tokens,
their share of the ideal (every prompt token computed before, anywhere, served from one
cache: each system prompt and each conversation's history computed once), TTFT and output
tokens/s; then cache-aware / least-loaded, and the targets (judged on the full run only).

    python bench/routing.py              # fake part (~5 min), then smollm2 part (~4 min)
    python bench/routing.py --quick      # the fake part only, smaller (~3 min)
    python bench/routing.py --part real  # smollm2 only
    python bench/routing.py --part real --real-replicas 4 --workload multi-turn
    python bench/routing.py --part fake --shared-rate 32   # system prompts at an overload
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log
from load import percentile
from routing_workloads import (
    Conversation,
    Prompt,
    Turn,
    ideal_cached_tokens,
    make_prompt,
    multi_turn,
    prompt_ids,
    shared_system,
    unique_prompts,
)

SYSTEMS = {  # name -> (routing setting, send a session_id)
    "cache-aware": ("cache-aware", False),
    "least-loaded": ("least-loaded", False),
    "least-loaded+session": ("least-loaded", True),
}

# ---------------------------------------------------------------------- running a workload


@dataclass
class Answer:
    order: int  # position in the order sent
    prompt: Prompt  # as sent
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    ttft_s: float = float("nan")
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str = ""


async def run_workload(
    target: str, convs: list[Conversation], *, render: str, sticky: bool, concurrency: int | None
) -> tuple[list[Answer], float]:
    """Send every conversation's turns in order; returns the answers and the seconds taken."""
    from kvray.client import AsyncKvrayClient

    answers: list[Answer] = []
    order = itertools.count()
    gate = asyncio.Semaphore(concurrency) if concurrency else contextlib.nullcontext()
    start = time.perf_counter()
    async with AsyncKvrayClient(target) as client:

        async def ask(conv: Conversation, answer: Answer, max_tokens: int, sent: float) -> None:
            session = {"session_id": conv.session_id} if sticky else {}
            async for chunk in client.stream(
                answer.prompt, temperature=0, max_tokens=max_tokens, ignore_eos=True, **session
            ):
                if chunk.token_ids and not answer.token_ids:
                    answer.ttft_s = time.perf_counter() - sent
                answer.token_ids += chunk.token_ids
                answer.text += chunk.text
                if chunk.finish_reason is not None:
                    answer.prompt_tokens, answer.cached_tokens = (
                        chunk.prompt_tokens,
                        chunk.cached_tokens,
                    )

        async def converse(conv: Conversation) -> None:
            # NOTE: the first turn's TTFT counts from its scheduled time (open loop), so a late
            # sender does not hide queueing; later turns from the end of their pause.
            sent = start + conv.start_s
            await asyncio.sleep(max(0.0, sent - time.perf_counter()))
            history: list[Turn] = []
            for turn, max_tokens, pause in zip(conv.turns, conv.max_tokens, (0, *conv.think_s)):
                await asyncio.sleep(pause)
                sent += pause
                async with gate:  # a closed loop counts from when a slot came free
                    sent = time.perf_counter() if concurrency else sent
                    answer = Answer(next(order), make_prompt(conv, history, turn, render))
                    answers.append(answer)
                    try:
                        await ask(conv, answer, max_tokens, sent)
                    except Exception as exc:
                        answer.error = f"{type(exc).__name__}: {exc}"
                        return
                history.append((turn, answer.token_ids, answer.text))
                sent = time.perf_counter()

        await asyncio.gather(*(converse(c) for c in convs))
    return sorted(answers, key=lambda a: a.order), time.perf_counter() - start


# ---------------------------------------------------------------------- systems and results


@dataclass(frozen=True)
class Workload:
    name: str
    convs: list[Conversation]
    render: str  # make_prompt's
    about: str  # its shape, for the table's title
    concurrency: int | None = None  # a closed loop of this many; None: open loop (start_s)
    num_kv_blocks: int | None = None  # per replica (fake back end); None: the default


@dataclass
class Result:
    workload: str
    system: str
    answers: list[Answer]
    seconds: float
    ideal_tokens: int
    router_hit_rate: float  # the replicas' own counters (`ReplicaStats.num_prefix_hits`), summed
    num_preemptions: int
    decisions: dict[str, int]  # what decided each placement (`Placement.reason`)

    @property
    def ok(self) -> list[Answer]:
        return [a for a in self.answers if not a.error]

    @property
    def prompt_tokens(self) -> int:
        return sum(a.prompt_tokens for a in self.ok)

    @property
    def cached_tokens(self) -> int:
        return sum(a.cached_tokens for a in self.ok)

    @property
    def tokens_per_s(self) -> float:
        return sum(len(a.token_ids) for a in self.ok) / self.seconds

    def ttft_ms(self, p: float) -> float:
        return percentile([a.ttft_s for a in self.ok], p) * 1000


def wait_until_ready(cluster, num_replicas: int, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(r.is_ready for r in cluster.run(cluster.router.status).replicas) < num_replicas:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{num_replicas} replicas not ready after {timeout_s:.0f}s")
        time.sleep(0.2)


def run_system(settings: dict, system: str, workloads: list[Workload]) -> list[Result]:
    """One cluster with `system`'s routing (a fresh cache), the workloads one after another."""
    from kvray.cluster.config import load
    from kvray.cluster.launcher import BackgroundCluster

    routing, sticky = SYSTEMS[system]
    flags = {**settings, "routing": routing, "host": "127.0.0.1", "port": 0, "http_port": 0}
    if workloads[0].num_kv_blocks:
        flags["num_kv_blocks"] = workloads[0].num_kv_blocks
    results = []
    with BackgroundCluster(load(flags, environ={})) as cluster:
        wait_until_ready(cluster, flags["replicas"])
        router = cluster.router
        tokenizer, block_size = router.tokenizer, cluster.run(lambda: router.info.block_size)
        for w in workloads:
            before = cluster.run(router.status)
            answers, seconds = asyncio.run(
                run_workload(
                    cluster.target,
                    w.convs,
                    render=w.render,
                    sticky=sticky,
                    concurrency=w.concurrency,
                )
            )
            after = cluster.run(router.status)
            sent = [(prompt_ids(a.prompt, tokenizer), a.token_ids) for a in answers]
            mismatched = sum(len(p) != a.prompt_tokens for (p, _), a in zip(sent, answers))
            if mismatched:
                log(f"{mismatched} prompts rendered here differ in length from the router's")
            decisions = {
                k: v - before.num_routing_decisions.get(k, 0)
                for k, v in after.num_routing_decisions.items()
            }
            queries = after.num_prefix_queries - before.num_prefix_queries
            hits = after.num_prefix_hits - before.num_prefix_hits
            results.append(
                Result(
                    w.name,
                    system,
                    answers,
                    seconds,
                    ideal_cached_tokens(sent, block_size),
                    hits / max(1, queries),
                    after.num_preemptions - before.num_preemptions,
                    decisions,
                )
            )
            r = results[-1]
            log(
                f"{w.name} / {system}: {len(r.ok)}/{len(answers)} ok in {seconds:.1f}s, "
                f"hit rate {r.cached_tokens / max(1, r.prompt_tokens):.1%}"
            )
    return results


# ---------------------------------------------------------------------- report


def print_table(title: str, results: list[Result]) -> None:
    print(f"\n## {title}")
    print(
        f"{'system':<22} {'hit rate':>8} {'(router)':>8} {'cached tok':>11} {'of ideal':>8} "
        f"{'TTFT p50':>9} {'p90':>8} {'out tok/s':>9} {'failed':>6} {'preempt':>7}  placements"
    )
    for r in results:
        hit = r.cached_tokens / max(1, r.prompt_tokens)
        ideal = f"{r.cached_tokens / r.ideal_tokens:.1%}" if r.ideal_tokens else "-"
        placed = ", ".join(f"{k} {v}" for k, v in sorted(r.decisions.items()) if v)
        print(
            f"{r.system:<22} {hit:>8.1%} {r.router_hit_rate:>8.1%} {r.cached_tokens:>11,} "
            f"{ideal:>8} {r.ttft_ms(50):>6.0f} ms {r.ttft_ms(90):>5.0f} ms "
            f"{r.tokens_per_s:>9.1f} {len(r.answers) - len(r.ok):>6} {r.num_preemptions:>7}  "
            f"{placed}"
        )
    ideal = results[0].ideal_tokens
    print(f"ideal (every prompt token computed before served from one cache): {ideal:,} cached")


def print_ratios(results: list[Result], *, judge: bool) -> None:
    """cache-aware / least-loaded, and the targets where `judge` (the full run)."""
    by = {r.system: r for r in results}
    ca, ll = by["cache-aware"], by["least-loaded"]
    cached = ca.cached_tokens / max(1, ll.cached_tokens)
    speed = ca.tokens_per_s / ll.tokens_per_s
    print(
        f"cache-aware / least-loaded: cached tokens {cached:.2f}x, "
        f"TTFT p50 {ca.ttft_ms(50) / ll.ttft_ms(50):.2f}x, p90 {ca.ttft_ms(90) / ll.ttft_ms(90):.2f}x, "
        f"throughput {speed:.2f}x"
    )
    if not judge:
        return
    verdict = lambda ok: "MEETS" if ok else "MISSES"  # noqa: E731
    if ca.workload.startswith("unique"):
        print(f"target throughput >= 0.95x least-loaded: {speed:.2f}x ({verdict(speed >= 0.95)})")
        return
    of_ideal = ca.cached_tokens / max(1, ca.ideal_tokens)
    p90, ll_p90 = ca.ttft_ms(90), ll.ttft_ms(90)
    bound = ca.ideal_tokens / max(1, ll.cached_tokens)
    print(
        f"target cached tokens >= 1.5x least-loaded: {cached:.2f}x ({verdict(cached >= 1.5)})"
        + (f"; at most {bound:.2f}x here (the ideal / least-loaded's)" if bound < 1.5 else "")
    )
    print(f"target cached tokens >= 90% of ideal: {of_ideal:.1%} ({verdict(of_ideal >= 0.9)})")
    print(
        f"target TTFT p90 below least-loaded's: {p90:.0f} vs {ll_p90:.0f} ms "
        f"({verdict(p90 < ll_p90)})"
    )


# ---------------------------------------------------------------------- the two back ends

FAKE = {
    "model": "fake",
    "replicas": 4,
    "fake_step_ms": 20,
    "fake_token_ms": 0.1,
    "max_model_len": 4096,
    "cpus_per_replica": 1,
}
SHARED_RATE = 16.0  # requests/s of the fake shared-system workload: busy, not overloaded
# As on the fake replicas, a KV cache that holds only some of the prompts (128 blocks, the
# least that holds one 2,048-token sequence), so where a prompt lands decides what stays cached
REAL = {
    "model": "smollm2",
    "replicas": 2,
    "max_model_len": 2048,
    "cpus_per_replica": 1,
    "num_kv_blocks": 128,
}


def fake_workloads(*, quick: bool, seed: int, shared_rate: float = SHARED_RATE) -> list[Workload]:
    """Caches that hold a fraction of what is shared, which a replica holds whole only when
    routing keeps it there (blocks of 16 tokens): 1,024 blocks against 48 chats' histories
    (~60 blocks each, ~40 chats open at once); 384 blocks, 6 of 16 system prompts (64 each)."""
    convs, chat_blocks, systems, questions, unique = (
        (16, 384, 8, 6, 64) if quick else (48, 1024, 16, 12, 256)
    )
    return [
        Workload(
            "multi-turn",
            multi_turn(convs, seed=seed, rate=4.0),
            "tokens",
            about=f"{convs} chats of 4-8 turns (first message 128-384 tokens, then 16-96; "
            f"answers 32-96) starting at 4/s, 1-3 s pauses; {chat_blocks} KV blocks a replica",
            num_kv_blocks=chat_blocks,
        ),
        Workload(
            "shared-system",
            shared_system(systems, questions, seed=seed, rate=shared_rate),
            "tokens",
            about=f"{systems} system prompts of 1,024 tokens x {questions} questions of 16-48 "
            f"(answers 32) at {shared_rate:g} req/s; {systems * 24} KV blocks a replica",
            num_kv_blocks=systems * 24,
        ),
        Workload(
            "unique",
            unique_prompts(unique, seed=seed),
            "tokens",
            concurrency=32,
            about=f"{unique} prompts of 128-512 tokens (answers 32-128), 32 at a time",
            num_kv_blocks=1024,
        ),
    ]


def real_workloads(*, seed: int, chats: int = 12, chat_rate: float = 1.0) -> list[Workload]:
    """Fewer, shorter requests (2 CPU cores); pieces become words (about a token each)."""
    convs = multi_turn(
        chats,
        seed=seed,
        rate=chat_rate,
        first=(48, 96),
        later=(8, 24),
        answer=(16, 16),
        think=(0.5, 1.5),
    )
    shared = shared_system(8, 4, seed=seed, rate=1.0, system_len=256, question=(6, 12), answer=16)
    return [
        Workload(
            "multi-turn",
            convs,
            "chat",
            about=f"{chats} chats of 4-8 turns starting at {chat_rate:g}/s, 0.5-1.5 s pauses",
        ),
        Workload(
            "shared-system",
            shared,
            "chat",
            about="8 system prompts of 256 words x 4 questions at 1 req/s; 128 KV blocks a "
            "replica (2,048 tokens: about 5 of the system prompts)",
        ),
        Workload(
            "unique",
            unique_prompts(12, seed=seed, prompt=(96, 160), answer=(16, 16)),
            "text",
            concurrency=4,
            about="12 text prompts of 96-160 words, 4 at a time",
        ),
    ]


def systems_for(workload: Workload) -> list[str]:
    # sessions of single requests with nothing to share change nothing: not run
    return [s for s in SYSTEMS if not (workload.name == "unique" and SYSTEMS[s][1])]


def run_fake(*, quick: bool, seed: int, shared_rate: float) -> None:
    for w in fake_workloads(quick=quick, seed=seed, shared_rate=shared_rate):
        results = [r for s in systems_for(w) for r in run_system(FAKE, s, [w])]
        print_table(f"{w.name}, 4 fake replicas (20 ms/step + 0.1 ms/token): {w.about}", results)
        print_ratios(results, judge=not quick and shared_rate == SHARED_RATE)


def run_real(*, seed: int, replicas: int, only: str | None, chats: int, chat_rate: float) -> None:
    workloads = [
        w
        for w in real_workloads(seed=seed, chats=chats, chat_rate=chat_rate)
        if only in (None, w.name)
    ]
    settings = {**REAL, "replicas": replicas}
    runs = [run_system(settings, s, [w for w in workloads if s in systems_for(w)]) for s in SYSTEMS]
    for w in workloads:
        results = [r for run in runs for r in run if r.workload == w.name]
        print_table(
            f"{w.name}, {replicas} smollm2 replicas (CPU, 1 thread each): {w.about}", results
        )
        print_ratios(results, judge=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("all", "fake", "real"), default="all")
    parser.add_argument("--quick", action="store_true", help="the fake part only, smaller")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shared-rate",
        type=float,
        default=SHARED_RATE,
        help="requests/s of the fake shared-system workload (targets are judged at the default)",
    )
    parser.add_argument(
        "--real-replicas",
        type=int,
        default=REAL["replicas"],
        help="smollm2 replicas of the real part (each a Ray CPU and one torch thread)",
    )
    parser.add_argument(
        "--workload",
        choices=("multi-turn", "shared-system", "unique"),
        help="run only this workload of the real part",
    )
    parser.add_argument("--chats", type=int, default=12, help="conversations of the real part")
    parser.add_argument(
        "--chat-rate", type=float, default=1.0, help="conversations started per second (real part)"
    )
    args = parser.parse_args()
    import ray

    logging.basicConfig(level=logging.WARNING)
    num_cpus = max(4, args.real_replicas * int(REAL["cpus_per_replica"]))
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    if args.part in ("all", "fake"):
        run_fake(quick=args.quick, seed=args.seed, shared_rate=args.shared_rate)
    if args.part in ("all", "real") and not args.quick:
        run_real(
            seed=args.seed,
            replicas=args.real_replicas,
            only=args.workload,
            chats=args.chats,
            chat_rate=args.chat_rate,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
