"""TLS, mutual TLS and bearer tokens end to end, gRPC and HTTP, with certificates made here
(the `cryptography` package): the right status for no token, a bad token, no or a foreign
client certificate, a token past its limit; probes unaffected; rotated files taken live."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvray.client import (
    AuthenticationError,
    KvrayClient,
    OverloadedError,
    UnavailableError,
)
from tests.helpers import free_port
from tests.integration.conftest import start_cluster, wait_for

pytestmark = pytest.mark.ray

ALPHA, BETA = "alpha-token-0123456789", "beta-token-9876543210"


@dataclass
class Pem:
    cert: Path
    key: Path


def make_cert(folder: Path, name: str, issuer: Pem | None = None, *, server: bool = False) -> Pem:
    """A certificate (a CA when `issuer` is None) and its key, written as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    if issuer is None:
        signer, issuer_name = key, subject
    else:
        signer = serialization.load_pem_private_key(issuer.key.read_bytes(), None)
        issuer_name = x509.load_pem_x509_certificate(issuer.cert.read_bytes()).subject
    cert = builder.issuer_name(issuer_name).sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    pem = Pem(folder / f"{name}.crt", folder / f"{name}.key")
    pem.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pem


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, other_ca = make_cert(folder, "ca"), make_cert(folder, "other-ca")
    return {
        "folder": folder,
        "ca": ca,
        "server": make_cert(folder, "server", ca, server=True),
        "client": make_cert(folder, "client", ca),
        "stranger": make_cert(folder, "stranger", other_ca),
        "other_ca": other_ca,
    }


@pytest.fixture(scope="module")
def cluster(ray_session, model_cache_dir, pki):
    tokens = pki["folder"] / "tokens"
    tokens.write_text(f"# kvray tokens\n{ALPHA}\n{BETA} 1\n")
    settings = dict(
        model="fake", replicas=1, fake_step_ms=20, max_model_len=4096, host="127.0.0.1",
        http_port=free_port(),
        health_port=free_port(), tls_cert_file=str(pki["server"].cert),
        tls_key_file=str(pki["server"].key), tls_client_ca_file=str(pki["ca"].cert),
        auth_token_file=str(tokens),
    )  # fmt: skip
    with start_cluster(model_cache_dir, **settings) as running:
        running.tokens = tokens
        yield running


def client(cluster, pki, *, token=ALPHA, cert="client", ca="ca", **options) -> KvrayClient:
    tls = {"ca_cert": pki[ca].cert}
    if cert is not None:
        tls |= {"client_cert": pki[cert].cert, "client_key": pki[cert].key}
    return KvrayClient(cluster.target, token=token, max_retries=0, **tls, **options)


def test_grpc_with_a_client_certificate_and_a_token_generates(cluster, pki):
    with client(cluster, pki) as c:
        assert c.generate("Hello", max_tokens=4, ignore_eos=True).finish_reason == "length"
        assert c.model_info().model == "fake"


@pytest.mark.parametrize("token", [None, "not-a-token", ALPHA + "x", ALPHA[:-1]])
def test_grpc_without_a_valid_token_is_unauthenticated(cluster, pki, token):
    with client(cluster, pki, token=token) as c, pytest.raises(AuthenticationError):
        c.generate("Hello", max_tokens=4)


@pytest.mark.parametrize("cert", [None, "stranger"])
def test_grpc_without_a_trusted_client_certificate_cannot_connect(cluster, pki, cert):
    with client(cluster, pki, cert=cert) as c, pytest.raises(UnavailableError):
        c.generate("Hello", max_tokens=4)


def test_plaintext_grpc_to_the_tls_port_cannot_connect(cluster):
    with (
        KvrayClient(cluster.target, token=ALPHA, max_retries=0) as c,
        pytest.raises(UnavailableError),
    ):
        c.generate("Hello", max_tokens=4)


def test_probes_need_neither_tls_nor_a_token(cluster, pki):
    port = cluster.cluster.config.health_port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "kvray.liveness"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with client(cluster, pki, token=None) as c:  # over TLS, without a token
        assert c.is_serving()


def test_a_token_past_its_concurrent_limit_is_refused_and_not_named(cluster, pki):
    with client(cluster, pki, token=BETA) as c:
        stream = c.stream("Hello", max_tokens=4000, ignore_eos=True)
        next(stream)  # BETA's one request runs (for 80 s at the least, or until closed)
        with pytest.raises(OverloadedError) as err:
            c.generate("Hello", max_tokens=4)
        assert BETA not in str(err.value) and "max_concurrent_requests" in str(err.value)
        stream.close()
        wait_for(lambda: _generates(c), timeout=30)  # the slot is free again


def _generates(c: KvrayClient) -> bool:
    try:
        return bool(c.generate("Hello", max_tokens=2).choices)
    except OverloadedError:
        return False


