"""Resident memory of one offline kvray engine on the real SmolLM2-135M-Instruct, phase by phase.

Each configuration runs in a fresh process, which reports its resident memory (VmRSS) and the
peak of each phase (VmHWM, reset between phases) from /proc/self/status after: the imports
(torch, transformers, then kvray), resolving the checkpoint (building or converting it the
first time), `from_pretrained`, fusing the sibling projections, packing or quantizing the
linear layers, the rest of the worker's load, allocating the KV cache, the dummy forward
(and decode graphs where built), the structured-output engine, the router's tokenizer and
engine, the first requests (W1-like: 32 x 128 + 128 tokens, greedy) and after the requests.
It ends with where the bytes are: weights, KV cache (allocated; resident where the pages
have been written), what glibc's malloc holds free, the imports and the rest.

    python bench/memory.py                            # bf16, int8 and the dtype `auto` picks
    python bench/memory.py --configs bf16 --requests 8
    python bench/memory.py --baseline-tree /tmp/old   # the same configurations on other code
                                                      # (e.g. `git archive HEAD~3 | tar -x`)

Engine settings are kvray's defaults but the dtype and quantization (`--set key=value`
overrides any, e.g. `--set cpu_kv_cache_gib=2`). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CONFIGS = {
    "bf16": {"dtype": "bfloat16"},
    "int8": {"dtype": "bfloat16", "quantization": "int8"},
    "auto": {},
}
MIB = 2**20


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak() -> None:
    """Restart VmHWM from the current RSS (Linux's clear_refs 5); a no-op where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def malloc_free_bytes() -> int:
    """Bytes glibc's malloc holds free in its arenas (mallinfo2's fordblks); 0 elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        info = libc.mallinfo2
    except (OSError, AttributeError):
        return 0
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in names.split()]

    info.restype = MallInfo2
    return int(info().fordblks)


def resident_bytes(tensor: Any) -> int:
    """Bytes of `tensor`'s storage in pages this process has written (present and its own in
    /proc/self/pagemap: a page only read maps the kernel's shared zero page, which RSS does
    not count and mincore(2) would)."""
    storage = tensor.untyped_storage()
    page = os.sysconf("SC_PAGE_SIZE")
    first = storage.data_ptr() // page
    last = (storage.data_ptr() + storage.nbytes() - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = f.read((last - first + 1) * 8)
    present, exclusive = 1 << 63, 1 << 56
    count = sum(
        1 for (entry,) in struct.iter_unpack("<Q", entries) if entry & present and entry & exclusive
    )
    return min(storage.nbytes(), count * page)


class Phases:
    """Marks: (phase, RSS after it, peak RSS during it, anonymous, file-backed)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        reset_peak()

    def mark(self, phase: str) -> None:
        status = proc_status()
        self.rows.append({"phase": phase, "rss": status["VmRSS"], "peak": status["VmHWM"],
                          "anon": status["RssAnon"], "file": status["RssFile"]})  # fmt: skip
        reset_peak()

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        """Mark `phase` each time `owner.name` returns (where `owner` has it: older code may
        not). Marks the phase that ran before the call first, so the call's own peak is its."""
        original = getattr(owner, name, None)
        if original is None:
            return

        def marked(*args: Any, **kwargs: Any) -> Any:
            self.mark(f"  (before {phase})")
            result = original(*args, **kwargs)
            self.mark(phase)
            return result

        setattr(owner, name, marked)


def storage(t: Any) -> tuple[int, int]:
    """(an id of `t`'s storage, its bytes). NOTE: oneDNN's packed weights (AMX CPUs) are opaque
    tensors without a storage to read: counted by their own size."""
    if t.is_mkldnn:
        return id(t), t.numel() * t.element_size()
    return t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()


def child(options: dict[str, Any], num_requests: int) -> dict[str, Any]:
    """One engine's phases (run in a fresh process)."""
    phases = Phases()
    import torch
    import transformers

    phases.mark("import torch, transformers")
    from kvray import LLM, SamplingParams
    from kvray.workers import worker

    phases.mark("import kvray")
    imported = phases.rows[-1]["rss"]
    phases.wrap(worker, "resolve_model", "resolve checkpoint")
    phases.wrap(transformers.AutoModelForCausalLM, "from_pretrained", "from_pretrained")
    phases.wrap(worker, "fuse_projections", "fuse projections")
    phases.wrap(worker, "quantize_linears", "quantize int8")
    phases.wrap(worker, "pack_linears", "pack bf16")
    phases.wrap(worker.ModelWorker, "__init__", "worker loaded")
    phases.wrap(worker, "KVCache", "KV cache")
    phases.wrap(worker.ModelWorker, "_run_dummy_forward", "dummy forward")
    phases.wrap(worker.ModelWorker, "_build_decode_graphs", "decode graphs")
    phases.wrap(worker.ModelWorker, "_load_grammars", "grammars")
    start = time.perf_counter()
    llm = LLM("smollm2", **options)
    phases.mark("tokenizer, engine")
    ready_s = time.perf_counter() - start
    import random

    rng = random.Random(0)
    prompts = [[rng.randrange(2, 49152) for _ in range(128)] for _ in range(num_requests)]
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts, params)
    phases.mark(f"{num_requests} requests x 128+128")
    requests_s = time.perf_counter() - start
    model = llm.worker.model
    tensors = dict(map(storage, [*model.parameters(), *model.buffers()]))
    kv_cache = llm.worker.kv_cache
    return {
        "phases": phases.rows,
        "imports": imported,
        "weights": sum(tensors.values()),
        "kv_cache": kv_cache.num_bytes,
        "kv_resident": sum(resident_bytes(t) for layer in kv_cache.layers for t in layer),
        "num_kv_blocks": kv_cache.num_blocks,
        "dtype": str(llm.worker.dtype),
        "malloc_free": malloc_free_bytes(),
        "threads": torch.get_num_threads(),
        "ready_s": ready_s,
        "requests_s": requests_s,
    }


