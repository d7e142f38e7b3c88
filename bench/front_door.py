"""Does one huge prompt stall everyone else? A stream's largest gap between two chunks while
other clients send the largest prompts kvray accepts (MAX_CHARS_PER_TOKEN characters per token
of context, then refused as too many tokens), with those prompts tokenized on the router's
input thread (as kvray does) and, for comparison, on its event loop.

    python bench/front_door.py                  # the fake model: steady 20 ms steps, 8,192 tokens
    python bench/front_door.py --model smollm2  # a real model (on 2 cores, steps vary more)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log


def _load(target: str, prompt_chars: int, count: int, out: mp.Queue) -> None:
    """In its own process: send `count` maximal prompts, one after another."""
    from kvray.client import KvrayClient

    text = ("The quick brown fox jumps over the lazy dog. " * (prompt_chars // 45 + 1))[
        :prompt_chars
    ]
    with KvrayClient(target, max_retries=0) as client:
        for _ in range(count):
            try:
                client.generate(text, max_tokens=1)
            except Exception as exc:  # refused: too many tokens for the context
                out.put(type(exc).__name__)


def _watch(target: str, out: mp.Queue) -> None:
    """In its own process: one long greedy stream; report its largest gap between chunks."""
    from kvray.client import KvrayClient

    with KvrayClient(target, max_retries=0) as client:
        last, gaps = None, []
        for _ in client.stream("Once upon a time", temperature=0, max_tokens=400, ignore_eos=True):
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
    out.put(max(gaps))


def measure(target: str, prompt_chars: int, count: int = 5) -> tuple[float, list[str]]:
    out: mp.Queue = mp.Queue()
    watcher = mp.Process(target=_watch, args=(target, out))
    loader = mp.Process(target=_load, args=(target, prompt_chars, count, out))
    watcher.start()
    time.sleep(0.5)
    loader.start()
    loader.join()
    watcher.join()
    results = [out.get() for _ in range(out.qsize())]
    gap = next(r for r in results if isinstance(r, float))
    return gap, [r for r in results if isinstance(r, str)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="fake")
    parser.add_argument("--max-model-len", type=int, default=8192)
    args = parser.parse_args()
    import ray

    from kvray.cluster import input_processor
    from kvray.cluster.config import load
    from kvray.cluster.launcher import BackgroundCluster

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    settings = {"model": args.model, "max_model_len": args.max_model_len, "fake_step_ms": 20}
    config = load({**settings, "host": "127.0.0.1", "port": 0, "http_port": 0}, environ={})
    with BackgroundCluster(config) as cluster:
        max_len = cluster.run(lambda: cluster.router.info.max_model_len)
        chars = input_processor.MAX_CHARS_PER_TOKEN * max_len
        log(f"{args.model}: context {max_len} tokens, the largest prompt {chars} characters")
        rows = []
        for mode, inline, count in (
            ("no large prompt (baseline)", 4096, 0),
            ("tokenized on the input thread", 4096, 5),
            ("tokenized on the event loop", 10**12, 5),
            ("no large prompt (baseline)", 4096, 0),
            ("tokenized on the input thread", 4096, 5),
            ("tokenized on the event loop", 10**12, 5),
        ):
            input_processor.INLINE_CHARS = inline
            gap, refused = measure(cluster.target, chars, count)
            rows.append((mode, gap))
            log(f"{mode}: largest gap {gap * 1000:.0f} ms ({len(refused)} prompts refused)")
    print(
        f"\n## a stream's largest gap between chunks while 5 prompts of {chars} characters arrive"
    )
    for mode, gap in rows:
        print(f"{mode:<30}: {gap * 1000:7.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
