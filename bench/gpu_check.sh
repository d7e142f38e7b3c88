#!/usr/bin/env bash
# The prepared GPU check, for a lent GPU machine whose python3 already has torch and
# transformers (it cannot download). About 6 minutes on one H100:
#   1. install kvray without dependencies (editable, no network);
#   2. the CUDA tests (fp32 greedy parity for three architectures, bf16 defaults, KV sizing,
#      kvray's Llama-family forward bitwise transformers', kvray's own model layer (the one
#      tensor parallelism shards) against transformers, variable-length prompt attention);
#   3. a prompt step of 32 prompts and a mixed step, each under kvray's prompt path, one SDPA
#      per prompt and transformers' forward (bench/prompt_step.py);
#   4. the engine benchmark on CUDA (bf16, the SmolLM2-135M-shaped model, 32 requests): W2 (one
#      stream), W1 and W3, kvray (decode steps as CUDA graphs) and kvray-eager against HF static
#      batch and transformers' continuous batching, each kvray figure also as a share of the HBM
#      bandwidth / matmul FLOP/s measured in the run.
# Usage (from the repository root): bench/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
tests=0  # NOTE: the benchmarks run even after a failed test; the script's status reports it
python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.txt" || tests=$?
python3 bench/prompt_step.py --device cuda --dtype bfloat16 2>&1 | grep -v "Loading weights" \
  | tee "$out/gpu_prompt_step.txt"
python3 bench/engine_throughput.py --device cuda --dtype bfloat16 --num-requests 32 \
  --workloads single,uniform,mixed --systems kvray,kvray-eager,hf-static,hf-cb \
  --json "$out/gpu_engine.json" 2>&1 | grep -v "Loading weights" | tee "$out/gpu_engine.txt"
exit $tests
