"""What both clients share, apart from their I/O: channel options and credentials, the routers
to use and when to move to the next, building requests, and resuming a broken stream.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc

from kvray.client.errors import KvrayError, UnavailableError, from_rpc_error
from kvray.outputs import GenerationChunk
from kvray.protos.kvray.v1 import generation_pb2 as pb
from kvray.wire import set_request_params

DEFAULT_TARGET = "localhost:50051"
# NOTE: keepalive pings notice a dead or hung server (a stopped process keeps its sockets open,
# so TCP alone never tells). The keepalive timer restarts with every byte read: a ping goes out
# 2 s after the server's last byte, and the connection closes when it is unanswered 3 s later
# (gRPC 1.85 waits ping_timeout for a keepalive ping too, so both say 3 s). A stream thus fails
# with UNAVAILABLE at most 5 s after the server stops answering, as the README says (a test
# checks the sum), and a call never waits more than ~10 s to connect. The server permits these
# pings (grpc_server.SERVER_OPTIONS).
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 2_000),
    ("grpc.keepalive_timeout_ms", 3_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.ping_timeout_ms", 3_000),  # an unanswered ping closes the connection
    ("grpc.min_reconnect_backoff_ms", 10_000),  # also the connect timeout
]

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]
PemSource = str | Path | bytes  # a PEM file's path, or its bytes


def build_request(
    prompt: Prompt,
    *,
    request_id: str = "",
    session_id: str = "",
    add_generation_prompt: bool | None = None,
    **params: Any,
) -> pb.GenerateRequest:
    """A GenerateRequest from a prompt and SamplingParams-style keyword arguments.

    A prompt is text, token ids, or a conversation: a list of {"role", "content"} messages that
    the server renders with the model's chat template (`add_generation_prompt`, default true,
    ends it with the opening of an assistant turn).

    Raises:
        TypeError: an unknown parameter (the message lists the valid ones).
    """
    req = pb.GenerateRequest(request_id=request_id, session_id=session_id)
    if isinstance(prompt, str):
        req.text = prompt
    elif prompt and isinstance(prompt[0], Mapping):
        for message in cast(Sequence[Mapping[str, str]], prompt):
            req.messages.messages.add(role=message["role"], content=message["content"])
        if add_generation_prompt is not None:
            req.messages.add_generation_prompt = add_generation_prompt
    else:
        req.token_ids.ids.extend(cast(Sequence[int], prompt))
    set_request_params(req, params)
    return req


@dataclass
class Progress:
    """What a stream's samples have received so far: enough to resume it elsewhere."""

    n: int = 1  # the request's samples
    # Beam search or best_of > n: samples arrive whole at the end, so a broken stream is sent
    # again from the start and the samples already received are not passed on twice.
    is_ranked: bool = False
    token_ids: dict[int, list[int]] = field(default_factory=dict)
    num_text_chars: dict[int, int] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> Progress:
        """Progress of a request sent with these `SamplingParams` keyword arguments."""
        n = params.get("n") or 1
        return cls(n, (params.get("num_beams") or 1) > 1 or (params.get("best_of") or n) > n)

    @property
    def received(self) -> bool:
        return bool(self.token_ids or self.num_text_chars or self.finished)

    @property
    def done(self) -> bool:
        return len(self.finished) >= self.n

    def add(self, chunk: GenerationChunk) -> bool:
        """Record a chunk; False when it repeats a sample already received (ranked requests)."""
        if self.is_ranked and chunk.index in self.finished:
            return False
        self.token_ids.setdefault(chunk.index, []).extend(chunk.token_ids)
        self.num_text_chars[chunk.index] = self.num_text_chars.get(chunk.index, 0) + len(chunk.text)
        if chunk.finish_reason is not None:
            self.finished.add(chunk.index)
        return True

    def resumed(self, request: pb.GenerateRequest) -> pb.GenerateRequest:
        """`request` as it continues after what was received (itself when nothing was, or
        for a ranked request)."""
        if not self.received or self.is_ranked:
            return request
        again = pb.GenerateRequest()
        again.CopyFrom(request)
        for index in sorted(set(self.token_ids) | self.finished):
            again.resume.add(
                index=index,
                token_ids=self.token_ids.get(index, []),
                num_text_chars=self.num_text_chars.get(index, 0),
                finished=index in self.finished,
            )
        return again


class ClientBase:
    """Options both clients take, and the routers they talk to."""

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: bool = False,
        ca_cert: PemSource | None = None,
        client_cert: PemSource | None = None,
        client_key: PemSource | None = None,
        max_retries: int = 3,
        backoff_s: float = 0.2,
    ) -> None:
        """`target`: one router's `host:port`, or several (the client moves to the next when
        one is unavailable). `token`: sent as `authorization: Bearer <token>`. TLS: `tls=True`
        trusts the system's CAs; `ca_cert` trusts that CA instead; `client_cert` and
        `client_key` answer a server that asks for a client certificate (mutual TLS)."""
        self.targets = [target] if isinstance(target, str) else list(target)
        if not self.targets:
            raise ValueError("target: give at least one router address")
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.credentials = None
        if tls or ca_cert is not None or client_cert is not None:
            self.credentials = grpc.ssl_channel_credentials(
                _pem(ca_cert), _pem(client_key), _pem(client_cert)
            )
        self._current = 0

    @property
    def target(self) -> str:
        """The router the client uses now."""
        return self.targets[self._current]

    def next_target(self) -> None:
        """Move to the next router (after this one was unavailable)."""
        self._current = (self._current + 1) % len(self.targets)

    def retry_delay(
        self, err: grpc.RpcError, attempt: int, progress: Progress, *, resume: bool
    ) -> float:
        """Seconds to wait before trying a failed Generate call again. Raises its typed error
        instead when it must not be tried again: the status is not transient (only UNAVAILABLE
        and RESOURCE_EXHAUSTED are), the retries are spent, or tokens already arrived and the
        stream is not to be resumed."""
        error = from_rpc_error(err)
        if not error.retryable or attempt >= self.max_retries or (progress.received and not resume):
            raise error from None
        if isinstance(error, UnavailableError):
            self.next_target()
        return self.backoff_s * (2**attempt) * (0.5 + random.random() / 2)

    def not_serving(self, timeout: float) -> KvrayError:
        return KvrayError(f"{', '.join(self.targets)}: none reported SERVING within {timeout:.0f}s")


def _pem(source: PemSource | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()
