"""Serving benchmark, in the style of `vllm bench serve`.

Two parts, one run:

1. engine-vs-cluster (run twice by default: added latency with the tiny model at 10 req/s, and
   throughput with a SmolLM2-135M-shaped model, closed loop at 32 streams): the same seeded
   requests (mixed prompt/output lengths) against
   (a) the in-process engine (EngineCore + ModelWorker in this process, no Ray, no gRPC) and
   (b) a `kvray serve` cluster with one replica, over gRPC; prints request throughput, output
   tokens/s, TTFT, inter-token latency (ITL) and end-to-end latency (p50/p90/p99) for both and
   the ratios: cluster throughput / in-process, and the TTFT the cluster adds (p50).
2. router-capacity: a cluster whose worker is a FakeWorker actor (no model, scripted tokens,
   a fixed step time) and closed-loop streams at rising concurrency, to find the most streams
   and tokens/s one router process sustains with p99 ITL under 50 ms. The load generator runs
   in its own processes so it does not share the router's GIL.

    python bench/serving.py                       # latency, throughput and router parts
    python bench/serving.py --part engine --model tiny --rate 8 --num-requests 200
    python bench/serving.py --part router --concurrency 250,500,1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log


@dataclass
class RequestSpec:
    prompt: list[int]
    max_tokens: int
    arrival_s: float  # offset from the start (open loop); 0 in closed loop


@dataclass
class RequestResult:
    ok: bool
    num_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itls_s: list[float] = field(default_factory=list)
    error: str = ""


def make_requests(n: int, *, rate: float, seed: int, prompt_range, output_range, vocab: int):
    rng = random.Random(seed)
    t = 0.0
    specs = []
    for _ in range(n):
        if rate != float("inf"):
            t += rng.expovariate(rate)
        prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(*prompt_range))]
        specs.append(RequestSpec(prompt, rng.randint(*output_range), t))
    return specs


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(name: str, results: list[RequestResult], elapsed: float) -> dict:
    ok = [r for r in results if r.ok]
    itls = [x for r in ok for x in r.itls_s]
    tokens = sum(r.num_tokens for r in ok)
    summary = {
        "system": name,
        "requests_ok": len(ok),
        "requests_failed": len(results) - len(ok),
        "seconds": elapsed,
        "request_throughput": len(ok) / elapsed,
        "output_tokens_per_s": tokens / elapsed,
    }
    for label, values in (
        ("ttft_ms", [r.ttft_s for r in ok]),
        ("itl_ms", itls),
        ("e2e_ms", [r.e2e_s for r in ok]),
    ):
        for p in (50, 90, 99):
            summary[f"{label}_p{p}"] = percentile(values, p) * 1000
    return summary


def print_summary(s: dict) -> None:
    print(
        f"{s['system']:<12} ok {s['requests_ok']:>5} fail {s['requests_failed']:>3}  "
        f"{s['request_throughput']:7.2f} req/s {s['output_tokens_per_s']:9.1f} tok/s  "
        f"TTFT p50/p90/p99 {s['ttft_ms_p50']:7.1f} {s['ttft_ms_p90']:7.1f} {s['ttft_ms_p99']:7.1f} ms  "
        f"ITL {s['itl_ms_p50']:6.1f} {s['itl_ms_p90']:6.1f} {s['itl_ms_p99']:6.1f} ms  "
        f"E2E {s['e2e_ms_p50']:7.0f} {s['e2e_ms_p90']:7.0f} {s['e2e_ms_p99']:7.0f} ms"
    )


# ---------------------------------------------------------------------- load generation


async def drive(
    specs: list[RequestSpec], send, *, concurrency: int | None
) -> tuple[list[RequestResult], float]:
    """Run every request through `send(spec) -> async iterator of token counts`."""
    start = time.perf_counter()
    gate = asyncio.Semaphore(concurrency) if concurrency else None

    async def one(spec: RequestSpec) -> RequestResult:
        if gate is None:
            # NOTE: open loop: latency counts from the scheduled arrival, so a sender that is
            # late (its loop was busy) does not hide queueing time (coordinated omission).
            sent = start + spec.arrival_s
            await asyncio.sleep(max(0.0, sent - time.perf_counter()))
        else:
            await gate.acquire()
            sent = time.perf_counter()
        result = RequestResult(ok=False)
        last = sent
        try:
            async for num_tokens in send(spec):
                now = time.perf_counter()
                if result.num_tokens == 0:
                    result.ttft_s = now - sent
                else:
                    result.itls_s.append(now - last)
                last = now
                result.num_tokens += num_tokens
            result.ok = True
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            if gate is not None:
                gate.release()
        result.e2e_s = time.perf_counter() - sent
        return result

    results = await asyncio.gather(*(one(s) for s in specs))
    return list(results), time.perf_counter() - start


async def run_in_process(
    model: str, specs, *, concurrency, options
) -> tuple[list[RequestResult], float]:
    """The engine in this process: one step loop, requests added as they arrive."""
    from kvray.cluster.config import EngineConfig
    from kvray.cluster.engine import EngineCore
    from kvray.cluster.tokenizer import load_tokenizer
    from kvray.workers.protocol import SamplingParams
    from kvray.workers.worker import ModelWorker

    config = EngineConfig.from_kwargs(model=model, **options)
    worker = ModelWorker(config.worker)
    info = worker.warmup()
    engine = EngineCore(info, config.scheduler, load_tokenizer(info.model))
    queues: dict[str, asyncio.Queue] = {}
    wake = asyncio.Event()

    async def step_loop() -> None:
        while True:
            if not engine.has_unfinished():
                wake.clear()
                await wake.wait()
            out = worker.step(engine.schedule())  # blocks the loop for one step, as LLM does
            for chunk in engine.process(out):
                queues[chunk.request_id].put_nowait(chunk)
            await asyncio.sleep(0)

    async def send(spec: RequestSpec):
        params = SamplingParams(temperature=0, max_tokens=spec.max_tokens, ignore_eos=True)
        request_id = engine.add_request(spec.prompt, params)
        queue = queues[request_id] = asyncio.Queue()
        wake.set()
        while True:
            chunk = await queue.get()
            yield len(chunk.token_ids)
            if chunk.finish_reason is not None:
                del queues[request_id]
                return

    loop_task = asyncio.create_task(step_loop())
    try:
        return await drive(specs, send, concurrency=concurrency)
    finally:
        loop_task.cancel()


async def run_against_server(
    target: str, specs, *, concurrency
) -> tuple[list[RequestResult], float]:
    from kvray.client import AsyncKvrayClient

    async with AsyncKvrayClient(target, max_retries=0) as client:

        async def send(spec: RequestSpec):
            async for chunk in client.stream(
                spec.prompt, temperature=0, max_tokens=spec.max_tokens, ignore_eos=True
            ):
                if chunk.token_ids:
                    yield len(chunk.token_ids)

        # Warm the connection and the replica once.
        await client.generate([1, 2, 3], max_tokens=2)
        return await drive(specs, send, concurrency=concurrency)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`kvray serve` in a subprocess (its own Ray), stopped with SIGTERM."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "kvray.cluster.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *args,
        ]
        log(f"starting: {' '.join(cmd[2:])}")
        self.proc = subprocess.Popen(
            cmd, env={**os.environ, **(env or {})}, stderr=subprocess.DEVNULL
        )
        self.target = f"127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        from kvray.client import KvrayClient

        with KvrayClient(self.target) as client:
            client.wait_until_serving(timeout=300)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---------------------------------------------------------------------- part 1


def engine_vs_cluster(args: argparse.Namespace) -> dict:
    if args.model == "smollm2-shape":
        from common import smollm2_135m_shaped

        args.model = str(smollm2_135m_shaped())
    specs = make_requests(
        args.num_requests,
        rate=args.rate,
        seed=args.seed,
        prompt_range=(16, 256),
        output_range=(16, 128),
        vocab=500,
    )
    concurrency = None if args.rate != float("inf") else args.max_concurrency
    options = {"max_model_len": 512, "max_num_seqs": 128, "max_num_batched_tokens": 2048}
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    log(f"in-process engine: {len(specs)} requests, rate {args.rate}/s, model {args.model}")
    results, elapsed = asyncio.run(
        run_in_process(args.model, specs, concurrency=concurrency, options=options)
    )
    local = summarize("in-process", results, elapsed)
    flags = ["--model", args.model, "--replicas", "1", "--max-model-len", "512", "--max-num-seqs", "128",
             "--cpus-per-replica", str(args.cpus_per_replica)]  # fmt: skip
    with ServerProcess(flags) as server:
        log("cluster: same requests over gRPC")
        results, elapsed = asyncio.run(
            run_against_server(server.target, specs, concurrency=concurrency)
        )
    remote = summarize("cluster", results, elapsed)
    print("\n## engine vs cluster (1 replica)")
    print_summary(local)
    print_summary(remote)
    ratio = remote["output_tokens_per_s"] / local["output_tokens_per_s"]
    added = remote["ttft_ms_p50"] - local["ttft_ms_p50"]
    print(
        f"cluster/in-process throughput: {ratio:.2f}x (target >= 0.9x: {'meets' if ratio >= 0.9 else 'MISSES'})"
    )
    print(
        f"TTFT p50 added by the cluster: {added:+.1f} ms (target <= 10 ms: {'meets' if added <= 10 else 'MISSES'})"
    )
    return {
        "in_process": local,
        "cluster": remote,
        "throughput_ratio": ratio,
        "added_ttft_p50_ms": added,
    }


# ---------------------------------------------------------------------- part 2


def _client_process(target: str, specs: list[RequestSpec], concurrency: int, out: mp.Queue) -> None:
    results, elapsed = asyncio.run(run_against_server(target, specs, concurrency=concurrency))
    out.put(([asdict(r) for r in results], elapsed))


def router_capacity(args: argparse.Namespace) -> dict:
    levels = [int(x) for x in args.concurrency.split(",")]
    rows = []
    env = {"KVRAY_FAKE_STEP_MS": str(args.fake_step_ms)}
    flags = ["--model", "fake", "--replicas", "1", "--max-num-seqs", str(max(levels)),
             "--max-queued-requests", str(4 * max(levels)), "--max-model-len", "4096"]  # fmt: skip
    with ServerProcess(flags, env=env) as server:
        for level in levels:
            per_proc = level // args.client_procs
            queue: mp.Queue = mp.Queue()
            procs = []
            for i in range(args.client_procs):
                specs = make_requests(
                    per_proc * 2, rate=float("inf"), seed=args.seed + i, prompt_range=(16, 16),
                    output_range=(args.fake_output_tokens, args.fake_output_tokens), vocab=500,
                )  # fmt: skip
                procs.append(
                    mp.Process(target=_client_process, args=(server.target, specs, per_proc, queue))
                )
            for p in procs:
                p.start()
            outputs = [queue.get(timeout=900) for _ in procs]
            for p in procs:
                p.join()
            results = [RequestResult(**r) for rs, _ in outputs for r in rs]
            elapsed = max(e for _, e in outputs)
            summary = summarize(f"{level} streams", results, elapsed)
            rows.append(summary)
            print_summary(summary)
    sustained = [r for r in rows if r["itl_ms_p99"] < 50 and r["requests_failed"] == 0]
    best = max(sustained, key=lambda r: r["output_tokens_per_s"], default=None)
    print(f"\n## router capacity (fake worker, step time {args.fake_step_ms:.0f} ms)")
    for r in rows:
        print_summary(r)
    if best:
        print(
            f"most sustained with p99 ITL < 50 ms: {best['system']}, {best['output_tokens_per_s']:.0f} tokens/s"
        )
    else:
        print("no level kept p99 ITL under 50 ms")
    return {"levels": rows}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=["all", "engine", "router"], default="all")
    parser.add_argument(
        "--model", default="tiny", help="tiny, smollm2-shape (random SmolLM2-135M shape) or a path"
    )
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument(
        "--rate", type=float, default=10.0, help="Poisson arrivals per second (inf: all at once)"
    )
    parser.add_argument(
        "--max-concurrency", type=int, default=64, help="closed loop when --rate inf"
    )
    parser.add_argument(
        "--cpus-per-replica",
        type=float,
        default=float(os.cpu_count() or 1),
        help="Ray CPUs (and torch threads) of the cluster's worker; default: as many as in-process",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="in-process engine's torch threads (default: torch's); match --cpus-per-replica "
        "to compare the serving layer alone",
    )
    parser.add_argument("--concurrency", default="100,250,500,1000", help="router part: streams")
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--fake-step-ms", type=float, default=20.0)
    parser.add_argument("--fake-output-tokens", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report = {}
    if args.part == "engine":
        report["engine_vs_cluster"] = engine_vs_cluster(args)
    if args.part == "all":
        # Added latency: the tiny model (3 ms steps) at a light open-loop load. The worker gets one
        # of the machine's CPUs so that the router and the load generator have the other, as a
        # router would have its own CPU in a deployment (on 2 cores they otherwise contend).
        latency = argparse.Namespace(
            **{**vars(args), "model": "tiny", "rate": 10.0, "num_requests": 200,
               "cpus_per_replica": 1.0}
        )  # fmt: skip
        report["latency"] = engine_vs_cluster(latency)
        # Throughput: a model whose steps dominate (SmolLM2-135M shape), closed loop.
        throughput = argparse.Namespace(
            **{**vars(args), "model": "smollm2-shape", "rate": float("inf"), "num_requests": 64,
               "max_concurrency": 32}
        )  # fmt: skip
        report["throughput"] = engine_vs_cluster(throughput)
    if args.part in ("all", "router"):
        report["router_capacity"] = router_capacity(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
