"""WorkerConfig: everything a ModelWorker needs to load a model and size its KV cache."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerConfig:
    model: str = "tiny"  # a built-in tiny model name, a local directory or a hub id
    revision: str | None = None
    trust_remote_code: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    block_size: int = 16  # tokens per KV block
    # KV cache size: an explicit block count wins; else a byte budget; else (GPU) a fraction
    # of the memory left after weights and a profiled peak forward; (CPU) `cpu_kv_cache_gib`,
    # but no more than `max_num_seqs` full-length sequences need.
    num_kv_blocks: int | None = None
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.90
    cpu_kv_cache_gib: float = 2.0
    max_model_len: int | None = None  # None: the model's own context length
    max_num_batched_tokens: int = 2048  # the largest step the worker is profiled for
    max_num_seqs: int = 128  # the most sequences one step holds (caps the CPU default cache)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(
                f"block_size must be a power of two in [1, 128], got {self.block_size}"
            )
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if not 0.05 <= self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in [0.05, 1.0], got {self.gpu_memory_utilization}"
            )
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
