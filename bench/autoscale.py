"""Autoscaling under a bursty load: replay a seeded arrival trace against `kvray serve` with
autoscaling on, and print over time the offered load, replicas, queue depth and p90 TTFT, plus
a PNG plot; then how fast capacity followed the burst and what draining cost.

    python bench/autoscale.py                       # tiny model, ~2 minutes
    python bench/autoscale.py --plot autoscale.png --max-replicas 3
    python bench/autoscale.py --compare             # vs rebalancing off, in ABBA order: ~7 minutes
    # replicas that do not share the CPU (fake steps sleep 20 ms), a 3 s burst: docs/adr/0003
    python bench/autoscale.py --model fake --compare --base-rate 1 \
        --target-ongoing-requests 8 --burst-rate 40 --burst-s 3

The trace: `--base-rate` req/s, then a burst of `--burst-rate` req/s for `--burst-s`, then the
base rate again until the cluster has drained back to its minimum (or `--tail-s` passes).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log
from load import percentile
from serving import ServerProcess


@dataclass
class Sample:
    t: float
    ready: int
    total: int
    queued: int
    running: int


@dataclass
class Outcome:
    arrival: float
    ttft: float | None = None
    done: float | None = None  # seconds since the start, when the last token came
    ok: bool = False
    error: str = ""


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    decisions: list = field(default_factory=list)
    num_moved: int = 0  # continued elsewhere (recomputed) after a failure or drain timeout
    num_rebalanced: int = 0  # queued requests moved before they started


def make_trace(args: argparse.Namespace) -> list[float]:
    rng = random.Random(args.seed)
    t, times = 0.0, []
    phases = [
        (args.lead_s, args.base_rate),
        (args.burst_s, args.burst_rate),
        (args.tail_s, args.base_rate),
    ]
    start = 0.0
    for length, rate in phases:
        t = start
        while True:
            t += rng.expovariate(rate)
            if t >= start + length:
                break
            times.append(t)
        start += length
    return times


def monitor(target: str, run: Run, start: float, stop: threading.Event) -> None:
    from kvray.client import KvrayClient

    with KvrayClient(target) as client:
        while not stop.is_set():
            st = client.status()
            ready = sum(r.state == "READY" for r in st.replicas)
            queued = st.queue_depth + sum(r.num_waiting for r in st.replicas)
            run.samples.append(
                Sample(time.monotonic() - start, ready, len(st.replicas), queued, st.num_running)
            )
            run.decisions = st.recent_decisions
            run.num_moved, run.num_rebalanced = st.num_moved_requests, st.num_rebalanced_requests
            stop.wait(0.5)


async def replay(target: str, arrivals: list[float], args, run: Run, start: float) -> None:
    from kvray.client import AsyncKvrayClient

    rng = random.Random(args.seed + 1)
    async with AsyncKvrayClient(target, max_retries=0) as client:

        async def one(at: float) -> None:
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            outcome = Outcome(arrival=at)
            run.outcomes.append(outcome)
            prompt = [rng.randrange(1, 500) for _ in range(rng.randint(16, 128))]
            try:
                async for chunk in client.stream(
                    prompt, temperature=0, max_tokens=args.output_tokens, ignore_eos=True
                ):
                    if outcome.ttft is None and chunk.token_ids:
                        outcome.ttft = time.monotonic() - start - at
                outcome.ok = True
                outcome.done = time.monotonic() - start
            except Exception as exc:
                outcome.error = f"{type(exc).__name__}: {exc}"

        await asyncio.gather(*(one(a) for a in arrivals))


def report(run: Run, args, arrivals: list[float]) -> None:
    burst_start, burst_end = args.lead_s, args.lead_s + args.burst_s
    print(
        f"\n{'t(s)':>5} {'offered/s':>9} {'ready':>5} {'total':>5} {'queued':>6} {'running':>7} {'TTFT p90 ms':>11}"
    )
    end = max(s.t for s in run.samples)
    for t0 in range(0, int(end) + 1, args.bucket_s):
        window = [s for s in run.samples if t0 <= s.t < t0 + args.bucket_s]
        if not window:
            continue
        offered = sum(1 for a in arrivals if t0 <= a < t0 + args.bucket_s) / args.bucket_s
        ttfts = [
            o.ttft
            for o in run.outcomes
            if o.ttft is not None and t0 <= o.arrival < t0 + args.bucket_s
        ]
        p90 = percentile(ttfts, 90) * 1000 if ttfts else float("nan")
        last = window[-1]
        print(
            f"{t0:>5} {offered:>9.1f} {last.ready:>5} {last.total:>5} {max(s.queued for s in window):>6} {last.running:>7} {p90:>11.0f}"
        )
    failed = [o for o in run.outcomes if not o.ok]
    min_ready = min(s.ready for s in run.samples if s.t < burst_start) if burst_start else 1
    grown = next((s.t for s in run.samples if s.t >= burst_start and s.ready > min_ready), None)
    shrunk = next((s.t for s in run.samples if s.t >= burst_end and s.total <= min_ready), None)
    print(
        f"\nrequests: {len(run.outcomes)}, failed: {len(failed)}"
        + (f" (first: {failed[0].error})" if failed else "")
    )
    if grown is not None:
        print(
            f"capacity followed the burst: a new replica was READY {grown - burst_start:.1f}s after it began"
        )
    else:
        print("no replica was added during the burst")
    if shrunk is not None:
        print(
            f"back to {min_ready} replica(s) {shrunk - burst_end:.1f}s after the burst ended (downscale delay + drain)"
        )
    during = [
        o.ttft for o in run.outcomes if o.ttft is not None and burst_start <= o.arrival < burst_end
    ]
    after = [o.ttft for o in run.outcomes if o.ttft is not None and o.arrival >= burst_end]
    print(
        f"TTFT p90 during the burst {percentile(during, 90) * 1000:.0f} ms, after it {percentile(after, 90) * 1000:.0f} ms"
    )
    print(
        f"queued requests rebalanced: {run.num_rebalanced}; requests recomputed elsewhere after a "
        f"drain timeout or failure: {run.num_moved}"
    )
    for d in run.decisions:
        print(f"  decision {d.from_replicas} -> {d.to_replicas}: {d.reason}")


def plot(run: Run, args, arrivals: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(9, 9), sharex=True)
    t = [s.t for s in run.samples]
    axes[0].hist(arrivals, bins=range(0, int(max(t)) + 2), color="tab:gray")
    axes[0].set_ylabel("offered req/s")
    axes[1].step(t, [s.ready for s in run.samples], where="post", label="ready")
    axes[1].step(t, [s.total for s in run.samples], where="post", label="total", linestyle="--")
    axes[1].set_ylabel("replicas")
    axes[1].legend(loc="upper right")
    axes[2].plot(t, [s.queued for s in run.samples], color="tab:orange")
    axes[2].set_ylabel("queued")
    done = [o for o in run.outcomes if o.ttft is not None]
    axes[3].scatter([o.arrival for o in done], [o.ttft * 1000 for o in done], s=4)
    axes[3].set_ylabel("TTFT ms")
    axes[3].set_xlabel("seconds")
    for ax in axes:
        ax.axvspan(args.lead_s, args.lead_s + args.burst_s, color="tab:red", alpha=0.08)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"plot written to {path}")


def burst_summary(run: Run, args) -> dict[str, float]:
    """What the burst cost: refusals, TTFT of requests that arrived during it, backlog drain."""
    burst_start, burst_end = args.lead_s, args.lead_s + args.burst_s
    during = [
        o.ttft for o in run.outcomes if o.ttft is not None and burst_start <= o.arrival < burst_end
    ]
    empty = next(
        (s.t for s in run.samples if s.t >= burst_end and s.queued == 0 and s.running <= 2),
        float("nan"),
    )
    finished = [o for o in run.outcomes if o.done is not None and burst_start <= o.done < burst_end]
    return {
        "finished in the burst (req/s)": len(finished) / args.burst_s,
        "failed requests": sum(not o.ok for o in run.outcomes),
        "burst TTFT p50 (ms)": percentile(during, 50) * 1000,
        "burst TTFT p90 (ms)": percentile(during, 90) * 1000,
        "burst TTFT max (ms)": max(during) * 1000,
        "backlog gone after burst (s)": empty - burst_end,
    }


def run_trace(args, arrivals: list[float], extra_env: dict[str, str]) -> Run:
    flags = ["--model", args.model, "--replicas", "1", "--min-replicas", "1", "--max-replicas", str(args.max_replicas),
             "--target-ongoing-requests", str(args.target_ongoing_requests), "--upscale-delay-s", "2",
             "--downscale-delay-s", "10",
             "--max-num-seqs", "16", "--cpus-per-replica", "1"]  # fmt: skip
    run = Run()
    with ServerProcess(flags, env={"KVRAY_METRICS_INTERVAL_S": "0.5", **extra_env}) as server:
        stop = threading.Event()
        start = time.monotonic()
        watcher = threading.Thread(
            target=monitor, args=(server.target, run, start, stop), daemon=True
        )
        watcher.start()
        asyncio.run(replay(server.target, arrivals, args, run, start))
        while time.monotonic() - start < args.lead_s + args.burst_s + args.tail_s:
            time.sleep(0.5)
        stop.set()
        watcher.join()
    return run


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--base-rate", type=float, default=2.0)
    parser.add_argument("--burst-rate", type=float, default=50.0)
    parser.add_argument("--lead-s", type=float, default=10.0)
    parser.add_argument("--burst-s", type=float, default=25.0)
    parser.add_argument("--tail-s", type=float, default=45.0)
    parser.add_argument("--output-tokens", type=int, default=96)
    parser.add_argument("--target-ongoing-requests", type=float, default=4.0)
    parser.add_argument("--max-replicas", type=int, default=2)
    parser.add_argument("--bucket-s", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=Path("bench/results/autoscale.png"))
    parser.add_argument(
        "--compare",
        action="store_true",
        help="replay the trace again with rebalancing off (rebalance_period_s=0) as the baseline",
    )
    args = parser.parse_args()
    arrivals = make_trace(args)
    log(f"{len(arrivals)} requests over {args.lead_s + args.burst_s + args.tail_s:.0f}s")
    run = run_trace(args, arrivals, {})
    report(run, args, arrivals)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(run, args, arrivals, args.plot)
    if args.compare:
        # ABBA order (on, off, off, on), so drift in the machine's speed hits both alike.
        log("the same trace with rebalancing off (the baseline), twice, then on again")
        off = {"KVRAY_REBALANCE_PERIOD_S": "0"}
        runs = {"rebalancing": [run], "off": []}
        runs["off"] += [run_trace(args, arrivals, off), run_trace(args, arrivals, off)]
        runs["rebalancing"].append(run_trace(args, arrivals, {}))
        summaries = {name: [burst_summary(r, args) for r in pair] for name, pair in runs.items()}
        for name, pair in runs.items():
            for r in pair:
                grown = next((s.t for s in r.samples if s.ready > 1), float("nan"))
                print(
                    f"{name}: second replica READY {grown - args.lead_s:.1f}s into the burst, "
                    f"queue peak {max(s.queued for s in r.samples)}"
                )
        print(f"\n{'':<30} {'rebalancing (2 runs)':>22} {'off (2 runs)':>18} {'ratio':>7}")
        for key in summaries["rebalancing"][0]:
            ours = [s[key] for s in summaries["rebalancing"]]
            theirs = [s[key] for s in summaries["off"]]
            ratio = sum(ours) / sum(theirs) if sum(theirs) else float("nan")
            print(
                f"{key:<30} {ours[0]:>10.1f} {ours[1]:>10.1f}  {theirs[0]:>8.1f} {theirs[1]:>8.1f} {ratio:>7.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
