"""The engine's settings: the model and its KV cache (`WorkerConfig`), the batch limits
(`SchedulerConfig`), and both together (`EngineConfig`), which the worker and the router's
scheduler share, so each limit is defined once.

Standard library only (and `checkpoints`' list of built-in model names, itself standard library
at import). Every field carries its help text (`setting`): `kvray serve` builds its
flags from it and the README's settings table lists the same keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvray.workers.checkpoints import builtin_models


def setting(default: Any, help: str) -> Any:
    """A config field with its help text (the `kvray serve` flag's)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class WorkerConfig:
    """What a ModelWorker loads and how it sizes its KV cache."""

    model: str = setting(
        "tiny",
        f"built-in name ({', '.join([*builtin_models(), 'fake'])}), local directory, hub id or "
        ".gguf file, which is converted once into cache_dir",
    )
    revision: str | None = setting(None, "model revision on the hub (branch, tag or commit)")
    trust_remote_code: bool = setting(False, "run Python code that ships with the model")
    device: str = setting("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    dtype: str = setting(
        "auto",
        "auto (bf16 on GPU; on a CPU with AMX or AVX512-BF16 bf16 for bf16/fp16 checkpoints; "
        "else fp32), float32, bfloat16 or float16",
    )
    quantization: str | None = setting(
        None,
        "int8: weight-only int8 linear layers (CPU): half bf16's bytes per decode step, "
        "faster for one or a few running sequences, slower for big batches; w8a8: int8 "
        "weights times activations rotated and quantized to int8 per token (CPU; AVX512-VNNI or "
        "AVX2): faster than int8, at a higher quality cost; default: none",
    )
    decode_graphs: str = setting(
        "auto",
        "decode steps replay a prepared forward: auto (on a GPU, a CUDA graph per padded batch "
        "size with the Triton paged kernel, bf16/fp16; off on CPU), on (on CPU too: one "
        "torch.compile for every batch size: a start then takes ~170 s on 2 cores, ~70 s with "
        "inductor's disk cache reused), off",
    )
    cpu_kernels: bool = setting(
        True,
        "kvray's C++ kernels on CPU (decode attention, bf16 and int8 layers, a decode step in "
        "one call), built with the machine's compiler on first use; false keeps torch's paths",
    )
    max_graph_batch: int | None = setting(
        None,
        "largest decode batch run as a replay; bigger ones run eagerly "
        "(default: max_num_seqs, at most 256 on a GPU)",
    )
    block_size: int = setting(16, "tokens per KV block (a power of two up to 128)")
    # KV cache size: an explicit block count wins; else a byte budget; else (GPU) a fraction
    # of the memory left after weights and a profiled peak forward; (CPU) `cpu_kv_cache_gib`,
    # but no more than `max_num_seqs` full-length sequences need.
    num_kv_blocks: int | None = setting(None, "KV blocks per replica (default: from memory)")
    kv_cache_bytes: int | None = setting(None, "KV cache bytes per replica (default: from memory)")
    gpu_memory_utilization: float = setting(
        0.90, "share of GPU memory for weights, activations and KV cache"
    )
    cpu_kv_cache_gib: float = setting(
        2.0,
        "CPU KV cache budget in GiB, an upper bound: capped at max_num_seqs full-length "
        "sequences, and a block's memory is resident only once a request has written it",
    )
    max_model_len: int | None = setting(
        None, "tokens per sequence, prompt + output (default: the model's context)"
    )
    seed: int = setting(0, "torch seed of each worker")
    tensor_parallel_size: int = setting(
        1,
        "worker processes one replica's layers are split over (one device each; Llama, Mistral, "
        "Qwen2 and Qwen3 only; attention heads split by GQA groups, unevenly where the ranks do "
        "not divide them)",
    )
    pipeline_parallel_size: int = setting(
        1,
        "pipeline stages one replica's layers are split over, contiguous layers each (a "
        "worker process each, or tensor_parallel_size of them; Llama, Mistral, Qwen2 and "
        "Qwen3 only; at most the model's number of layers)",
    )
    generation_config: str = setting(
        "auto",
        "auto: requests that leave temperature, top_k, top_p, min_p or repetition_penalty "
        "unset take the model's defaults (its generation_config.json; smollm2: greedy); "
        "none: they take the neutral values (temperature 1.0, no filters)",
    )

    def __post_init__(self) -> None:
        if self.generation_config not in ("auto", "none"):
            raise ValueError(
                f"generation_config must be auto or none, got {self.generation_config!r}"
            )
        if self.quantization is not None and self.quantization not in ("int8", "w8a8", "none"):
            raise ValueError(f"quantization must be int8, w8a8 or none, got {self.quantization!r}")
        if self.quantization == "none":
            object.__setattr__(self, "quantization", None)  # one spelling of "not quantized"
        if not isinstance(self.cpu_kernels, bool):  # NOTE: a string such as "false" is truthy
            raise TypeError(f"cpu_kernels must be True or False, got {self.cpu_kernels!r}")
        if self.decode_graphs not in ("auto", "on", "off"):
            raise ValueError(f"decode_graphs must be auto, on or off, got {self.decode_graphs!r}")
        if self.max_graph_batch is not None and self.max_graph_batch < 1:
            raise ValueError(f"max_graph_batch must be >= 1, got {self.max_graph_batch}")
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
        self._check_parallel()

    def _check_parallel(self) -> None:
        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        if tp < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
        if pp < 1:
            raise ValueError(f"pipeline_parallel_size must be >= 1, got {pp}")
        if self.world_size == 1:
            return
        sizes = f"tensor_parallel_size {tp} x pipeline_parallel_size {pp}"
        if self.decode_graphs == "on":
            raise ValueError(
                f"decode_graphs on does not run at {sizes} yet: leave decode_graphs at auto or "
                "off (decode steps then run eagerly)"
            )

    @property
    def world_size(self) -> int:
        """Worker processes per replica."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class SchedulerConfig:
    """How big a step may be. The worker profiles (and on CPU sizes its cache for) the same
    limits the scheduler builds steps within."""

    max_num_seqs: int = setting(128, "running sequences per replica")
    max_num_batched_tokens: int = setting(2048, "tokens per step (the scheduler's budget)")
    prefill_chunk_size: int | None = setting(
        None, "most prompt tokens one sequence computes per step (default: the budget)"
    )
    enable_prefix_caching: bool = setting(True, "reuse KV blocks of identical prompt prefixes")

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.prefill_chunk_size is not None and self.prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be >= 1, got {self.prefill_chunk_size}")


@dataclass(frozen=True)
class EngineConfig:
    """One replica's engine: its worker and its scheduler."""

    worker: WorkerConfig = field(default_factory=WorkerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache_dir: str | None = setting(
        None,
        "where built-in models are built and GGUF checkpoints converted: the tiny models, "
        "smollm2 when the hub is unreachable, --model x.gguf (default: ~/.cache/kvray)",
    )

    @classmethod
    def keys(cls) -> set[str]:
        """The flat keys `from_kwargs` takes."""
        return field_names(WorkerConfig) | field_names(SchedulerConfig) | {"cache_dir"}

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Split flat keyword arguments between WorkerConfig and SchedulerConfig.

        Raises:
            TypeError: an argument that no config has (the message lists the valid ones).
            ValueError: a value out of range (from the configs' own checks).
        """
        unknown = set(kwargs) - cls.keys()
        if unknown:
            valid = ", ".join(sorted(cls.keys()))
            raise TypeError(
                f"unknown engine option(s) {', '.join(sorted(unknown))}; valid: {valid}"
            )
        cache_dir = kwargs.get("cache_dir")
        return cls(
            WorkerConfig(**pick(kwargs, WorkerConfig)),
            SchedulerConfig(**pick(kwargs, SchedulerConfig)),
            None if cache_dir is None else str(cache_dir),
        )


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def pick(kwargs: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """The entries of `kwargs` that are fields of the dataclass `cls`."""
    names = field_names(cls)
    return {k: v for k, v in kwargs.items() if k in names}
