"""`kvray generate` and `kvray status`: the client side of the command line."""

from __future__ import annotations

import argparse
import sys
import time

from kvray.client.client import KvrayClient
from kvray.client.errors import KvrayError

DEFAULT_TARGET = "localhost:50051"


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream a completion from a kvray server")
    p.add_argument("prompt")
    p.add_argument("--target", default=DEFAULT_TARGET, help="server address (host:port)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.set_defaults(func=generate)

    p = sub.add_parser("status", help="print a kvray cluster's replicas and load")
    p.add_argument("--target", default=DEFAULT_TARGET, help="server address (host:port)")
    p.set_defaults(func=status)


def generate(args: argparse.Namespace) -> int:
    params = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "seed": args.seed,
        "stop": args.stop,
        "ignore_eos": args.ignore_eos or None,
    }
    try:
        with KvrayClient(args.target) as client:
            last = None
            for chunk in client.stream(args.prompt, timeout=args.timeout, **params):
                print(chunk.text, end="", flush=True)
                last = chunk
        print()
        if last is not None and last.finish_reason is not None:
            print(
                f"[{last.finish_reason}; {last.prompt_tokens} prompt + "
                f"{last.completion_tokens} completion tokens]",
                file=sys.stderr,
            )
    except KvrayError as exc:
        print(f"\nkvray: {exc.code}: {exc}", file=sys.stderr)
        return 1
    return 0


def status(args: argparse.Namespace) -> int:
    try:
        with KvrayClient(args.target) as client:
            st = client.status()
    except KvrayError as exc:
        print(f"kvray: {exc.code}: {exc}", file=sys.stderr)
        return 1
    print(
        f"{'replica':<12} {'state':<9} {'waiting':>7} {'running':>7} {'KV used':>15} {'preempt':>7}  device"
    )
    for r in st.replicas:
        kv = f"{r.kv_blocks_used}/{r.kv_blocks_total}"
        print(
            f"{r.replica_id:<12} {r.state:<9} {r.num_waiting:>7} {r.num_running:>7} {kv:>15} "
            f"{r.num_preemptions:>7}  {r.device}"
        )
    print(
        f"queue depth {st.queue_depth}, running {st.num_running}; requests moved after a failure"
        f" or drain {st.num_moved_requests}, queued requests rebalanced {st.num_rebalanced_requests}"
    )
    if st.min_replicas != st.max_replicas:
        print(
            f"autoscaling: [{st.min_replicas}, {st.max_replicas}] replicas, target {st.target_replicas}"
        )
        for d in st.recent_decisions[-5:]:
            when = time.strftime("%H:%M:%S", time.localtime(d.time_unix))
            print(f"  {when} {d.from_replicas} -> {d.to_replicas}: {d.reason}")
    return 0
