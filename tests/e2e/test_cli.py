"""The command line end to end: `kvray serve` in its own process, SIGTERM, `kvray drain` and
`kvray demo`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvray.client import KvrayClient, UnavailableError
from tests.helpers import free_port
from tests.integration.conftest import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.ray]


def kvray(*args: str, env: dict[str, str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kvray.cluster.cli", *args], env=env, **kwargs)


@pytest.fixture
def env(model_cache_dir):
    return {
        **os.environ,
        "KVRAY_CACHE_DIR": model_cache_dir,
        "KVRAY_MAX_MODEL_LEN": "256",
        "KVRAY_HTTP_PORT": "0",  # HTTP off: port 8000 may be taken on a test machine
    }


# The fake model's context for the tests that serve it: room for a stream that outlasts a test.
FAKE_MAX_MODEL_LEN = {"KVRAY_MAX_MODEL_LEN": "4096"}


def test_sigterm_lets_running_streams_finish(env):
    port = free_port()
    step_ms, max_tokens = 50, 200  # the stream's last step returns 10 s after it is sent, or later
    settings = {
        **env, **FAKE_MAX_MODEL_LEN, "KVRAY_FAKE_STEP_MS": str(step_ms),
        "KVRAY_SHUTDOWN_TIMEOUT_S": "120",  # 12 times what the stream needs at the fixed step time
    }  # fmt: skip
    server = kvray(
        "serve", "--model", "fake", "--port", str(port), "--host", "127.0.0.1", env=settings
    )
    try:
        with KvrayClient(f"127.0.0.1:{port}", max_retries=0) as client:
            client.wait_until_serving(timeout=120)
            target = ["--target", f"127.0.0.1:{port}"]
            generate = subprocess.run(
                [sys.executable, "-m", "kvray.cluster.cli", "generate", "Hello", "--max-tokens", "5",
                 "--temperature", "0", *target], env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert generate.returncode == 0, generate.stderr
            assert "[length; 3 prompt + 5 completion tokens]" in generate.stderr
            status = subprocess.run(
                [sys.executable, "-m", "kvray.cluster.cli", "status", *target],
                env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert (
                status.returncode == 0 and "replica-0" in status.stdout and "READY" in status.stdout
            )
            sent = time.monotonic()
            stream = client.stream("Hello", max_tokens=max_tokens, ignore_eos=True)
            tokens = list(next(stream).token_ids)
            server.send_signal(signal.SIGTERM)
            wait_for(lambda: not client.is_serving())  # the shutdown has begun
            began = time.monotonic() - sent
            assert began < max_tokens * step_ms / 1000, f"the stream may have ended first ({began})"
            for chunk in stream:
                tokens.extend(chunk.token_ids)
        assert len(tokens) == max_tokens
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()


# A log record: kvray's format (`2026-12-06 10:00:00,123 INFO ...`), Ray's (`[2026-12-06 ...`,
# `(WorkerActor pid=123) ...`) or a bare level name.
LOG_LINE = re.compile(
    r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}|\(\w+ pid=\d+\)|\b(DEBUG|INFO|WARNING|ERROR)\b"
)


def test_demo_streams_answers_with_no_log_line_among_them(env):
    demo = ["demo", "--model", "tiny", "--replicas", "2", "--max-tokens", "8"]
    result = subprocess.run(
        [sys.executable, "-m", "kvray.cluster.cli", *demo],
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream, as a terminal shows it
        text=True,
        timeout=300,
    )
    output = result.stdout
    assert result.returncode == 0, output[-3000:]
    assert output.count(">>> ") == 3
    start, end = output.index(">>> "), output.index("==> 2 replica(s): ")
    answers = output[start:end].splitlines()
    assert not [line for line in answers if LOG_LINE.search(line)], output
    status = output[:start].splitlines()
    assert len(status) == 3 and status[2] == "", output  # what starts, what serves, a blank line
    assert "tiny on 2 replica(s)" in status[1]  # both ready before the first answer
    assert "replica-0 READY" in output[end:] and "replica-1 READY" in output[end:]
    log = Path(re.findall(r"its log: (\S+)\)", status[0])[0])  # the server's log went there
    try:
        assert "replica-0: ready" in log.read_text() and "replica-1: ready" in log.read_text()
    finally:
        log.unlink()


def test_serve_rejects_an_unknown_config_key_clearly(env, tmp_path):
    config = tmp_path / "kvray.yaml"
    config.write_text("replicaz: 2\n")
    result = subprocess.run(
        [sys.executable, "-m", "kvray.cluster.cli", "serve", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "unknown config key(s) replicaz" in result.stderr


def test_serve_on_a_port_in_use_says_so_in_one_line(env):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "kvray.cluster.cli", "serve", "--model", "fake",
             "--host", "127.0.0.1", "--port", "0", "--http-port", str(port)],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"kvray: error: HTTP: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_client_notices_a_hung_server_within_seconds(env):
    port = free_port()
    fake = {**env, **FAKE_MAX_MODEL_LEN, "KVRAY_FAKE_STEP_MS": "20"}
    server = kvray("serve", "--model", "fake", "--port", str(port), "--host", "127.0.0.1", env=fake)
    outcome: list[BaseException] = []
    try:
        with KvrayClient(f"127.0.0.1:{port}", max_retries=0) as client:
            client.wait_until_serving(timeout=120)
            stream = client.stream("Hello", max_tokens=4000, ignore_eos=True)  # 80 s at least
            next(stream)
            server.send_signal(signal.SIGSTOP)  # hung: its sockets stay open, nothing answers

            def read_to_the_end() -> None:
                try:
                    for _ in stream:
                        pass
                except BaseException as exc:
                    outcome.append(exc)

            reader = threading.Thread(target=read_to_the_end, daemon=True)
            reader.start()
            reader.join(timeout=20)  # keepalive pings fail the stream after ~5 s
            assert not reader.is_alive(), "the client still waits on a stopped server"
            assert isinstance(outcome[0], UnavailableError), outcome
            with pytest.raises(UnavailableError):  # and a new call does not wait forever
                client.generate("Hello", max_tokens=2)
    finally:
        server.send_signal(signal.SIGCONT)
        server.kill()
        server.wait(timeout=30)


def test_drain_ends_the_server_and_a_stream_cut_at_the_deadline_says_why(env):
    port, http_port = free_port(), free_port()
    # Steps of 20 ms at the least: the short stream's 20 take 0.4 s, a 25th of the 10 s the drain
    # gives it; the long one's 4,000 take 80 s, more than the drain command may take (60 s).
    settings = {**env, **FAKE_MAX_MODEL_LEN, "KVRAY_FAKE_STEP_MS": "20",
                "KVRAY_SHUTDOWN_TIMEOUT_S": "10"}  # fmt: skip
    args = ["--model", "fake", "--port", str(port), "--http-port", str(http_port)]
    server = kvray("serve", *args, "--host", "127.0.0.1", env=settings)
    try:
        with KvrayClient(f"127.0.0.1:{port}", max_retries=0) as client:
            client.wait_until_serving(timeout=120)
            short = client.stream("Hello", max_tokens=20, ignore_eos=True)
            long = client.stream("Hello", max_tokens=4000, ignore_eos=True)
            first_short, _ = next(short), next(long)
            drain = subprocess.run(
                [sys.executable, "-m", "kvray.cluster.cli", "drain", "--http-port", str(http_port)],
                env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert drain.returncode == 0, drain.stderr
            # the short stream may have ended before the drain began: then it is not counted
            assert drain.stdout.startswith(f"drained the router on port {http_port}: ")
            assert drain.stdout.strip().endswith("finished; 1 ended at shutdown_timeout_s")
            assert len(first_short.token_ids) + sum(len(c.token_ids) for c in short) == 20
            with pytest.raises(UnavailableError, match="the server is shutting down"):
                for _ in long:
                    pass
        assert server.wait(timeout=60) == 0  # it stops as on SIGTERM
    finally:
        if server.poll() is None:
            server.kill()
