"""Device, dtype and memory queries: the only module in kvray that speaks `torch.cuda`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def is_cuda_available() -> bool:
    return torch.cuda.is_available()


def cuda_device_count() -> int:
    return torch.cuda.device_count()


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU. Raises ValueError for a device that is absent."""
    if name == "auto":
        return torch.device("cuda" if is_cuda_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not is_cuda_available():
        raise ValueError(f"device={name!r} was asked for but CUDA is not available")
    return device


def rank_device(device: torch.device, rank: int) -> torch.device:
    """The device of rank `rank` of a replica: a bare `cuda` becomes the rank's GPU among the
    visible ones (one each under Ray, which shows every rank only its own), made current for
    NCCL; an explicit index, and the CPU, stay as they are."""
    if device.type != "cuda":
        return device
    if device.index is None:
        device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def resolve_dtype(
    name: str, device: torch.device, *, checkpoint_dtype: torch.dtype | None = None
) -> torch.dtype:
    """`auto` is bf16 on GPUs that support it (fp16 otherwise). On CPU it is bf16 when the CPU
    multiplies bf16 in hardware and the checkpoint is bf16 or fp16 (as most released models
    are), else fp32: an fp32 checkpoint keeps the precision it was saved in."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        half = checkpoint_dtype in (torch.bfloat16, torch.float16)
        return torch.bfloat16 if half and cpu_has_native_bf16() else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}")
    return _DTYPES[name]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16; read from Linux's
    /proc/cpuinfo, False elsewhere): bf16 matmuls then run 2-4x as fast as fp32."""
    flags = cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from Linux's /proc/cpuinfo (empty where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    line = next((line for line in lines if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capture_graph(
    forward: Callable[[], torch.Tensor], device: torch.device, *, pool: Any = None
) -> tuple[Callable[[], torch.Tensor], Any]:
    """Capture `forward` as a CUDA graph on `device`: a function that replays it and returns the
    tensor it wrote (the same tensor every replay), and the graph's memory pool, which a later
    capture may share by passing it as `pool`. `forward` must have run once outside capture."""
    synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = forward()

    def replay() -> torch.Tensor:
        graph.replay()
        return output

    return replay, graph.pool()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak bytes allocated by torch on `device` since the last reset (0 on CPU)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def total_memory_bytes(device: torch.device) -> int:
    """Total memory of a GPU, or the machine's RAM for CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def used_memory_bytes(device: torch.device) -> int:
    """Bytes in use on the GPU by every process (what the driver reports), 0 on CPU."""
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
