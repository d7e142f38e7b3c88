"""Serving benchmark, in the style of `vllm bench serve`.

Three parts, one run:

1. engine-vs-cluster (run twice by default: added latency with the tiny model at 10 req/s, and
   throughput with a SmolLM2-135M-shaped model, closed loop at 32 streams): the same seeded
   requests (mixed prompt/output lengths) against
   (a) the in-process engine (EngineCore + ModelWorker in this process, no Ray, no gRPC) and
   (b) a `kvray serve` cluster with one replica, over gRPC; prints request throughput, output
   tokens/s, TTFT, inter-token latency (ITL) and end-to-end latency (p50/p90/p99) for both and
   the ratios: cluster throughput / in-process, and the TTFT the cluster adds (p50).
2. http-vs-grpc: the same requests through gRPC (kvray's client) and through the
   OpenAI-compatible HTTP API, with a bare SSE reader and with the `openai` client, on one
   cluster, alternating; prints each HTTP path's throughput ratio and added TTFT.
3. router-capacity: a cluster whose worker is a FakeWorker actor (no model, scripted tokens,
   a fixed step time) and closed-loop streams at rising concurrency, to find the most streams
   and tokens/s one router process sustains with p99 ITL under 50 ms. The load generator runs
   in its own processes so it does not share the router's GIL.

    python bench/serving.py                       # latency, throughput and router parts
    python bench/serving.py --quick               # the same parts, smaller (about 3 minutes)
    python bench/serving.py --part engine --model tiny --rate 8 --num-requests 200
    python bench/serving.py --part engine --model smollm2-shape --rate inf --num-requests 64 \
        --max-concurrency 32 --cpus-per-replica 1 --torch-threads 1 --decode-graphs on
    python bench/serving.py --part http --model tiny --rate 10 --num-requests 200
    python bench/serving.py --part router --concurrency 250,500,1000
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clients import run_against_openai, run_against_server, run_against_sse
from common import log
from load import RequestResult, RequestSpec, drive, make_requests, print_summary, summarize


async def run_in_process(
    model: str, specs, *, concurrency, options
) -> tuple[list[RequestResult], float]:
    """The engine in this process: a replica's StepLoop with the worker called in-process (no
    Ray, no gRPC), requests added as they arrive."""
    from kvray.cluster.engine import EngineCore
    from kvray.cluster.input_processor import InputProcessor
    from kvray.cluster.step_loop import StepLoop, in_process
    from kvray.cluster.tokenizer import load_tokenizer
    from kvray.workers.config import EngineConfig
    from kvray.workers.protocol import SamplingParams
    from kvray.workers.worker import ModelWorker

    config = EngineConfig.from_kwargs(model=model, **options)
    worker = ModelWorker(config)
    info = worker.warmup()
    processor = InputProcessor(info, load_tokenizer(info.model))
    engine = EngineCore(info, config.scheduler)
    queues: dict[str, asyncio.Queue] = {}

    def publish(chunks) -> None:
        for chunk in chunks:
            queues[chunk.request_id].put_nowait(chunk)

    # NOTE: no step in flight: in this process there is no round trip to hide.
    loop = StepLoop(engine, in_process(worker.step), on_chunks=publish, max_pipelined_step_s=0)
    ids = itertools.count()

    async def send(spec: RequestSpec):
        params = SamplingParams(temperature=0, max_tokens=spec.max_tokens, ignore_eos=True)
        request = processor.process(spec.prompt, params, f"req-{next(ids)}")
        queue = queues[request.request_id] = asyncio.Queue()
        engine.add(request)
        loop.wake()
        while True:
            chunk = await queue.get()
            yield len(chunk.token_ids)
            if chunk.finish_reason is not None:
                del queues[request.request_id]
                return

    loop_task = asyncio.create_task(loop.run())
    try:
        return await drive(specs, send, concurrency=concurrency)
    finally:
        loop_task.cancel()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`kvray serve` in a subprocess (its own Ray), stopped with SIGTERM."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port, self.http_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "kvray.cluster.cli", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--http-port", str(self.http_port), *args]  # fmt: skip
        log(f"starting: {' '.join(cmd[2:])}")
        self.proc = subprocess.Popen(
            cmd, env={**os.environ, **(env or {})}, stderr=subprocess.DEVNULL
        )
        self.target = f"127.0.0.1:{self.port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}/v1"

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
    options = {"max_model_len": 512, "max_num_seqs": 128, "max_num_batched_tokens": 2048,
               "dtype": args.dtype, "decode_graphs": args.decode_graphs}  # fmt: skip
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    log(f"in-process engine: {len(specs)} requests, rate {args.rate}/s, model {args.model}")
    results, elapsed = asyncio.run(
        run_in_process(args.model, specs, concurrency=concurrency, options=options)
    )
    local = summarize("in-process", results, elapsed)
    flags = ["--model", args.model, "--replicas", "1", "--max-model-len", "512", "--max-num-seqs", "128",
             "--cpus-per-replica", str(args.cpus_per_replica), "--dtype", args.dtype,
             "--decode-graphs", args.decode_graphs]  # fmt: skip
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


def http_vs_grpc(args: argparse.Namespace) -> dict:
    """The same seeded requests through gRPC and through the OpenAI HTTP API of one cluster,
    alternating (gRPC, HTTP, HTTP, gRPC) so that drift on a noisy machine cancels out."""
    specs = make_requests(
        args.num_requests, rate=args.rate, seed=args.seed, prompt_range=(16, 256),
        output_range=(16, 128), vocab=500,
    )  # fmt: skip
    concurrency = None if args.rate != float("inf") else args.max_concurrency
    flags = ["--model", args.model, "--replicas", "1", "--max-model-len", "512",
             "--cpus-per-replica", str(args.cpus_per_replica)]  # fmt: skip
    clients = {
        "gRPC": lambda server: run_against_server(server.target, specs, concurrency=concurrency),
        "HTTP-SSE": lambda server: run_against_sse(
            server.http_url, args.model, specs, concurrency=concurrency
        ),
        "HTTP-openai": lambda server: run_against_openai(
            server.http_url, args.model, specs, concurrency=concurrency
        ),
    }
    runs: dict[str, list[dict]] = {name: [] for name in clients}
    with ServerProcess(flags) as server:
        for name in [*clients, *reversed(clients)]:  # ABCCBA
            log(f"{name}: {len(specs)} requests, rate {args.rate}/s")
            results, elapsed = asyncio.run(clients[name](server))
            runs[name].append(summarize(name, results, elapsed))
    print(f"\n## HTTP (OpenAI API) vs gRPC, one cluster, model {args.model}")
    for summary in (s for name in clients for s in runs[name]):
        print_summary(summary)

    def mean(name: str, key: str) -> float:
        return sum(s[key] for s in runs[name]) / len(runs[name])

    report: dict = {"runs": runs}
    for name in ("HTTP-SSE", "HTTP-openai"):
        ratio = mean(name, "output_tokens_per_s") / mean("gRPC", "output_tokens_per_s")
        added = mean(name, "ttft_ms_p50") - mean("gRPC", "ttft_ms_p50")
        print(f"{name}/gRPC throughput: {ratio:.2f}x; TTFT p50 added: {added:+.1f} ms")
        report[name] = {"throughput_ratio": ratio, "added_ttft_p50_ms": added}
    return report


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
            # Failures by error (type and message), most common first.
            summary["errors"] = Counter(r.error for r in results if not r.ok).most_common()
            rows.append(summary)
            print_summary(summary)
            for error, count in summary["errors"][:3]:
                print(f"  {count} x {error}")
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
    parser.add_argument("--part", choices=["all", "engine", "http", "router"], default="all")
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
    parser.add_argument("--dtype", default="auto", help="engine part: the replica's dtype")
    parser.add_argument(
        "--decode-graphs", default="auto", help="engine part: the replica's decode_graphs"
    )
    parser.add_argument("--concurrency", default="100,250,500,1000", help="router part: streams")
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--fake-step-ms", type=float, default=20.0)
    parser.add_argument("--fake-output-tokens", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--quick", action="store_true", help="fewer requests and streams in every part"
    )
    args = parser.parse_args()
    scale = 0.5 if args.quick else 1.0
    if args.quick:
        args.concurrency, args.fake_output_tokens = "100,250", 60
    report = {}
    if args.part == "engine":
        report["engine_vs_cluster"] = engine_vs_cluster(args)
    if args.part == "http":
        report["http_vs_grpc"] = http_vs_grpc(args)
    if args.part == "all":
        # Added latency: the tiny model (3 ms steps) at a light open-loop load. The worker gets one
        # of the machine's CPUs so that the router and the load generator have the other, as a
        # router would have its own CPU in a deployment (on 2 cores they otherwise contend).
        latency = argparse.Namespace(
            **{**vars(args), "model": "tiny", "rate": 10.0, "num_requests": int(200 * scale),
               "cpus_per_replica": 1.0}
        )  # fmt: skip
        report["latency"] = engine_vs_cluster(latency)
        # Throughput: a model whose steps dominate (SmolLM2-135M shape), closed loop. Both
        # engines get the machine's CPUs but one: the router and the load generator have the
        # last, as a router has its own CPU in a deployment. (With the worker's torch threads on
        # every CPU, they contend with the router: on 2 cores and bf16, 0.59x instead of 0.95x.)
        engine_cpus = max(1, (os.cpu_count() or 2) - 1)
        throughput = argparse.Namespace(
            **{**vars(args), "model": "smollm2-shape", "rate": float("inf"),
               "num_requests": int(64 * scale), "max_concurrency": 32,
               "cpus_per_replica": float(engine_cpus), "torch_threads": engine_cpus}
        )  # fmt: skip
        report["throughput"] = engine_vs_cluster(throughput)
        # The OpenAI HTTP path against gRPC on one cluster: the tiny model at a light load.
        report["http_vs_grpc"] = http_vs_grpc(latency)
    if args.part in ("all", "router"):
        report["router_capacity"] = router_capacity(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
