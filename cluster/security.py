"""The front door's locks: TLS (and mutual TLS) for gRPC and HTTP, bearer tokens with optional
per-token limits on concurrent requests.

Certificates, keys and the token file are read again when they change, so a rotated
Kubernetes Secret takes effect without a restart. Tokens are compared in constant time and never
logged (a token is named by the first 8 hex digits of its SHA-256).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from kvray.cluster.errors import OverloadedError, UnauthenticatedError

logger = logging.getLogger(__name__)

RELOAD_CHECK_S = 5.0  # how often the TLS files are checked for a change (HTTP)


@dataclass
class Token:
    name: str  # the first 8 hex digits of its SHA-256: how logs and errors refer to it
    secret: bytes
    max_concurrent_requests: int | None  # None: no limit
    num_running: int = 0


class TokenAuth:
    """Bearer tokens from a file: one per line, `TOKEN` or `TOKEN MAX_CONCURRENT_REQUESTS`;
    blank lines and lines starting with `#` are skipped."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._tokens: list[Token] = []
        self._reload()

    def authenticate(self, header: str | None) -> Token:
        """The token an `authorization: Bearer ...` header carries.

        Raises:
            UnauthenticatedError: no header, another scheme, or an unknown token.
        """
        self._reload()
        scheme, _, value = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise UnauthenticatedError(
                "this server needs a bearer token: send `authorization: Bearer <token>`"
            )
        offered = value.strip().encode()
        found = None
        for token in self._tokens:  # NOTE: every token is compared, in constant time each
            if hmac.compare_digest(offered, token.secret):
                found = token
        if found is None:
            raise UnauthenticatedError("the bearer token is not valid")
        return found

    @contextlib.contextmanager
    def slot(self, token: Token) -> Iterator[None]:
        """Hold one of the token's concurrent requests for the duration.

        Raises:
            OverloadedError: the token already runs `max_concurrent_requests` requests.
        """
        limit = token.max_concurrent_requests
        if limit is not None and token.num_running >= limit:
            raise OverloadedError(
                f"token {token.name} runs {token.num_running} requests, its "
                f"max_concurrent_requests; retry when one has finished"
            )
        token.num_running += 1
        try:
            yield
        finally:
            token.num_running -= 1

    def _reload(self) -> None:
        stat = self.path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        running = {t.secret: t.num_running for t in self._tokens}
        tokens = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) > 2 or (len(fields) == 2 and not fields[1].isdigit()):
                raise ValueError(
                    f"{self.path}:{number}: expected `TOKEN` or `TOKEN MAX_CONCURRENT_REQUESTS`"
                )
            secret = fields[0].encode()
            name = hashlib.sha256(secret).hexdigest()[:8]
            limit = int(fields[1]) if len(fields) == 2 else None
            tokens.append(Token(name, secret, limit, running.get(secret, 0)))
        if not tokens:
            raise ValueError(f"{self.path}: no token in the file")
        self._tokens, self._stamp = tokens, stamp
        logger.info("loaded %d bearer token(s) from %s", len(tokens), self.path)


@dataclass(frozen=True)
class TlsFiles:
    cert: Path  # the server's certificate chain (PEM)
    key: Path  # its private key (PEM)
    client_ca: Path | None  # with it, clients must present a certificate this CA signed

    def stamp(self) -> tuple[int, ...]:
        files = [self.cert, self.key, *([self.client_ca] if self.client_ca else [])]
        return tuple(f.stat().st_mtime_ns for f in files)


def grpc_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """gRPC server credentials that read the files again whenever they change."""

    def config() -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(tls.key.read_bytes(), tls.cert.read_bytes())],
            root_certificates=tls.client_ca.read_bytes() if tls.client_ca else None,
        )

    loaded = [tls.stamp()]

    def fetch() -> Any:
        stamp = tls.stamp()
        if stamp == loaded[0]:
            return None  # unchanged: keep the current configuration
        loaded[0] = stamp
        logger.info("TLS files changed: gRPC takes the new certificate")
        return config()

    return grpc.dynamic_ssl_server_credentials(
        config(), fetch, require_client_authentication=tls.client_ca is not None
    )


class HttpTls:
    """An SSLContext for the HTTP server, reloaded in place when the files change."""

    def __init__(self, tls: TlsFiles) -> None:
        self.tls = tls
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._stamp: tuple[int, ...] | None = None
        self.reload()

    def reload(self) -> None:
        """Load the files if they changed (new handshakes use them)."""
        stamp = self.tls.stamp()
        if stamp == self._stamp:
            return
        self.context.load_cert_chain(self.tls.cert, self.tls.key)
        if self.tls.client_ca is not None:
            self.context.load_verify_locations(self.tls.client_ca)
            self.context.verify_mode = ssl.CERT_REQUIRED
        if self._stamp is not None:
            logger.info("TLS files changed: HTTP takes the new certificate")
        self._stamp = stamp
