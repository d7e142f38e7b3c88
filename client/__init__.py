"""The kvray Python client: `KvrayClient` (sync) and `AsyncKvrayClient` (asyncio) over gRPC.

Users see kvray's own types and typed errors, never protobuf messages or `grpc.RpcError`.
"""

from kvray.client.client import (
    AsyncKvrayClient,
    ClusterStatus,
    Completion,
    GenerationChunk,
    KvrayClient,
    ModelInfo,
    ReplicaStatus,
)
from kvray.client.errors import (
    DeadlineExceededError,
    InternalServerError,
    InvalidRequestError,
    KvrayError,
    OverloadedError,
    RequestCancelledError,
    UnavailableError,
)

__all__ = [
    "AsyncKvrayClient",
    "ClusterStatus",
    "Completion",
    "DeadlineExceededError",
    "GenerationChunk",
    "InternalServerError",
    "InvalidRequestError",
    "KvrayClient",
    "KvrayError",
    "ModelInfo",
    "OverloadedError",
    "ReplicaStatus",
    "RequestCancelledError",
    "UnavailableError",
]
