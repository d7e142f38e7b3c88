"""The `kvray` command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable

DEMO_PROMPTS = [
    "The quick brown fox",
    "Once upon a time there was a little model that",
    "def fibonacci(n):",
]


def _make_tiny_model(args: argparse.Namespace) -> int:
    from kvray.workers.tiny_model import make_tiny_model

    out = make_tiny_model(args.out_dir, arch=args.arch, seed=args.seed)
    print(f"saved a tiny {args.arch} model to {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Stream completions from the offline engine (one replica in this process)."""
    from kvray import LLM, SamplingParams

    print(f"==> loading {args.model}", file=sys.stderr)
    llm = LLM(args.model)
    params = SamplingParams(
        temperature=args.temperature, seed=args.seed, max_tokens=args.max_tokens
    )
    print(f"==> streaming {len(DEMO_PROMPTS)} prompts in one continuous batch", file=sys.stderr)
    texts = {i: "" for i in range(len(DEMO_PROMPTS))}
    start, num_tokens = time.perf_counter(), 0
    for chunk in llm.stream(DEMO_PROMPTS, params):
        i = int(chunk.request_id.rsplit("-", 1)[1]) % len(DEMO_PROMPTS)
        texts[i] += chunk.text
        num_tokens += len(chunk.token_ids)
        if i == 0:  # show the first prompt's stream live
            print(chunk.text, end="", flush=True)
    print()
    elapsed = time.perf_counter() - start
    for i, prompt in enumerate(DEMO_PROMPTS):
        print(f"\n[{i}] {prompt!r} -> {texts[i]!r}")
    print(
        f"\n{num_tokens} tokens in {elapsed:.2f}s ({num_tokens / elapsed:.0f} tokens/s)",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvray", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny-model", help="build a random tiny model in Hugging Face format")
    p.add_argument("out_dir")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen2", "gpt2"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny_model)

    p = sub.add_parser("demo", help="stream a few completions from the offline engine")
    p.add_argument("--model", default="tiny", help="built-in name, local directory or hub id")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ValueError as exc:
        print(f"kvray: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
