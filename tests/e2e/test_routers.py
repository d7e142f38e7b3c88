"""Two routers on one Ray cluster, each driving its own replica: `kill -9` one of them in the
middle of 50 streams, and every client resumes on the other router with the exact output of an
uninterrupted run (no gap, no repeated token).

The replicas run the fake model (scripted tokens that depend on every token before them) with
100 ms steps: a stream of 120 tokens lasts 12 s at the least, so the kill, as soon as every
stream has its first tokens, finds the victim's streams unfinished however fast the machine
(a slow one would have to take 12 s to start 50 streams)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kvray.client import KvrayClient
from tests.helpers import free_port

NUM_STREAMS = 50
MAX_TOKENS = 120
PARAMS = {"temperature": 0, "max_tokens": MAX_TOKENS, "ignore_eos": True}


@pytest.fixture
def ray_head():
    """A Ray cluster of its own (`ray start --head --block`, in its own temp dir so that it
    leaves nothing behind for a later `ray.init`), stopped with its process."""
    port = free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    temp_dir = tempfile.mkdtemp(prefix="kvray-ray-")
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", "--port", str(port), "--num-cpus", "4",
         "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp_dir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    yield f"127.0.0.1:{port}"
    head.send_signal(signal.SIGTERM)
    head.wait(timeout=60)
    shutil.rmtree(temp_dir, ignore_errors=True)


def serve(ray_address: str, model_cache_dir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ, "RAY_AUTH_MODE": "token", "KVRAY_CACHE_DIR": model_cache_dir,
        "KVRAY_FAKE_STEP_MS": "100",
    }  # fmt: skip
    args = ["--ray-address", ray_address, "--model", "fake", "--max-model-len", "256",
            "--port", str(port), "--http-port", "0", "--host", "127.0.0.1"]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "kvray.cluster.cli", "serve", *args],
        env=env, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return process, f"127.0.0.1:{port}"


def prompt(i: int) -> str:
    return f"Stream {i}: once upon a time"


def test_streams_resume_on_another_router_exactly(ray_head, model_cache_dir):
    (victim, a), (survivor, b) = serve(ray_head, model_cache_dir), serve(ray_head, model_cache_dir)
    try:
        for target in (a, b):
            with KvrayClient(target) as c:
                c.wait_until_serving(timeout=240)
        with KvrayClient(b) as c, ThreadPoolExecutor(NUM_STREAMS) as pool:
            # each request's output when nothing breaks
            replies = pool.map(lambda i: c.generate(prompt(i), **PARAMS), range(NUM_STREAMS))
            reference = [r.token_ids for r in replies]
        started = threading.Barrier(NUM_STREAMS + 1, timeout=120)
        resumed: list[bool] = [False] * NUM_STREAMS

        def run(i: int) -> list[int]:
            targets = [a, b] if i % 2 == 0 else [b, a]  # half start on the router that dies
            with KvrayClient(targets) as c:
                chunks = c.stream(prompt(i), resume=True, **PARAMS)
                tokens = list(next(chunks).token_ids)
                started.wait()
                for chunk in chunks:
                    tokens.extend(chunk.token_ids)
                resumed[i] = c.target != targets[0]
            return tokens

        with ThreadPoolExecutor(NUM_STREAMS) as pool:
            futures = [pool.submit(run, i) for i in range(NUM_STREAMS)]
            started.wait()  # every stream is running
            victim.send_signal(signal.SIGKILL)
            outputs = [f.result(timeout=300) for f in futures]
        for i, (got, want) in enumerate(zip(outputs, reference)):
            assert got == want, f"stream {i}:\n  got {got}\n want {want}"
        assert sum(resumed) > 0  # streams did move to the surviving router
        print(f"{sum(resumed)} of {NUM_STREAMS} streams resumed on the other router, all exact")
    finally:
        for process in (victim, survivor):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