def https(cluster, pki, path, *, token=ALPHA, cert="client", body=None):
    context = ssl.create_default_context(cafile=pki["ca"].cert)
    if cert is not None:
        context.load_cert_chain(pki[cert].cert, pki[cert].key)
    url = cluster.http_url.replace("http://", "https://").removesuffix("/v1") + path
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_https_needs_a_token_on_the_api_but_not_for_probes_and_metrics(cluster, pki):
    body = {"model": "fake", "prompt": "Hello", "max_tokens": 3}
    status, reply = https(cluster, pki, "/v1/completions", body=body)
    assert status == 200 and reply["choices"][0]["finish_reason"] in ("length", "stop")
    for token in (None, "not-a-token"):
        status, reply = https(cluster, pki, "/v1/completions", token=token, body=body)
        assert status == 401 and reply["error"]["type"] == "authentication_error"
    assert https(cluster, pki, "/v1/models", token=None)[0] == 401
    assert https(cluster, pki, "/health", token=None)[0] == 200


def test_the_openai_client_works_with_tls_and_its_api_key_as_the_token(cluster, pki):
    import openai

    context = ssl.create_default_context(cafile=pki["ca"].cert)
    context.load_cert_chain(pki["client"].cert, pki["client"].key)

    def client(api_key: str) -> openai.OpenAI:
        url = cluster.http_url.replace("http://", "https://")
        http = openai.DefaultHttpxClient(verify=context)
        return openai.OpenAI(base_url=url, api_key=api_key, http_client=http, max_retries=0)

    reply = client(BETA).completions.create(model="fake", prompt="Hello", max_tokens=3)
    assert reply.usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError):
        client("not-a-token").models.list()


def test_https_refuses_a_caller_without_a_token_before_reading_its_body(cluster, pki):
    context = ssl.create_default_context(cafile=pki["ca"].cert)
    context.load_cert_chain(pki["client"].cert, pki["client"].key)
    url = cluster.http_url.replace("http://", "https://") + "/completions"
    request = urllib.request.Request(
        url, data=b"{not json", headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, context=context, timeout=30)
    assert err.value.code == 401  # not 400: an unknown caller learns nothing of the schema


@pytest.mark.parametrize("cert", [None, "stranger"])
def test_https_without_a_trusted_client_certificate_fails_the_handshake(cluster, pki, cert):
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        https(cluster, pki, "/health", cert=cert)


def test_a_rewritten_token_file_takes_effect_without_a_restart(cluster, pki):
    gamma = "gamma-token-555"
    cluster.tokens.write_text(f"{gamma}\n{BETA} 1\n")
    with client(cluster, pki, token=gamma) as c:
        assert c.generate("Hello", max_tokens=2).choices
    with client(cluster, pki, token=ALPHA) as c, pytest.raises(AuthenticationError):
        c.generate("Hello", max_tokens=2)
    cluster.tokens.write_text(f"# kvray tokens\n{ALPHA}\n{BETA} 1\n")


def test_a_rotated_certificate_is_served_without_a_restart(cluster, pki):
    """The server's certificate is replaced by one from another CA: new connections see it."""
    new = make_cert(pki["folder"], "server-rotated", pki["other_ca"], server=True)
    server = pki["server"]
    server.cert.write_bytes(new.cert.read_bytes())
    server.key.write_bytes(new.key.read_bytes())
    with client(cluster, pki, ca="other_ca") as c:  # gRPC: the next handshake
        assert c.generate("Hello", max_tokens=2).choices
    body = {"model": "fake", "prompt": "Hi", "max_tokens": 2}

    def https_trusts_the_new_ca() -> bool:
        try:
            context = ssl.create_default_context(cafile=pki["other_ca"].cert)
            context.load_cert_chain(pki["client"].cert, pki["client"].key)
            url = cluster.http_url.replace("http://", "https://") + "/completions"
            request = urllib.request.Request(
                url, data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {ALPHA}"},
            )  # fmt: skip
            with urllib.request.urlopen(request, context=context, timeout=10) as resp:
                return resp.status == 200
        except (ssl.SSLError, urllib.error.URLError):
            return False

    wait_for(https_trusts_the_new_ca, timeout=30, interval=0.5)  # HTTP checks every 5 s


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_kvray_drain_reaches_a_router_that_speaks_tls(pki, mutual):
    """The preStop hook (`kvray drain --tls`) drains a router whose HTTP port speaks TLS."""
    from types import SimpleNamespace

    from kvray.cluster.asgi_server import HttpServer
    from kvray.cluster.cli import main
    from kvray.cluster.http_server import build_app
    from kvray.cluster.security import HttpTls, TlsFiles

    drained = []

    async def drain() -> None:
        drained.append(True)

    async def run() -> None:
        app = build_app(SimpleNamespace(), drain=drain)  # type: ignore[arg-type]
        files = TlsFiles(pki["server"].cert, pki["server"].key, pki["ca"].cert if mutual else None)
        server = HttpServer(app, host="127.0.0.1", port=0, tls=HttpTls(files))
        port = await server.start()
        try:
            argv = ["drain", "--http-port", str(port), "--tls", "--timeout", "10"]
            if mutual:
                argv += ["--tls-cert", str(pki["client"].cert), "--tls-key", str(pki["client"].key)]
            await asyncio.to_thread(main, argv)
            await asyncio.to_thread(main, [*argv[:3], "--timeout", "10"])  # plain HTTP
        finally:
            await server.stop()

    asyncio.run(run())
    assert drained == [True]  # once: over plain HTTP the TLS port does not answer


