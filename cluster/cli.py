"""kvray serves language models from a cluster of Ray actors, over gRPC and an
OpenAI-compatible HTTP API. `kvray COMMAND --help` describes each command."""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvray.client.cli import HelpFormatter

if TYPE_CHECKING:
    from kvray.client import KvrayClient
    from kvray.client.types import ClusterStatus

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
# In the demo server's log: a line worth a look, an error (a record or an exception's message)
_PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|^Traceback")
_ERROR = re.compile(r"^\S+ \S+ (ERROR|CRITICAL) |^[\w.]*(Error|Exception): ")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


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
    gRPC client, stop. A chat model gets questions; any other model text to continue.

    The server runs in a child process whose output (its log, Ray's, the replicas') goes to a
    file, so nothing lands between the answers; its errors are shown if it fails."""
    import tempfile

    from kvray.client import KvrayClient
    from kvray.client.errors import KvrayError

    port, http_port = _free_port(), _free_port()
    cmd = [sys.executable, "-m", "kvray.cluster.cli", "serve", "--model", args.model,
           "--replicas", str(args.replicas), "--port", str(port), "--http-port", str(http_port),
           "--host", "127.0.0.1"]  # fmt: skip
    fd, log = tempfile.mkstemp(prefix="kvray-demo-", suffix=".log")
    print(
        f"==> starting a local cluster: kvray {' '.join(cmd[3:])} (its log: {log})", file=sys.stderr
    )
    with open(fd, "w") as log_file:
        server = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        with KvrayClient(f"127.0.0.1:{port}") as client:
            ready = _wait_until_ready(client, server, args.replicas)
            devices = ", ".join(sorted({r.device for r in ready.replicas}))
            print(
                f"==> {args.model} on {len(ready.replicas)} replica(s) ({devices}), serving on "
                f"127.0.0.1:{port} (gRPC) and http://127.0.0.1:{http_port}/v1 (OpenAI API); "
                "streaming through the gRPC client:",
                file=sys.stderr,
            )
            _stream_answers(client, args)
            status = client.status()
            print(f"\n==> {len(status.replicas)} replica(s): "
                  + ", ".join(f"{r.replica_id} {r.state} KV {r.kv_blocks_used}/{r.kv_blocks_total}"
                              for r in status.replicas), file=sys.stderr)  # fmt: skip
    except (KvrayError, RuntimeError) as exc:
        print(f"\nkvray: error: {exc}\n==> the server's log ({log}) says:", file=sys.stderr)
        print(_errors_in(log), file=sys.stderr)
        return 1
    finally:
        _stop(server)
    problems = _count_problems(log)
    if problems:
        print(
            f"==> the server logged {problems} warning(s) or error(s): see {log}", file=sys.stderr
        )
    return 0


def _wait_until_ready(
    client: KvrayClient, server: subprocess.Popen[bytes], num_replicas: int, timeout: float = 600
) -> ClusterStatus:
    """Wait until `num_replicas` replicas are READY, so every replica's start (and its log) is
    over before the first answer streams. Returns the cluster's status then.

    Raises:
        RuntimeError: the server exited, or `timeout` seconds passed.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited (code {server.returncode}) before it was ready")
        if client.is_serving(timeout=2):
            status = client.status()
            if sum(r.state == "READY" for r in status.replicas) >= num_replicas:
                return status
        time.sleep(0.5)
    raise RuntimeError(f"{num_replicas} replica(s) were not ready after {timeout:.0f}s")


def _stream_answers(client: KvrayClient, args: argparse.Namespace) -> None:
    chat = client.model_info().has_chat_template
    for question in DEMO_QUESTIONS if chat else DEMO_PROMPTS:
        print(f"\n>>> {question}", flush=True)
        prompt = [{"role": "user", "content": question}] if chat else question
        for chunk in client.stream(prompt, max_tokens=args.max_tokens,
                                   temperature=args.temperature, seed=args.seed):  # fmt: skip
            print(_printable(chunk.text), end="", flush=True)
        print(flush=True)


def _stop(server: subprocess.Popen[bytes]) -> None:
    import signal

    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _errors_in(path: str, num_lines: int = 10) -> str:
    """The server log's last error records and exception messages, once each (Ray repeats a
    replica's traceback); its last lines when it has none."""
    with open(path, errors="replace") as f:
        lines = [_ANSI.sub("", line.rstrip()) for line in f]
    errors = dict.fromkeys(line for line in lines if _ERROR.search(line))
    return "\n".join(list(errors)[-num_lines:] or lines[-num_lines:])


def _count_problems(path: str) -> int:
    """Lines of the server's log at WARNING or above (kvray's and Ray's), and tracebacks."""
    with open(path, errors="replace") as f:
        return sum(bool(_PROBLEM.search(line)) for line in f)


