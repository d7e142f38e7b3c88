"""Does one client's input stall everyone else? A watched stream's largest gap between two chunks
while other clients send, in turn:

- the largest text prompts kvray accepts (MAX_CHARS_PER_TOKEN characters per token of context,
  then refused as too many tokens), tokenized on the input pool (as kvray does) and, for
  comparison, on the event loop;
- 5 conversations with a 1 MiB role; 5 of 2,047 messages; 5 of 1,024 (the most accepted,
  rendered with the chat template);
- 100 large Tokenize calls at once, and one unrelated 5,000-character Tokenize call among them,
  whose latency is reported next to its latency alone.

Each gap is judged against the gap with no load (target: at most 50 ms above it). The router runs
in this process, so its RSS growth per load is reported too.

    python bench/front_door.py                  # the fake model: steady 20 ms steps, 8,192 tokens
    python bench/front_door.py --model smollm2  # a real model (on 2 cores, steps vary more)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log

TARGET_ABOVE_IDLE_S = 0.050
SMALL_CHARS = 5_000  # the unrelated request of the Tokenize load


def _text(chars: int) -> str:
    return ("The quick brown fox jumps over the lazy dog. " * (chars // 45 + 1))[:chars]


# ---------------------------------------------------------------------- loads (own processes)


def _send_all(target: str, prompts: list, out: mp.Queue) -> None:
    """Send every prompt at once (max_tokens=1); report how many were refused."""
    from kvray.client import KvrayClient

    def send(prompt) -> str | None:
        try:
            client.generate(prompt, max_tokens=1)
        except Exception as exc:  # refused: a bound, or too many tokens for the context
            return type(exc).__name__
        return None

    with KvrayClient(target, max_retries=0) as client, ThreadPoolExecutor(len(prompts)) as pool:
        refused = [r for r in pool.map(send, prompts) if r is not None]
    out.put(("refused", len(refused)))


def load_prompts(target: str, chars: int, count: int, out: mp.Queue) -> None:
    """`count` maximal text prompts, one after another."""
    for _ in range(count):
        _send_all(target, [_text(chars)], out)


def load_chats(target: str, role_chars: int, num_messages: int, count: int, out: mp.Queue) -> None:
    """`count` conversations at once: `num_messages` turns of two characters (few enough that
    no text bound applies), the first one's role `role_chars` long when that is given."""
    turns = [{"role": ("user", "assistant")[i % 2], "content": "hi"} for i in range(num_messages)]
    if role_chars:
        turns[0] = {"role": "x" * role_chars, "content": "hi"}
    _send_all(target, [turns] * count, out)


def load_tokenize(target: str, chars: int, count: int, out: mp.Queue) -> None:
    """`count` Tokenize calls of `chars` characters at once, and 0.2 s later an unrelated one of
    SMALL_CHARS: report its latency."""
    import asyncio

    from kvray.client import AsyncKvrayClient

    async def run() -> float:
        async with AsyncKvrayClient(target, max_retries=0) as client:
            await client.tokenize(_text(SMALL_CHARS))  # the connection is up
            large = [asyncio.create_task(client.tokenize(_text(chars))) for _ in range(count)]
            await asyncio.sleep(0.2)
            start = time.perf_counter()
            await client.tokenize(_text(SMALL_CHARS))
            latency = time.perf_counter() - start
            await asyncio.gather(*large, return_exceptions=True)
            return latency

    out.put(("small_s", asyncio.run(run())))


def load_small_alone(target: str, out: mp.Queue) -> None:
    from kvray.client import KvrayClient

    with KvrayClient(target, max_retries=0) as client:
        client.tokenize(_text(SMALL_CHARS))
        start = time.perf_counter()
        client.tokenize(_text(SMALL_CHARS))
        out.put(("small_s", time.perf_counter() - start))
        time.sleep(1.0)


def _watch(target: str, streaming: Any, done: Any, out: mp.Queue) -> None:
    """One long greedy stream, until the load is done; report its largest gap between chunks."""
    from kvray.client import KvrayClient

    with KvrayClient(target, max_retries=0) as client:
        last, gaps, after_done = None, [], 0
        for _ in client.stream("Once upon a time", temperature=0, max_tokens=4000, ignore_eos=True):
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
                streaming.set()
            last = now
            after_done += done.is_set()
            if after_done > 10:  # a few chunks past the load's end
                break
    out.put(("gap_s", max(gaps)))


