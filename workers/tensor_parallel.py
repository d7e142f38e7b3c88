"""One rank of a tensor-parallel replica: joining its group and loading its shard of kvray's
own model (`workers/models`).

`ModelWorker` calls these only at `tensor_parallel_size` > 1; at 1 it loads transformers'
modules as before. Nothing here knows about Ray or processes: the group's rendezvous address
(`init_method`) comes from whoever started the ranks.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from kvray.workers.config import WorkerConfig
from kvray.workers.models import CausalLM, load_model, model_class
from kvray.workers.models.layers import Placement
from kvray.workers.models.loader import checkpoint_weights
from kvray.workers.models.parallel import ParallelContext, init_process_group

logger = logging.getLogger(__name__)


def join_group(
    *, rank: int, world_size: int, init_method: str | None, device: torch.device
) -> ParallelContext:
    """Join this process to its replica's group (gloo on CPU, NCCL on GPUs). Blocks until all
    `world_size` ranks have joined.

    Raises:
        ValueError: no `init_method`, or a rank outside [0, world_size).
    """
    if init_method is None:
        raise ValueError(
            f"tensor_parallel_size {world_size} needs a group address for its ranks: start the "
            "replica through kvray (LLM or kvray serve), which gives every rank one"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a group of {world_size}")
    logger.info("rank %d of %d: joining %s (%s)", rank, world_size, init_method, device)
    start = time.perf_counter()
    group = init_process_group(
        rank=rank, world_size=world_size, init_method=init_method, device=device
    )
    logger.info(
        "rank %d: group of %d joined in %.1fs", rank, world_size, time.perf_counter() - start
    )
    return group


def load_rank_model(
    model_path: str,
    config: WorkerConfig,
    *,
    parallel: ParallelContext,
    dtype: torch.dtype,
    device: torch.device,
) -> CausalLM:
    """This rank's shard of kvray's own model of the checkpoint at `model_path` (a folder or a
    hub id), in plain torch (no fused, packed or quantized layers).

    Raises:
        ValueError: an architecture kvray has no model of, or sizes the group cannot split,
            each naming tensor_parallel_size.
    """
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(
        model_path, revision=config.revision, trust_remote_code=config.trust_remote_code
    )
    model_class(hf_config.model_type, tensor_parallel_size=parallel.world_size)  # refuses early
    start = time.perf_counter()
    folder = checkpoint_folder(model_path, revision=config.revision)
    placement = Placement(parallel, dtype, device)
    model = load_model(hf_config, checkpoint_weights(folder), placement)
    logger.info(
        "rank %d: loaded its shard of %s in %.1fs",
        parallel.rank,
        model_path,
        time.perf_counter() - start,
    )
    return model


def check_splits(model_path: str, config: WorkerConfig) -> None:
    """Refuse, before any rank starts, a model tensor_parallel_size cannot split: build one
    rank's model on the meta device (shapes only: nothing allocated, nothing read).

    Raises:
        ValueError: an architecture kvray has no model of, or sizes that do not split, each
            naming tensor_parallel_size.
    """
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(
        model_path, revision=config.revision, trust_remote_code=config.trust_remote_code
    )
    size = config.tensor_parallel_size
    cls = model_class(hf_config.model_type, tensor_parallel_size=size)
    if cls is not None:
        cls(hf_config, Placement(_ShapesOnly(size), torch.float32, torch.device("meta")))


class _ShapesOnly:
    """Rank 0 of `world_size`, for building a model's shapes: no collective may run."""

    rank = 0

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("no collective while checking shapes")

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        raise AssertionError("no collective while checking shapes")


def checkpoint_folder(model_path: str, *, revision: str | None) -> Path:
    """The local folder of a checkpoint: `model_path` itself, or a hub id's snapshot (its
    weights and configs; downloaded unless the hub cache has them)."""
    path = Path(model_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.safetensors", "*.json", "pytorch_model*.bin"]
    return Path(snapshot_download(model_path, revision=revision, allow_patterns=patterns))


def smallest_over_ranks(parallel: ParallelContext, value: int, device: torch.device) -> int:
    """The smallest of every rank's `value` (each rank must call it): what all ranks can hold."""
    if parallel.world_size == 1:
        return value
    values = parallel.all_gather(torch.tensor([value], dtype=torch.int64, device=device), dim=0)
    return int(values.min())


def generation_config(model: Any, model_path: str, config: WorkerConfig) -> Any:
    """The model's generation config: transformers' model carries one; for kvray's own, its
    checkpoint's generation_config.json, else one made from the model's config."""
    found = getattr(model, "generation_config", None)
    if found is not None:
        return found
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path, revision=config.revision or "main")
    except OSError:
        return GenerationConfig.from_model_config(model.config)
