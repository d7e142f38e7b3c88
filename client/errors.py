"""Typed client errors, one per gRPC status the server uses."""

from __future__ import annotations

import grpc


class KvrayError(Exception):
    """Base of every error the client raises. `code` is the gRPC status name."""

    code = "UNKNOWN"
    retryable = False


class InvalidRequestError(KvrayError, ValueError):
    """The request was rejected as invalid (INVALID_ARGUMENT); the message names the field."""

    code = "INVALID_ARGUMENT"


class OverloadedError(KvrayError):
    """The server's queue is full (RESOURCE_EXHAUSTED); retry later."""

    code = "RESOURCE_EXHAUSTED"
    retryable = True


class MessageTooLargeError(KvrayError, ValueError):
    """The request is over the server's message limit (RESOURCE_EXHAUSTED, 4 MiB); not retried."""

    code = "RESOURCE_EXHAUSTED"


class UnavailableError(KvrayError):
    """No healthy replica, or the server cannot be reached (UNAVAILABLE)."""

    code = "UNAVAILABLE"
    retryable = True


class AuthenticationError(KvrayError):
    """No bearer token, or one the server does not know (UNAUTHENTICATED)."""

    code = "UNAUTHENTICATED"


class DeadlineExceededError(KvrayError, TimeoutError):
    """The call's deadline passed (DEADLINE_EXCEEDED)."""

    code = "DEADLINE_EXCEEDED"


class RequestCancelledError(KvrayError):
    """The call was cancelled (CANCELLED)."""

    code = "CANCELLED"


class InternalServerError(KvrayError):
    """A server-side bug (INTERNAL or anything unexpected)."""

    code = "INTERNAL"


_BY_CODE: dict[grpc.StatusCode, type[KvrayError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
}


def from_rpc_error(err: grpc.RpcError) -> KvrayError:
    """The typed error for a gRPC failure (its message is the server's details)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    cls = _BY_CODE.get(code, InternalServerError)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (details or ""):
        cls = MessageTooLargeError  # gRPC's own words: trying again cannot help
    return cls(details or code.name)
