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


@dataclass(frozen=True)
class Token:
    name: str  # the first 8 hex digits of its SHA-256: how logs and errors refer to it
    secret: bytes
    max_concurrent_requests: int | None  # None: no limit


class TokenAuth:
    """Bearer tokens from a file: one per line, `TOKEN` or `TOKEN MAX_CONCURRENT_REQUESTS`;
    blank lines and lines starting with `#` are skipped.

    The file is read again when it changes; a change that does not parse (a half-written file)
    is logged and the tokens loaded before stay in force. Running requests are counted per
    secret, so a reload neither forgets nor double-counts the ones in flight.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Raises OSError or ValueError: the file cannot be read, or holds no valid token."""
        self.path = Path(path)
        self._stamp: tuple[int, ...] | None = None
        self._tokens: list[Token] = []
        self._running: dict[bytes, int] = {}
        self._load()

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
        running = self._running.get(token.secret, 0)
        if limit is not None and running >= limit:
            raise OverloadedError(
                f"token {token.name} runs {running} requests, its "
                f"max_concurrent_requests; retry when one has finished"
            )
        self._running[token.secret] = running + 1
        try:
            yield
        finally:
            left = self._running[token.secret] - 1
            if left:
                self._running[token.secret] = left
            else:
                del self._running[token.secret]

    def _reload(self) -> None:
        try:
            self._load()
        except (OSError, ValueError) as exc:
            logger.warning("bearer tokens not reloaded, the last ones stay in force: %s", exc)

    def _load(self) -> None:
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return
        self._stamp = stamp  # NOTE: first, so a broken file is not read again on every request
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
            tokens.append(Token(name, secret, limit))
        if not tokens:
            raise ValueError(f"{self.path}: no token in the file")
        self._tokens = tokens
        logger.info("loaded %d bearer token(s) from %s", len(tokens), self.path)


@dataclass(frozen=True)
class TlsFiles:
    cert: Path  # the server's certificate chain (PEM)
    key: Path  # its private key (PEM)
    client_ca: Path | None  # with it, clients must present a certificate this CA signed

    def stamp(self) -> tuple[int, ...]:
        files = [self.cert, self.key, *([self.client_ca] if self.client_ca else [])]
        return tuple(n for f in files for n in _stamp(f))

    def context(self) -> ssl.SSLContext:
        """A server SSLContext from the files as they are now.

        Raises:
            OSError, ssl.SSLError: a file is missing or does not parse, or the key does not
                match the certificate (a rotation half done).
        """
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca is not None:
            context.load_verify_locations(self.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def _stamp(path: Path) -> tuple[int, int, int]:
    stat = path.stat()  # NOTE: follows links: a Kubernetes Secret swaps its ..data link
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def grpc_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """gRPC server credentials that read the files again whenever they change. A change that
    does not load (a rotation half done) is logged and the last certificate stays."""

    def config() -> Any:
        tls.context()  # NOTE: gRPC would take a mismatched pair and fail every handshake
        return grpc.ssl_server_certificate_configuration(
            [(tls.key.read_bytes(), tls.cert.read_bytes())],
            root_certificates=tls.client_ca.read_bytes() if tls.client_ca else None,
        )

    loaded = [tls.stamp()]

    def fetch() -> Any:
        try:
            stamp = tls.stamp()
            if stamp == loaded[0]:
                return None  # unchanged: keep the current configuration
            loaded[0] = stamp
            new = config()
        except (OSError, ssl.SSLError) as exc:
            logger.warning("TLS files not reloaded, gRPC keeps the last ones: %s", exc)
            return None
        logger.info("TLS files changed: gRPC takes the new certificate")
        return new

    return grpc.dynamic_ssl_server_credentials(
        config(), fetch, require_client_authentication=tls.client_ca is not None
    )


class HttpTls:
    """The HTTP server's SSLContext. Each handshake switches to the newest context built from
    the files (`reload`), so a rotated certificate, key or client CA replaces the old one
    whole, and a rotation that does not load leaves the last one in force."""

    def __init__(self, tls: TlsFiles) -> None:
        """Raises OSError or ssl.SSLError when the files do not load."""
        self.tls = tls
        self._stamp = tls.stamp()
        self._current = tls.context()
        # The listening context: its handshakes move to the current one as they start.
        self.context = tls.context()
        self.context.sni_callback = self._switch

    def _switch(self, sock: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        sock.context = self._current

    def reload(self) -> None:
        """Build a new context if the files changed; new handshakes use it."""
        try:
            stamp = self.tls.stamp()
            if stamp == self._stamp:
                return
            self._stamp = stamp
            self._current = self.tls.context()
        except (OSError, ssl.SSLError) as exc:
            logger.warning("TLS files not reloaded, HTTP keeps the last ones: %s", exc)
            return
        logger.info("TLS files changed: HTTP takes the new certificate")