def test_a_local_ray_answers_only_with_its_token(ray_session):
    """Ray's own servers listen on every interface (Ray has no setting to bind them to
    loopback): its token authentication, on by default, is what keeps them shut."""
    from kvray.cluster.launcher import ray_token_auth

    assert ray_token_auth() is True


def test_reloading_the_token_file_keeps_counting_the_running_requests(tmp_path):
    from kvray.cluster.errors import OverloadedError as TokenAtItsLimit
    from kvray.cluster.security import TokenAuth

    path = tmp_path / "tokens"
    path.write_text("one-at-a-time 1\n")
    auth = TokenAuth(path)
    token = auth.authenticate("Bearer one-at-a-time")
    with auth.slot(token):
        path.write_text("one-at-a-time 1\nsomeone-else\n")  # an unrelated edit
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
        again = auth.authenticate("Bearer one-at-a-time")
        with pytest.raises(TokenAtItsLimit, match="runs 1 requests"), auth.slot(again):
            pass
    with auth.slot(auth.authenticate("Bearer one-at-a-time")):  # the first one ended: free
        pass


def test_a_token_file_that_does_not_parse_leaves_the_last_tokens(tmp_path, caplog):
    from kvray.cluster.security import TokenAuth

    path = tmp_path / "tokens"
    path.write_text("good-token\n")
    auth = TokenAuth(path)
    path.write_text("good-token not-a-number\n")  # a half-done edit
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert auth.authenticate("Bearer good-token").name
    assert "not reloaded" in caplog.text
    with pytest.raises(ValueError, match="no token"):  # at startup it is an error
        (tmp_path / "empty").write_text("# nothing\n")
        TokenAuth(tmp_path / "empty")


def _https_server(tls_files):
    """An HTTPS server answering /health, in a thread of its own; yields (port, HttpTls)."""
    from types import SimpleNamespace

    from kvray.cluster.asgi_server import HttpServer
    from kvray.cluster.http_server import build_app
    from kvray.cluster.security import HttpTls

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    tls = HttpTls(tls_files)
    app = build_app(SimpleNamespace(is_serving=True))  # type: ignore[arg-type]
    server = HttpServer(app, host="127.0.0.1", port=0, tls=tls)
    port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
    return port, tls, lambda: asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)


def _health(port, ca, cert) -> int:
    context = ssl.create_default_context(cafile=ca.cert)
    context.load_cert_chain(cert.cert, cert.key)
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=context) as resp:
        return resp.status


def test_https_drops_a_rotated_out_client_ca_and_keeps_going_through_a_half_rotation(pki):
    from kvray.cluster.security import TlsFiles

    folder = pki["folder"] / "rotation"
    folder.mkdir()
    ca = make_cert(folder, "ca-1")
    server, client_1 = make_cert(folder, "srv", ca, server=True), make_cert(folder, "c1", ca)
    files = TlsFiles(server.cert, server.key, ca.cert)
    port, tls, stop = _https_server(files)
    try:
        assert _health(port, ca, client_1) == 200
        # A half-done rotation (a new key, the old certificate): the last pair stays in force.
        server.key.write_bytes(make_cert(folder, "other", ca).key.read_bytes())
        tls.reload()
        assert _health(port, ca, client_1) == 200
        # The whole rotation: a new CA signs the server and the clients; the old CA is dropped.
        ca_2 = make_cert(folder, "ca-2")
        new_server = make_cert(folder, "srv-2", ca_2, server=True)
        server.cert.write_bytes(new_server.cert.read_bytes())
        server.key.write_bytes(new_server.key.read_bytes())
        ca.cert.write_bytes(ca_2.cert.read_bytes())  # the client CA file now holds ca-2 only
        tls.reload()
        assert _health(port, ca_2, make_cert(folder, "c2", ca_2)) == 200
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            _health(port, ca_2, client_1)  # signed by the CA that was rotated out
    finally:
        stop()
