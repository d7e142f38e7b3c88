"""Shared benchmark helpers: the SmolLM2-135M-shaped random model, workloads, timing and memory."""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_CACHE = Path(os.path.expanduser("~/.cache/kvray/bench"))
SHAPED_VOCAB_SIZE = 49152  # SmolLM2's


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def smollm2_135m_shaped(out_dir: Path | None = None, *, seed: int = 0) -> Path:
    """A random-weight Llama with SmolLM2-135M's shape (30 layers, hidden 576, GQA 9/3) and a
    tokenizer of its vocabulary, built once."""
    out = out_dir or BENCH_CACHE / "smollm2-135m-shape-random"
    if not (out / "config.json").exists():
        _save_shaped_model(out, seed=seed)
    # NOTE: folders built before the model had a tokenizer get one; kvray loads the model's
    # tokenizer (and warns when there is none), as it would SmolLM2's own.
    if not (out / "tokenizer.json").exists():
        make_vocab_tokenizer(SHAPED_VOCAB_SIZE).save_pretrained(out)
    return out


def _save_shaped_model(out: Path, *, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    log(f"building a random SmolLM2-135M-shaped model into {out} (once)")
    config = LlamaConfig(
        vocab_size=SHAPED_VOCAB_SIZE,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=None,  # benchmarks run every request to its length
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)


def make_vocab_tokenizer(vocab_size: int) -> Any:
    """A tokenizer with one word per token id (`t0` ... `t{vocab_size - 1}`, space-separated),
    so that every id a random-weight model samples decodes to text. Built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int


def make_workload(
    name: str, num_requests: int, *, seed: int = 0, vocab_size: int = 49152
) -> list[BenchRequest]:
    """`uniform`: 128 prompt + 128 output tokens; `mixed`: prompts 16-512, outputs 16-256
    (seeded); `single`: 128 prompt + 256 output tokens (one stream's decode speed)."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(num_requests):
        if name == "uniform":
            prompt_len, out_len = 128, 128
        elif name == "mixed":
            prompt_len, out_len = rng.randint(16, 512), rng.randint(16, 256)
        elif name == "single":
            prompt_len, out_len = 128, 256
        else:
            raise ValueError(f"workload must be uniform, mixed or single, got {name!r}")
        prompt = [rng.randrange(2, vocab_size) for _ in range(prompt_len)]
        reqs.append(BenchRequest(prompt, out_len))
    return reqs


class PeakMemory:
    """Peak resident memory of this process (sampled) and, on CUDA, peak allocated GPU memory."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss_bytes() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self.rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        from kvray.workers import device

        self._device = None
        import torch

        if torch.cuda.is_available():
            self._device = torch.device("cuda")
            device.reset_peak_memory(self._device)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self.rss_bytes())
        from kvray.workers import device

        self.peak_gpu = device.peak_memory_bytes(self._device) if self._device is not None else 0


@contextmanager
def timed() -> object:
    box = {"s": 0.0}
    start = time.perf_counter()
    yield box
    box["s"] = time.perf_counter() - start


def median_seconds(fn: Callable[[], object], reps: int = 30) -> float:
    """The median time of `fn()` over `reps` calls, after three untimed ones."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@dataclass(frozen=True)
class HardwareLimits:
    """What this machine can do, measured in the benchmark's own run (these machines are noisy)."""

    matmul_flops: float  # FLOP/s of one large matmul in the benchmark's dtype, all cores
    read_bytes: float  # bytes/s of one pass over a 1 GiB fp32 tensor


def measure_limits(dtype: str, device: str) -> HardwareLimits:
    import torch

    from kvray.workers import device as devices

    dev = devices.resolve_device(device)
    dt = devices.resolve_dtype(dtype, dev, checkpoint_dtype=torch.bfloat16)

    def best_of(fn, reps: int = 10) -> float:
        # NOTE: half a second of warm-up, not one call, and the best of 10: on an AMX Xeon VM
        # one 2048^3 bf16 matmul's rate moved between 450 and 2,400 GFLOP/s from call to call
        # and from second to second (a busy neighbour on the same core's tile unit, it seems)
        warm = time.perf_counter() + 0.5
        while time.perf_counter() < warm:
            fn()
        devices.synchronize(dev)
        times = []
        for _ in range(reps):
            devices.synchronize(dev)
            start = time.perf_counter()
            fn()
            devices.synchronize(dev)
            times.append(time.perf_counter() - start)
        return min(times)

    n = 4096 if dev.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=dev).to(dt), torch.randn(n, n, device=dev).to(dt)
    flops = 2 * n**3 / best_of(lambda: torch.mm(a, b))
    data = torch.ones(2**28, dtype=torch.float32, device=dev)  # fp32: see read_bandwidth
    read = data.numel() * data.element_size() / best_of(data.sum)
    return HardwareLimits(matmul_flops=flops, read_bytes=read)


def read_bandwidth(nbytes: int = 2**30) -> float:
    """Bytes per second one pass over `nbytes` of fp32 on CPU reads (all cores, median of 5).

    fp32, not bf16: a bf16 sum widens every element and is compute-bound on some CPUs (an AMX
    Xeon VM: 13.9 GB/s in bf16, 19.9 in fp32, over the same 1 GiB)."""
    import torch

    data = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / median_seconds(data.sum, reps=5)


def linear_weight_count(model_dir: Path) -> int:
    """Weights a token is multiplied by: every linear layer, the output layer included (tied or
    not). Two FLOPs each per token; read once per decode step."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
