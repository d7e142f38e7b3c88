"""Hostile connections against a router with tokens on: does a running stream stall, does the
router's memory grow, are slow clients closed by their deadline?

A watched greedy stream (gRPC, with a token; the fake model, 20 ms steps) runs alone, then
through each attack, sent from a process of its own to the HTTP port:

  big-heads      100 connections at once, each sending a 40 MiB header, without a token
  slow-heads     300 connections sending their headers one byte a second
  slow-bodies    100 authenticated POSTs sending their bodies one byte a second
  health-bodies  100 connections sending a 4 MiB body to /health

For each: the stream's largest gap between chunks above the idle run's, the router's RSS
growth (its peak, sampled every 10 ms), what the attackers got back, and for slow connections
how long until the server closed them. Targets: a gap at most 50 ms above idle, RSS growth at
most 64 MB, every slow connection closed by its deadline (1 s of slack).

    python bench/hostile_connections.py                      # http_read_timeout_s 5
    python bench/hostile_connections.py --read-timeout-s 30  # the default deadline
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log

TOKEN = "hostile-connections-bench-token"
HOST = "127.0.0.1"
MIB = 2**20
GAP_TARGET_S, RSS_TARGET, CLOSE_SLACK_S = 0.050, 64 * MIB, 1.0
ATTACKS = {  # name: (connections, what each sends)
    "big-heads": (100, "a 40 MiB header, no token"),
    "slow-heads": (300, "a header at 1 byte/s"),
    "slow-bodies": (100, "a body at 1 byte/s, token"),
    "health-bodies": (100, "a 4 MiB body to /health"),
}


async def _answer(reader: asyncio.StreamReader, limit_s: float) -> tuple[str, float | None]:
    """The status the server answered ('reset': none came before a reset) and how long after
    this call it closed the connection (None: still open after `limit_s`)."""
    start, received = time.monotonic(), bytearray()

    async def until_closed() -> None:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                received.extend(chunk)

    try:
        await asyncio.wait_for(until_closed(), limit_s)
    except asyncio.TimeoutError:
        return "still open", None
    data = bytes(received)
    status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "reset"
    return status, time.monotonic() - start


async def _send(port: int, head: bytes, size: int, limit_s: float) -> dict[str, Any]:
    """Send `head`, then `size` bytes as fast as the server takes them; what came back."""
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(head)
    sent, piece = 0, b"a" * 65536
    with contextlib.suppress(OSError):
        while sent < size:
            writer.write(piece)
            await writer.drain()
            sent += len(piece)
    status, _ = await _answer(reader, limit_s)
    writer.close()
    return {"status": status, "sent": sent}


async def _trickle(port: int, head: bytes, limit_s: float) -> dict[str, Any]:
    """Send `head`, then a byte a second until the server closes; when it did (from the start)."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(head)

    async def drip() -> None:
        with contextlib.suppress(OSError):
            while True:
                await asyncio.sleep(1.0)
                writer.write(b"a")
                await writer.drain()

    dripping = asyncio.ensure_future(drip())
    status, closed = await _answer(reader, limit_s)
    dripping.cancel()
    writer.close()
    return {"status": status, "closed_s": None if closed is None else time.monotonic() - start}


def _connection(name: str, port: int, limit_s: float) -> Any:
    """One connection of the attack `name` (a coroutine)."""
    if name == "big-heads":
        return _send(port, b"GET /v1/models HTTP/1.1\r\nHost: kvray\r\nX-Pad: ", 40 * MIB, limit_s)
    if name == "slow-heads":
        return _trickle(port, b"GET /health HTTP/1.1\r\nHost: kvray\r\nX-Slow: ", limit_s)
    if name == "slow-bodies":
        head = f"POST /v1/completions HTTP/1.1\r\nHost: kvray\r\nAuthorization: Bearer {TOKEN}\r\n"
        return _trickle(port, head.encode() + b"Content-Length: 1048576\r\n\r\n", limit_s)
    head = b"GET /health HTTP/1.1\r\nHost: kvray\r\nContent-Length: 4194304\r\n\r\n"
    return _send(port, head, 4 * MIB, limit_s)


def _attack(name: str, port: int, limit_s: float, out: Any) -> None:
    """In its own process: every connection of the attack at once; their results."""

    async def run() -> list[dict[str, Any]]:
        connections, _ = ATTACKS[name]
        return list(
            await asyncio.gather(*(_connection(name, port, limit_s) for _ in range(connections)))
        )

    out.put(asyncio.run(run()))


def _watch(target: str, streaming: Any, stop: Any, out: Any) -> None:
    """In its own process: one long greedy stream until `stop`; its largest gap between chunks."""
    from kvray.client import KvrayClient

    with KvrayClient(target, token=TOKEN, max_retries=0) as client:
        last, largest = None, 0.0
        chunks = client.stream("Once upon a time", temperature=0, max_tokens=6000, ignore_eos=True)
        for _ in chunks:
            now = time.perf_counter()
            if last is not None:
                largest = max(largest, now - last)
            last = now
            streaming.set()
            if stop.is_set():
                break
        chunks.close()
    out.put(largest)


