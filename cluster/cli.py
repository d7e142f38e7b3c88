"""The `kvray` command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable

DEMO_QUESTIONS = [  # for chat models (the default, smollm2)
    "What is the capital of France?",
    "Name three colors.",
    "Write one sentence about the sea.",
]
DEMO_PROMPTS = [  # for models without a chat template (e.g. the random tiny ones)
    "The quick brown fox",
    "Once upon a time there was a little model that",
    "def fibonacci(n):",
]


def _make_tiny_model(args: argparse.Namespace) -> int:
    from kvray.workers.tiny_model import make_tiny_model

    out = make_tiny_model(args.out_dir, arch=args.arch, seed=args.seed)
    print(f"saved a tiny {args.arch} model to {out}")
    return 0


def _offline(args: argparse.Namespace) -> int:
    """Stream completions from the offline engine (one replica in this process, no Ray)."""
    from kvray import LLM, SamplingParams

    print(f"==> loading {args.model}", file=sys.stderr)
    llm = LLM(args.model)
    params = SamplingParams(
        temperature=args.temperature, seed=args.seed, max_tokens=args.max_tokens
    )
    start, num_tokens = time.perf_counter(), 0
    for chunk in llm.stream(args.prompt, params):
        print(_printable(chunk.text), end="", flush=True)
        num_tokens += len(chunk.token_ids)
    elapsed = time.perf_counter() - start
    print(f"\n[{num_tokens} tokens in {elapsed:.2f}s]", file=sys.stderr)
    return 0


def _printable(text: str) -> str:
    """Control characters (random models emit them) shown as U+FFFD, not sent to the terminal."""
    return "".join(c if c.isprintable() or c in "\n\t" else "\ufffd" for c in text)


def _serve(args: argparse.Namespace) -> int:
    """Start a cluster and serve gRPC until SIGTERM/SIGINT."""
    import asyncio

    from kvray.cluster import config as cluster_config
    from kvray.cluster.launcher import serve

    flags = {name: getattr(args, name) for name in cluster_config.settings()}
    if args.ray_serve:
        return _serve_with_ray_serve(flags, args.config)
    config = cluster_config.load(flags, config_file=args.config)
    asyncio.run(serve(config))
    return 0


def _serve_with_ray_serve(flags: dict, config_file: str | None) -> int:
    """Deploy `kvray.cluster.serve_app:app` through Ray Serve, as a RayService does, and block."""
    from ray import serve

    from kvray.cluster import config as cluster_config
    from kvray.cluster.launcher import init_ray
    from kvray.cluster.serve_app import app

    args = {k: v for k, v in flags.items() if v is not None}
    if config_file:
        args["config"] = config_file
    init_ray(cluster_config.load(flags, config_file=config_file))
    serve.run(app(args), name="kvray", route_prefix="/kvray", blocking=True)
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _demo(args: argparse.Namespace) -> int:
    """Start a local cluster (SmolLM2-135M-Instruct by default), stream answers through the
    gRPC client, stop. A chat model gets questions; any other model text to continue."""
    import signal
    import subprocess

    from kvray.client import KvrayClient

    port, http_port = _free_port(), _free_port()
    cmd = [sys.executable, "-m", "kvray.cluster.cli", "serve", "--model", args.model,
           "--replicas", str(args.replicas), "--port", str(port), "--http-port", str(http_port),
           "--host", "127.0.0.1"]  # fmt: skip
    print(f"==> starting a local cluster: {' '.join(cmd[2:])}", file=sys.stderr)
    server = subprocess.Popen(cmd)
    try:
        with KvrayClient(f"127.0.0.1:{port}") as client:
            client.wait_until_serving(timeout=600)
            print(
                f"==> serving on 127.0.0.1:{port} (gRPC) and http://127.0.0.1:{http_port}/v1 "
                "(OpenAI API); streaming through the gRPC client:",
                file=sys.stderr,
            )
            chat = client.model_info().has_chat_template
            for question in DEMO_QUESTIONS if chat else DEMO_PROMPTS:
                print(f"\n>>> {question}")
                prompt = [{"role": "user", "content": question}] if chat else question
                for chunk in client.stream(prompt, max_tokens=args.max_tokens,
                                           temperature=args.temperature, seed=args.seed):  # fmt: skip
                    print(_printable(chunk.text), end="", flush=True)
                print()
            status = client.status()
            print(f"\n==> {len(status.replicas)} replica(s): "
                  + ", ".join(f"{r.replica_id} {r.state} KV {r.kv_blocks_used}/{r.kv_blocks_total}"
                              for r in status.replicas), file=sys.stderr)  # fmt: skip
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    return 0


def _drain(args: argparse.Namespace) -> int:
    """Ask the router on this machine to stop as SIGTERM would, and wait until its streams are
    done (for a Kubernetes preStop hook)."""
    import json
    import ssl
    import urllib.error
    import urllib.request

    context = None
    if args.tls:
        # NOTE: the router on this machine, over loopback: its certificate names the Service,
        # not 127.0.0.1, so it is not verified. Under mutual TLS the router wants ours.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if args.tls_cert:
            context.load_cert_chain(args.tls_cert, args.tls_key)
    url = f"{'https' if args.tls else 'http'}://127.0.0.1:{args.http_port}/admin/drain"
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, method="POST"), timeout=args.timeout, context=context
        ) as r:
            print(json.load(r))
    except (urllib.error.URLError, OSError) as exc:
        print(f"kvray: no router to drain at {url} ({exc})", file=sys.stderr)
    return 0


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config key (`--max-num-seqs` for `max_num_seqs`), with the field's help.

    Values stay text: the config loader parses them as it parses `KVRAY_*` variables.
    """
    from kvray.cluster.config import settings

    for s in settings().values():
        default = "" if s.default is None else f" (default {s.default})"
        parser.add_argument(
            "--" + s.name.replace("_", "-"), dest=s.name, default=None, help=s.help + default
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvray", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny-model", help="build a random tiny model in Hugging Face format")
    p.add_argument("out_dir")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen2", "gpt2"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny_model)

    p = sub.add_parser("serve", help="start a cluster and serve gRPC")
    p.add_argument("--config", default=None, help="YAML file of settings (flags override it)")
    p.add_argument(
        "--ray-serve",
        action="store_true",
        help="run the router as the Ray Serve application kvray.cluster.serve_app:app (as on KubeRay)",
    )
    add_setting_flags(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("demo", help="start a local cluster and stream answers through gRPC")
    p.add_argument(
        "--model", default="smollm2", help="built-in name (smollm2, tiny), directory or hub id"
    )
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "drain", help="stop the router on this machine gracefully (a Kubernetes preStop hook)"
    )
    p.add_argument("--http-port", type=int, default=8000, help="the router's http_port")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for its streams")
    p.add_argument("--tls", action="store_true", help="the router serves HTTP over TLS")
    p.add_argument("--tls-cert", help="client certificate (PEM), when the router wants mutual TLS")
    p.add_argument("--tls-key", help="its private key (PEM)")
    p.set_defaults(func=_drain)

    p = sub.add_parser("offline", help="stream one completion from the in-process engine (no Ray)")
    p.add_argument("prompt")
    p.add_argument("--model", default="tiny", help="built-in name, local directory or hub id")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_offline)

    from kvray.client.cli import add_commands

    add_commands(sub)
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
