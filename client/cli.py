"""`kvray generate` and `kvray status`: the client side of the command line."""

from __future__ import annotations

import argparse
import functools
import re
import sys
import time
from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor

from kvray.client.client import KvrayClient
from kvray.client.connection import Progress
from kvray.client.errors import KvrayError
from kvray.client.types import ReplicaStatus
from kvray.protos.kvray.v1 import generation_pb2
from kvray.wire import param_fields

DEFAULT_TARGET = "localhost:50051"
DEFAULT_MAX_TOKENS = 64  # sent when --max-tokens is left out (the wire's default is 16)
_TYPES = {
    FieldDescriptor.TYPE_FLOAT: float,
    FieldDescriptor.TYPE_INT32: int,
    FieldDescriptor.TYPE_INT64: int,
    FieldDescriptor.TYPE_STRING: str,
}
_PROTO = Path(generation_pb2.__file__).with_name("generation.proto")
_FIELD = re.compile(r"^\s*(?:optional |repeated )?(?:map<[\w, ]+>|[\w.]+) (\w+) = \d+;")
_BLOCK = re.compile(r"^\s*(message|oneof|enum|service) (\w+) \{")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, with each option's default appended when it has one (not None, not the
    False of a switch), so unset options do not read "(default: None)"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "%(default)" in text
            or default is None
            or default is False
            or default == argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: %(default)s)"


@functools.cache
def proto_comments() -> dict[tuple[str, str], str]:
    """The comment above each field of generation.proto, by (message, field) and joined into
    one line: the wire contract documents every parameter, and the flags repeat it."""
    comments: dict[tuple[str, str], str] = {}
    blocks: list[str] = []  # the messages each line is in (a oneof counts as its message)
    lines: list[str] = []
    for line in _PROTO.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("//"):
            lines.append(stripped[2:].strip())
            continue
        if block := _BLOCK.match(line):
            blocks.append(block[2] if block[1] != "oneof" else blocks[-1])
        elif stripped == "}" and blocks:
            blocks.pop()
        elif (field := _FIELD.match(line)) and blocks:
            comments[blocks[-1], field[1]] = " ".join(lines)
        lines = []
    return comments


def _param_help(f: FieldDescriptor) -> str:
    message = f.containing_type.name if f.containing_type is not None else ""
    text = proto_comments().get((message, f.name), "")
    return text.replace("%", "%%")  # argparse formats help with %


def _connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        action="append",
        default=None,
        help=f"router address host:port (repeatable: the next is tried when one is down; "
        f"default {DEFAULT_TARGET})",
    )
    p.add_argument("--token-file", default=None, help="a file holding the bearer token")
    p.add_argument("--tls", action="store_true", help="speak TLS, trusting the system's CAs")
    p.add_argument("--tls-ca", default=None, help="trust this CA (PEM) instead; implies --tls")
    p.add_argument("--tls-cert", default=None, help="client certificate (PEM), mutual TLS")
    p.add_argument("--tls-key", default=None, help="the client certificate's key (PEM)")


def _client(args: argparse.Namespace) -> KvrayClient:
    token = None
    if args.token_file:
        with open(args.token_file) as f:
            token = f.read().strip()
    return KvrayClient(
        args.target or [DEFAULT_TARGET],
        token=token,
        tls=args.tls,
        ca_cert=args.tls_ca,
        client_cert=args.tls_cert,
        client_key=args.tls_key,
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    about = "stream a completion from a kvray server"
    p = sub.add_parser(
        "generate",
        help=about,
        description=f"{about[0].upper()}{about[1:]}. Sampling flags left out are not sent: "
        "the server applies the default their help names (the wire contract's, "
        "protos/kvray/v1/generation.proto).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("prompt", help="the prompt text")
    _connection_flags(p)
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument(
        "--resume", action="store_true", help="continue on the next router if one goes away"
    )
    for name, f in param_fields().items():  # one flag per wire parameter
        _add_param_flag(p, name, f)
    p.set_defaults(func=generate)

    about = "print a kvray cluster's replicas and load"
    p = sub.add_parser(
        "status", help=about, description=f"{about[0].upper()}{about[1:]}.",
        formatter_class=HelpFormatter,
    )  # fmt: skip
    _connection_flags(p)
    p.set_defaults(func=status)


def _add_param_flag(p: argparse.ArgumentParser, name: str, f: FieldDescriptor) -> None:
    """A flag for one wire parameter, its help the proto's comment. Unset (None) unless given,
    so the server applies its own default; --max-tokens alone has one here."""
    flag, text = "--" + name.replace("_", "-"), _param_help(f)
    if f.message_type is not None and f.message_type.GetOptions().map_entry:  # logit_bias
        p.add_argument(
            flag, dest=name, action="append", type=_token_bias, metavar="TOKEN_ID=BIAS",
            help=f"{text} Repeatable.",
        )  # fmt: skip
    elif f.is_repeated or f.message_type is not None:  # a list, or choice's list of strings
        value_type = str if f.message_type is not None else _TYPES[f.type]
        p.add_argument(
            flag, dest=name, action="append", type=value_type, help=f"{text} Repeatable."
        )
    elif f.type == FieldDescriptor.TYPE_BOOL:
        p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=text)
    elif name == "max_tokens":
        p.add_argument(
            flag,
            dest=name,
            type=int,
            default=DEFAULT_MAX_TOKENS,
            help=f"{text} This command's default: %(default)s.",
        )
    else:
        p.add_argument(flag, dest=name, type=_TYPES[f.type], default=None, help=text)


def _token_bias(text: str) -> tuple[int, float]:
    """`--logit-bias 42=-100`: a token id and its bias."""
    token_id, sep, bias = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(token_id), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID=BIAS, got {text!r}") from None


def generate(args: argparse.Namespace) -> int:
    params = {name: getattr(args, name) for name in param_fields()}
    try:
        with _client(args) as client:
            last = None
            chunks = client.stream(args.prompt, timeout=args.timeout, resume=args.resume, **params)
            ranked = Progress.of(params).is_ranked  # each chunk is a whole sample, best first
            for chunk in chunks:
                if ranked:
                    score = chunk.cumulative_logprob
                    print(
                        f"[{chunk.index}] {chunk.text}"
                        + (f"  ({score:.3f})" if score is not None else "")
                    )
                else:
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


def _devices(replica: ReplicaStatus) -> str:
    """A replica's device, or for one of several ranks each rank's: `0:cpu@node-a 1:cpu@node-a`."""
    if len(replica.ranks) < 2:
        return replica.device
    return " ".join(f"{r.rank}:{r.device}@{r.node}" for r in replica.ranks)


def status(args: argparse.Namespace) -> int:
    try:
        with _client(args) as client:
            st = client.status()
    except KvrayError as exc:
        print(f"kvray: {exc.code}: {exc}", file=sys.stderr)
        return 1
    print(
        f"{'replica':<12} {'state':<9} {'waiting':>7} {'running':>7} {'KV used':>15} "
        f"{'preempt':>7} {'cache hit':>9}  device"
    )
    for r in st.replicas:
        kv = f"{r.kv_blocks_used}/{r.kv_blocks_total}"
        hits = f"{r.num_prefix_hits / r.num_prefix_queries:.0%}" if r.num_prefix_queries else "-"
        print(
            f"{r.replica_id:<12} {r.state:<9} {r.num_waiting:>7} {r.num_running:>7} {kv:>15} "
            f"{r.num_preemptions:>7} {hits:>9}  {_devices(r)}"
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
