"""What a replica of several ranks answers for itself: one `WorkerInfo` from its ranks', and
its output rank's step output once every rank's shows they agree. Used by both group executors (Ray
actors: `cluster/worker_group.py`; local processes: `local_ranks.py`).

Standard library only: the router imports it without torch.
"""

from __future__ import annotations

from dataclasses import replace

from kvray.workers.protocol import StepOutput, WorkerInfo


def group_info(infos: list[WorkerInfo]) -> WorkerInfo:
    """One replica's info from its ranks' (rank order): rank 0's limits (every rank's are the
    same), every rank listed, the bytes summed.

    Raises:
        ValueError: the ranks disagree on the limits the router schedules by (a bug).
    """
    first = infos[0]
    limits = ("vocab_size", "max_model_len", "block_size", "num_kv_blocks", "eos_token_ids")
    for info in infos[1:]:
        differ = [name for name in limits if getattr(info, name) != getattr(first, name)]
        if differ:
            raise ValueError(f"a replica's ranks disagree on {', '.join(differ)}")
    return replace(
        first,
        weights_bytes=sum(i.weights_bytes for i in infos),
        kv_cache_bytes=sum(i.kv_cache_bytes for i in infos),
        ranks=tuple(rank for info in infos for rank in info.ranks),
    )


def output_rank(tensor_parallel_size: int, pipeline_parallel_size: int) -> int:
    """The rank whose step output a replica group answers with: the first rank of the last
    pipeline stage, which samples (ranks are ordered stage-major); rank 0 without stages."""
    return (pipeline_parallel_size - 1) * tensor_parallel_size


def group_output(outputs: list[StepOutput], *, output_rank: int) -> StepOutput:
    """A replica group's answer to a step: its output rank's output, once every rank's (rank
    order) shows the same tokens (the last stage's ranks sampled them; earlier stages' ranks
    took them from it).

    Raises:
        RuntimeError: the ranks hold different tokens. Each rank appends its tokens to its
            own copy of the sequences, so from then on they would compute different keys and
            values; the replica must be replaced.
    """
    chosen = outputs[output_rank]
    for rank, out in enumerate(outputs):
        if out.seq_ids != chosen.seq_ids or out.sampled_token_ids != chosen.sampled_token_ids:
            raise RuntimeError(
                f"step {chosen.step_id}: rank {rank} holds {out.sampled_token_ids} for "
                f"sequences {out.seq_ids}, rank {output_rank} {chosen.sampled_token_ids} for "
                f"{chosen.seq_ids}"
            )
    return chosen
