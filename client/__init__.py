"""The kvray Python client: `KvrayClient` (sync) and `AsyncKvrayClient` (asyncio) over gRPC.

Users see kvray's own types and typed errors, never protobuf messages or `grpc.RpcError`.
"""

from kvray.client.client import AsyncKvrayClient, KvrayClient
from kvray.client.errors import (
    AuthenticationError,
    DeadlineExceededError,
    InternalServerError,
    InvalidRequestError,
    KvrayError,
    MessageTooLargeError,
    OverloadedError,
    RequestCancelledError,
    UnavailableError,
)
from kvray.client.types import ClusterStatus, ModelInfo, ReplicaStatus, ScalingDecision
from kvray.outputs import Choice, Completion, GenerationChunk, TokenLogprob

__all__ = [
    "AsyncKvrayClient",
    "AuthenticationError",
    "Choice",
    "ClusterStatus",
    "Completion",
    "DeadlineExceededError",
    "GenerationChunk",
    "InternalServerError",
    "InvalidRequestError",
    "KvrayClient",
    "KvrayError",
    "MessageTooLargeError",
    "ModelInfo",
    "OverloadedError",
    "ReplicaStatus",
    "RequestCancelledError",
    "ScalingDecision",
    "TokenLogprob",
    "UnavailableError",
]