class PeakRss:
    """This process's (the router's) peak resident memory while in the block, sampled."""

    def __init__(self) -> None:
        self.start = self.peak = self._rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._done.wait(0.01):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def measure(name: str | None, target: str, http_port: int, limit_s: float) -> dict[str, Any]:
    """The watched stream's largest gap, the RSS growth and the attackers' results while the
    attack `name` runs (None: 5 s without one)."""
    ctx = mp.get_context("spawn")
    streaming, stop, gaps, out = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Queue()
    watcher = ctx.Process(target=_watch, args=(target, streaming, stop, gaps))
    watcher.start()
    if not streaming.wait(120):
        raise RuntimeError("the watched stream did not start")
    time.sleep(1.0)  # past the stream's first steps
    results: list[dict[str, Any]] = []
    with PeakRss() as rss:
        if name is None:
            time.sleep(5.0)
        else:
            attacker = ctx.Process(target=_attack, args=(name, http_port, limit_s, out))
            attacker.start()
            results = out.get(timeout=limit_s + 600)
            attacker.join()
        stop.set()
        gap = gaps.get(timeout=60)
    watcher.join()
    return {"gap": gap, "rss": rss.peak - rss.start, "results": results}


def _row(name: str | None, row: dict[str, Any], idle_gap: float, deadline_s: float) -> str:
    """One line of the report, with each target it misses named."""
    label = (
        "idle (no attack)" if name is None else f"{name}: {ATTACKS[name][0]} x {ATTACKS[name][1]}"
    )
    above = row["gap"] - idle_gap
    statuses = collections.Counter(r["status"] for r in row["results"])
    answers = ", ".join(f"{s} x{n}" for s, n in statuses.most_common()) or "-"
    closes = [r["closed_s"] for r in row["results"] if "closed_s" in r]
    slowest = "-" if not closes else ("never" if None in closes else f"{max(closes):.1f} s")
    sent = [r["sent"] for r in row["results"] if "sent" in r]
    most_sent = f"{max(sent) / MIB:.1f} MiB" if sent else "-"
    missed = []
    if name is not None and above > GAP_TARGET_S:
        missed.append("gap")
    if row["rss"] > RSS_TARGET:
        missed.append("RSS")
    if closes and (None in closes or max(closes) > deadline_s + CLOSE_SLACK_S):
        missed.append("deadline")
    verdict = "MISSED " + ", ".join(missed) if missed else "ok"
    return (
        f"{label:<48} {row['gap'] * 1000:6.1f} ms {above * 1000:+7.1f} ms "
        f"{row['rss'] / MIB:+8.1f} MB  {slowest:>7}  {most_sent:>9}  {answers:<24} {verdict}"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--read-timeout-s", type=float, default=5.0, help="http_read_timeout_s")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated names")
    args = parser.parse_args()
    names = [n for n in args.attacks.split(",") if n]
    import ray

    from kvray.cluster.config import load
    from kvray.cluster.launcher import BackgroundCluster

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    tokens = Path(tempfile.mkdtemp()) / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    settings = {
        "model": "fake", "fake_step_ms": 20, "max_model_len": 8192, "host": HOST, "port": 0,
        "http_port": _free_port(), "auth_token_file": str(tokens), "http_read_timeout_s": args.read_timeout_s,
    }  # fmt: skip
    rows: list[tuple[str | None, dict[str, Any]]] = []
    with BackgroundCluster(load(settings, environ={})) as cluster:
        http_port = cluster.cluster.http_port
        assert http_port is not None
        limit_s = args.read_timeout_s + 60  # an attacker waits this long for a close
        for name in [None, *names]:
            log(f"{name or 'idle'}: running")
            row = measure(name, cluster.target, http_port, limit_s)
            rows.append((name, row))
            log(f"{name or 'idle'}: largest gap {row['gap'] * 1000:.1f} ms")
    idle_gap = rows[0][1]["gap"]
    print(
        f"\n## hostile connections: fake model (20 ms steps), tokens on, "
        f"http_read_timeout_s {args.read_timeout_s:g}"
    )
    print(
        f"{'attack':<48} {'largest gap':>9} {'above idle':>10} {'RSS growth':>11}  "
        f"{'closed':>7}  {'most sent':>9}  {'answers':<24} targets"
    )
    for name, row in rows:
        print(_row(name, row, idle_gap, args.read_timeout_s))
    print(
        f"targets: gap <= {GAP_TARGET_S * 1000:.0f} ms above idle, RSS growth <= "
        f"{RSS_TARGET / MIB:.0f} MB, slow connections closed within "
        f"{args.read_timeout_s:g} s (+{CLOSE_SLACK_S:g} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
