"""Time to first token of a cold replica, with empty compile caches and again with them warm.

Each start is a fresh process: import, load the model and warm the worker up (sizing the KV
cache, building kvray's CPU kernels where bf16 on CPU or int8 uses them, a dummy forward, and
with `--decode-graphs on` compiling the decode step, one graph for every batch size), then one 129-token
request's first token.
The first start gets an empty `TORCH_EXTENSIONS_DIR` and `TORCHINDUCTOR_CACHE_DIR`, so it
compiles everything; the second reuses both, as every later start on the machine does.

    python bench/cold_start.py                                    # smollm2, bf16
    python bench/cold_start.py --model smollm2 --dtype bfloat16 --quantization int8
    python bench/cold_start.py --decode-graphs on --max-graph-batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = """
import json, sys, time
started = time.perf_counter()
from kvray import LLM, SamplingParams
imported = time.perf_counter()
llm = LLM(**json.loads(sys.argv[1]))  # load, then warmup: KV cache, kernels, a dummy forward
ready = time.perf_counter()
llm.generate([[1] + list(range(100, 228))], SamplingParams(temperature=0, max_tokens=1))
first = time.perf_counter()
print(json.dumps({"import_s": imported - started, "ready_s": ready - imported,
                  "first_token_s": first - ready, "total_s": first - started}))
"""


def start_once(options: dict, cache: str) -> dict:
    env = dict(
        os.environ,
        TORCH_EXTENSIONS_DIR=os.path.join(cache, "extensions"),
        TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
    )
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(options)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--decode-graphs", default="auto", help="auto, on or off")
    parser.add_argument("--max-graph-batch", type=int, default=None)
    args = parser.parse_args()
    options = {"model": args.model, "dtype": args.dtype, "max_model_len": 1024,
               "decode_graphs": args.decode_graphs, "max_graph_batch": args.max_graph_batch}  # fmt: skip
    if args.quantization:
        options["quantization"] = args.quantization
    print(f"{args.model}, {args.dtype}, quantization {args.quantization or 'none'}, "
          f"decode graphs {args.decode_graphs}")  # fmt: skip
    print(f"{'start':<22} {'import':>7} {'load+warmup':>11} {'1st token':>9} {'total':>7}")
    with tempfile.TemporaryDirectory(prefix="kvray-kernels-") as cache:
        for label in ("cold (empty cache)", "warm (cache reused)"):
            t = start_once(options, cache)
            print(f"{label:<22} {t['import_s']:>6.1f}s {t['ready_s']:>10.1f}s "
                  f"{t['first_token_s']:>8.2f}s {t['total_s']:>6.1f}s")  # fmt: skip


if __name__ == "__main__":
    main()
