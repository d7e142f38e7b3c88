"""The command line end to end: `kvray serve` in its own process, SIGTERM, and `kvray demo`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from kvray.client import KvrayClient

pytestmark = [pytest.mark.e2e, pytest.mark.ray]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_sigterm_lets_running_streams_finish(env):
    port = free_port()
    server = kvray(
        "serve",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        env={**env, "KVRAY_SHUTDOWN_TIMEOUT_S": "60"},
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
            stream = client.stream("Hello", temperature=0, max_tokens=200, ignore_eos=True)
            tokens = list(next(stream).token_ids)
            server.send_signal(signal.SIGTERM)
            for chunk in stream:
                tokens.extend(chunk.token_ids)
        assert len(tokens) == 200
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()


def test_demo_streams_through_a_local_cluster(env):
    demo = ["demo", "--model", "tiny", "--replicas", "1", "--max-tokens", "8"]
    result = subprocess.run(
        [sys.executable, "-m", "kvray.cluster.cli", *demo],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(">>> ") == 3
    assert "1 replica(s): replica-0 READY" in result.stderr


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