def _drain(args: argparse.Namespace) -> int:
    """Ask the router on this machine to stop as SIGTERM would, and wait until its streams are
    done (for a Kubernetes preStop hook). 0 once it has drained, 1 if no router answered."""
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
            answer = json.load(r)
    except urllib.error.HTTPError as exc:
        print(f"kvray: the router at {url} refused to drain: HTTP {exc.code}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"kvray: no router to drain at {url} ({exc})", file=sys.stderr)
        return 1
    print(json.dumps(answer) if args.json else drain_summary(answer, args.http_port))
    return 0


def drain_summary(answer: dict[str, Any], http_port: int) -> str:
    """One sentence for `POST /admin/drain`'s answer."""
    where = f"drained the router on port {http_port}"
    num_streams, num_ended = answer.get("num_streams"), answer.get("num_ended")
    if num_streams is None or num_ended is None:
        return where
    if num_streams == 0:
        return f"{where}: no stream was running"
    finished = num_streams - num_ended
    ended = f"; {num_ended} ended at shutdown_timeout_s" if num_ended else ""
    return f"{where}: {num_streams} stream(s) were running, {finished} finished{ended}"


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config key (`--max-num-seqs` for `max_num_seqs`), with the field's help;
    a bool key is a switch pair (`--enable-prefix-caching` / `--no-enable-prefix-caching`).

    Flags left out stay None, so the YAML file and `KVRAY_*` variables below them still count.
    Other values stay text: the config loader parses them as it parses `KVRAY_*` variables.
    """
    from kvray.cluster.config import settings

    for s in settings().values():
        flag = "--" + s.name.replace("_", "-")
        text = s.help.replace("%", "%%")
        if s.default is not None:
            text += f" (default: {str(s.default).lower() if s.hint is bool else s.default})"
        if s.hint is bool:
            parser.add_argument(
                flag, dest=s.name, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        else:
            parser.add_argument(flag, dest=s.name, default=None, help=text)


def _add_parser(sub: Any, name: str, about: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand: `about` is its line in `kvray --help` and opens its own `--help`."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=about,
        description=f"{about[0].upper()}{about[1:]}.",
        formatter_class=HelpFormatter,
        **kwargs,
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    from kvray.client.cli import add_commands

    parser = argparse.ArgumentParser(
        prog="kvray", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")

    p = _add_parser(sub, "serve", "start a cluster and serve gRPC and the OpenAI HTTP API")
    p.add_argument("--config", default=None, help="YAML file of settings (flags override it)")
    p.add_argument(
        "--ray-serve",
        action="store_true",
        help="run the router as the Ray Serve application kvray.cluster.serve_app:app (as on KubeRay)",
    )
    add_setting_flags(p)
    p.set_defaults(func=_serve)

    add_commands(sub)  # generate, status

    p = _add_parser(sub, "demo", "start a local cluster, stream a few answers through gRPC, stop")
    p.add_argument(
        "--model",
        default="smollm2",
        help="built-in name (smollm2: a real chat model; tiny: random, no download), "
        "local directory, hub id or .gguf file",
    )
    p.add_argument("--replicas", type=int, default=2, help="worker actors to start")
    _add_sampling_flags(p, max_tokens=64, temperature=0.0)
    p.set_defaults(func=_demo)

    p = _add_parser(
        sub, "offline", "stream one completion from an engine in this process (no Ray, no server)"
    )
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--model", default="tiny", help="built-in name, local directory or hub id")
    _add_sampling_flags(p, max_tokens=48, temperature=0.8)
    p.set_defaults(func=_offline)

    p = _add_parser(
        sub, "drain", "stop the router on this machine gracefully (a Kubernetes preStop hook)"
    )
    p.add_argument("--http-port", type=int, default=8000, help="the router's http_port")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for its streams")
    p.add_argument("--tls", action="store_true", help="the router serves HTTP over TLS")
    p.add_argument("--tls-cert", help="client certificate (PEM), when the router wants mutual TLS")
    p.add_argument("--tls-key", help="its private key (PEM)")
    p.add_argument("--json", action="store_true", help="print the router's answer as JSON")
    p.set_defaults(func=_drain)

    p = _add_parser(sub, "make-tiny-model", "save a random tiny model in Hugging Face format")
    p.add_argument("out_dir", help="the folder to write")
    p.add_argument(
        "--arch", default="llama", choices=["llama", "qwen2", "gpt2"], help="architecture"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.set_defaults(func=_make_tiny_model)
    return parser


def _add_sampling_flags(p: argparse.ArgumentParser, *, max_tokens: int, temperature: float) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens per answer")
    p.add_argument("--temperature", type=float, default=temperature, help="0: greedy")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")


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
    except OSError as exc:  # a port in use, a file that cannot be read: the message says which
        if args.verbose:
            raise
        print(f"kvray: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
