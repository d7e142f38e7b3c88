"""Load generation for the serving benchmarks: seeded request specs, an open- or closed-loop
driver that times TTFT, inter-token latency and end-to-end latency, and the summary table."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field


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
