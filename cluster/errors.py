"""Router-side errors and the one mapping from error types to gRPC status codes."""

from __future__ import annotations

import grpc


class OverloadedError(Exception):
    """The router's queue is full; the client may retry later."""


class UnavailableError(Exception):
    """No healthy replica can take (or continue) the request."""


class UnauthenticatedError(Exception):
    """No bearer token, or one the server does not know (UNAUTHENTICATED / 401)."""


class RequestFailedError(Exception):
    """A request failed for a reason that is not the caller's (a bug or a repeated failure)."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message a server error maps to."""
    if isinstance(exc, UnauthenticatedError):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc)
    if isinstance(exc, ValueError | TypeError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, OverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, UnavailableError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