def measure(target: str, load: Callable[..., None], *args: object) -> dict:
    """The watched stream's largest gap while `load(target, *args, out)` runs, and what the
    load reports."""
    import psutil

    rss = psutil.Process().memory_info().rss
    spawn = mp.get_context("spawn")  # NOTE: not fork: this process runs gRPC's threads
    out = spawn.Queue()
    streaming, done = spawn.Event(), spawn.Event()
    watcher = spawn.Process(target=_watch, args=(target, streaming, done, out))
    loader = spawn.Process(target=load, args=(target, *args, out))
    watcher.start()
    streaming.wait(timeout=60)
    loader.start()
    loader.join()
    done.set()
    watcher.join()
    results: dict = {"refused": 0}
    while not out.empty():
        key, value = out.get()
        results[key] = results.get(key, 0) + value if key == "refused" else value
    results["rss_mib"] = (psutil.Process().memory_info().rss - rss) / 2**20
    return results


# ---------------------------------------------------------------------- the run


def run_prompts(cluster, chars: int) -> list[tuple[str, float]]:
    """The first table: maximal text prompts on the input pool and on the event loop."""
    from kvray.cluster import input_processor

    rows = []
    for mode, inline, count in (
        ("no large prompt (baseline)", 4096, 0),
        ("tokenized on the input pool", 4096, 5),
        ("tokenized on the event loop", 10**12, 5),
    ) * 2:
        input_processor.INLINE_CHARS = inline
        result = measure(cluster.target, load_prompts, chars, count)
        rows.append((mode, result["gap_s"]))
        log(f"{mode}: largest gap {result['gap_s'] * 1000:.0f} ms ({result['refused']} refused)")
    input_processor.INLINE_CHARS = 4096
    return rows


def run_attacks(cluster, tokenize_chars: int) -> list[tuple[str, dict]]:
    """The second table: each load against the gap with none."""
    loads: list[tuple[str, Callable[..., None], tuple]] = [
        ("idle (a 5,000-char Tokenize alone)", load_small_alone, ()),
        ("5 x 1 MiB chat roles", load_chats, (2**20, 2, 5)),
        ("5 x 2,047-message chats", load_chats, (0, 2047, 5)),
        ("5 x 1,024-message chats (rendered)", load_chats, (0, 1024, 5)),
        (
            f"100 x {tokenize_chars:,}-char Tokenize + one 5,000",
            load_tokenize,
            (tokenize_chars, 100),
        ),
    ]
    rows = []
    for name, load, args in loads:
        result = measure(cluster.target, load, *args)
        rows.append((name, result))
        log(f"{name}: {result}")
    return rows


def print_attacks(rows: list[tuple[str, dict]]) -> None:
    idle = rows[0][1]
    print("\n## a stream's largest gap between chunks while each load arrives")
    print(f"{'load':<42} {'gap':>8} {'above idle':>11} {'refused':>8} {'RSS':>8}  5,000-char call")
    for name, r in rows:
        above = r["gap_s"] - idle["gap_s"]
        verdict = "" if r is idle else (" ok" if above <= TARGET_ABOVE_IDLE_S else " MISSES")
        small = f"{r['small_s'] * 1000:.1f} ms" if "small_s" in r else ""
        print(
            f"{name:<42} {r['gap_s'] * 1000:6.1f}ms {above * 1000:8.1f}ms{verdict:<3}"
            f" {r['refused']:>6} {r['rss_mib']:+6.0f}MiB  {small}"
        )
    print(f"(target: each gap at most {TARGET_ABOVE_IDLE_S * 1000:.0f} ms above idle)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="fake")
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument(
        "--tokenize-chars", type=int, default=32_768, help="each large Tokenize call's text"
    )
    parser.add_argument("--skip-prompts", action="store_true", help="only the second table")
    args = parser.parse_args()
    import ray

    from kvray.cluster import input_processor
    from kvray.cluster.config import load
    from kvray.cluster.launcher import BackgroundCluster
    from kvray.workers.tiny_model import CHAT_TEMPLATE

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    settings = {"model": args.model, "max_model_len": args.max_model_len, "fake_step_ms": 20}
    config = load({**settings, "host": "127.0.0.1", "port": 0, "http_port": 0}, environ={})
    with BackgroundCluster(config) as cluster:
        tokenizer = cluster.run(lambda: cluster.router.tokenizer)
        if not getattr(tokenizer, "chat_template", None):  # the fake model's: the tiny models'
            cluster.run(lambda: setattr(tokenizer, "chat_template", CHAT_TEMPLATE))
        max_len = cluster.run(lambda: cluster.router.info.max_model_len)
        chars = input_processor.MAX_CHARS_PER_TOKEN * max_len
        log(f"{args.model}: context {max_len} tokens, the largest prompt {chars} characters")
        prompt_rows = [] if args.skip_prompts else run_prompts(cluster, chars)
        attack_rows = run_attacks(cluster, args.tokenize_chars)
    if prompt_rows:
        print(
            f"\n## a stream's largest gap between chunks while 5 prompts of {chars} characters arrive"
        )
        for mode, gap in prompt_rows:
            print(f"{mode:<30}: {gap * 1000:7.1f} ms")
    print_attacks(attack_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
