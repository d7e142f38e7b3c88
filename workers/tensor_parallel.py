"""One rank of a replica split over several (tensor-parallel ranks, pipeline stages): joining
its groups and loading its shard of its stage of kvray's own model (`workers/models`).

`ModelWorker` calls these only for a replica of several ranks; for one it loads transformers'
modules as before. Nothing here knows about Ray or processes: the group's rendezvous address
(`init_method`) comes from whoever started the ranks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kvray.workers.config import WorkerConfig
from kvray.workers.models import CausalLM, load_model, model_class
from kvray.workers.models.layers import Placement
from kvray.workers.models.loader import checkpoint_weights
from kvray.workers.models.parallel import (
    SINGLE_RANK,
    ParallelContext,
    ProcessGroup,
    init_process_group,
)
from kvray.workers.models.pipeline import StageLinks, make_stage
from kvray.workers.quantization import GROUP_SIZE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankGroups:
    """What one rank of a replica talks through."""

    replica: ParallelContext  # every rank of the replica: what they must agree on
    tensor: ParallelContext  # its stage's tensor-parallel ranks: the layers' collectives
    stage_index: int
    num_stages: int
    links: StageLinks | None  # to the neighbouring stages; None with one stage


def join_group(
    *,
    rank: int,
    tensor_parallel_size: int,
    pipeline_parallel_size: int = 1,
    init_method: str | None,
    device: torch.device,
) -> RankGroups:
    """Join this process to its replica's group (gloo on CPU, NCCL on GPUs) and, with several
    stages, to its stage's tensor-parallel group. Blocks until every rank has joined.

    Ranks are ordered stage-major: rank `r` is tensor-parallel rank `r % tensor_parallel_size`
    of stage `r // tensor_parallel_size`.

    Raises:
        ValueError: no `init_method`, or a rank outside the group.
    """
    world_size = tensor_parallel_size * pipeline_parallel_size
    if init_method is None:
        raise ValueError(
            f"tensor_parallel_size {tensor_parallel_size} x pipeline_parallel_size "
            f"{pipeline_parallel_size} needs a group address for its ranks: start the replica "
            "through kvray (LLM or kvray serve), which gives every rank one"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a group of {world_size}")
    logger.info("rank %d of %d: joining %s (%s)", rank, world_size, init_method, device)
    start = time.perf_counter()
    replica = init_process_group(
        rank=rank, world_size=world_size, init_method=init_method, device=device
    )
    logger.info(
        "rank %d: group of %d joined in %.1fs", rank, world_size, time.perf_counter() - start
    )
    if pipeline_parallel_size == 1:
        return RankGroups(replica, replica, 0, 1, None)
    stage_index = rank // tensor_parallel_size
    tensor = _stage_group(rank, tensor_parallel_size, pipeline_parallel_size)
    links = StageLinks(
        rank=rank,
        tensor_parallel_size=tensor_parallel_size,
        stage_index=stage_index,
        num_stages=pipeline_parallel_size,
        device=device,
    )
    return RankGroups(replica, tensor, stage_index, pipeline_parallel_size, links)


def _stage_group(rank: int, tensor_parallel_size: int, num_stages: int) -> ParallelContext:
    """This rank's stage's tensor-parallel group (one group a stage)."""
    if tensor_parallel_size == 1:
        return SINGLE_RANK
    mine: ParallelContext = SINGLE_RANK
    for stage in range(num_stages):
        first = stage * tensor_parallel_size
        # NOTE: every rank creates every stage's group, in the same order, as torch requires
        group = dist.new_group(list(range(first, first + tensor_parallel_size)))
        if stage == rank // tensor_parallel_size:
            mine = ProcessGroup(group)
    return mine


def load_rank_model(
    model_path: str,
    config: WorkerConfig,
    *,
    groups: RankGroups,
    dtype: torch.dtype,
    device: torch.device,
) -> CausalLM:
    """This rank's shard of its stage of kvray's own model of the checkpoint at `model_path`
    (a folder or a hub id), as saved: `execution_plan.prepare_model` then quantizes or packs
    its layers where the plan says.

    Raises:
        ValueError: an architecture kvray has no model of, sizes the group cannot split, or
            more stages than layers, each naming the setting.
    """
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(
        model_path, revision=config.revision, trust_remote_code=config.trust_remote_code
    )
    model_class(  # refuses early
        hf_config.model_type,
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=config.pipeline_parallel_size,
    )
    stage = make_stage(
        hf_config.num_hidden_layers,
        index=groups.stage_index,
        num_stages=groups.num_stages,
        links=groups.links,
    )
    start = time.perf_counter()
    folder = checkpoint_folder(model_path, revision=config.revision)
    placement = Placement(groups.tensor, dtype, device, split_unit(config))
    model = load_model(hf_config, checkpoint_weights(folder), placement, stage)
    logger.info(
        "stage %d of %d (layers %d-%d), tensor-parallel rank %d: loaded its shard of %s in %.1fs",
        stage.index,
        stage.num_stages,
        stage.layers.start,
        stage.layers.stop - 1,
        groups.tensor.rank,
        model_path,
        time.perf_counter() - start,
    )
    return model


def check_splits(model_path: str, config: WorkerConfig) -> None:
    """Refuse, before any rank starts, a model the group cannot split: build each stage's
    rank 0 on the meta device (shapes only: nothing allocated, nothing read).

    Raises:
        ValueError: an architecture kvray has no model of, sizes that do not split, or more
            stages than layers, each naming tensor_parallel_size or pipeline_parallel_size.
    """
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(
        model_path, revision=config.revision, trust_remote_code=config.trust_remote_code
    )
    size, stages = config.tensor_parallel_size, config.pipeline_parallel_size
    cls = model_class(
        hf_config.model_type, tensor_parallel_size=size, pipeline_parallel_size=stages
    )
    if cls is None:
        return
    placement = Placement(
        _ShapesOnly(size), torch.float32, torch.device("meta"), split_unit(config)
    )
    for index in range(stages):
        stage = make_stage(hf_config.num_hidden_layers, index=index, num_stages=stages)
        cls(hf_config, placement, stage)


def split_unit(config: WorkerConfig) -> int:
    """`Placement.split_unit` for these settings: int8's group size with `quantization` int8 or
    w8a8 (a rank's part of the down projection then quantizes to the one-rank layer's values)."""
    return GROUP_SIZE if config.quantization in ("int8", "w8a8") else 1


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
    """The smallest of every rank's `value` (each rank of `parallel` must call it): what all
    of them can hold."""
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