def run_child(options: dict[str, Any], num_requests: int, tree: str | None) -> dict[str, Any]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([tree, env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(options), "--requests", str(num_requests)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"the engine's process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_phases(label: str, runs: dict[str, dict[str, Any]]) -> None:
    """One table: a row per phase, RSS and peak MiB per run."""
    names = list(runs)
    print(f"\n## {label}")
    print(f"{'phase':<28}" + "".join(f" {n + ' RSS':>14} {'peak':>7}" for n in names))
    order = [row["phase"] for row in max(runs.values(), key=lambda r: len(r["phases"]))["phases"]]
    for phase in order:
        cells = []
        for run in runs.values():
            row = next((r for r in run["phases"] if r["phase"] == phase), None)
            cells.append(f" {'-':>14} {'-':>7}" if row is None else
                         f" {row['rss'] / MIB:>14.0f} {row['peak'] / MIB:>7.0f}")  # fmt: skip
        if not phase.startswith("  ") or any("-" not in c for c in cells):
            print(f"{phase:<28}" + "".join(cells))
    print(f"{'peak of the whole run':<28}"
          + "".join(f" {max(r['peak'] for r in run['phases']) / MIB:>22.0f}"
                    for run in runs.values()))  # fmt: skip


def print_breakdown(runs: dict[str, dict[str, Any]]) -> None:
    """Where the resident bytes are after the requests (MiB)."""
    names = list(runs)
    print(f"\n{'after the requests (MiB)':<28}" + "".join(f" {n:>22}" for n in names))

    def row(label: str, values: list[float | None]) -> None:
        cells = "".join(f" {'-':>22}" if v is None else f" {v / MIB:>22.0f}" for v in values)
        print(f"{label:<28}{cells}")

    rss = [run["phases"][-1]["rss"] for run in runs.values()]
    kv = [r["kv_resident"] for r in runs.values()]
    parts = {
        "resident": rss,
        "  imports (torch, kvray)": [r["imports"] for r in runs.values()],
        "  weights": [r["weights"] for r in runs.values()],
        "  KV cache, resident": kv,
        "  malloc's free bytes": [r["malloc_free"] for r in runs.values()],
    }
    for label, values in parts.items():
        row(label, values)
    rest = [total - sum(values[i] for values in list(parts.values())[1:])
            for i, total in enumerate(rss)]  # fmt: skip
    row("  rest", rest)
    row("KV cache, allocated", [r["kv_cache"] for r in runs.values()])
    print(f"{'KV blocks, dtype':<28}"
          + "".join(f" {str(r['num_kv_blocks']) + ', ' + r['dtype'][6:]:>22}"
                    for r in runs.values()))  # fmt: skip
    print(
        f"{'load+warmup s, requests s':<28}"
        + "".join(f" {r['ready_s']:>13.1f}, {r['requests_s']:>6.1f}" for r in runs.values())
    )


def parse_sets(items: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        options[key] = json.loads(value) if value[:1] in "0123456789-[{tfn" else value
    return options


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default=",".join(CONFIGS), help="of " + ", ".join(CONFIGS))
    parser.add_argument("--requests", type=int, default=32, help="W1-like requests (128+128)")
    parser.add_argument("--set", action="append", default=[], help="engine option key=value")
    parser.add_argument("--baseline-tree", default=None,
                        help="a checkout of other kvray code to run the same configurations on")  # fmt: skip
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child), args.requests)))
        return
    extra = parse_sets(args.set)
    trees = {"": None} if args.baseline_tree is None else {"old ": args.baseline_tree, "": None}
    for name in args.configs.split(","):
        runs = {}
        for prefix, tree in trees.items():
            runs[prefix + name] = run_child({**CONFIGS[name], **extra}, args.requests, tree)
        print_phases(f"{name}: {CONFIGS[name] or 'defaults'} {extra or ''}", runs)
        print_breakdown(runs)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
