"""What a replica of several ranks answers for itself: one `WorkerInfo` from its ranks', and
rank 0's step output once every rank's shows they agree. Used by both group executors (Ray
actors: `cluster/worker_group.py`; local processes: `local_ranks.py`).

Standard library only: the router imports it without torch.
"""

from __future__ import annotations

from dataclasses import replace

from kvray.workers.protocol import StepOutput, WorkerInfo


def group_info(infos: list[WorkerInfo]) -> WorkerInfo:
    """One replica's info from its ranks' (rank order): rank 0's limits, every rank listed,
    the bytes summed.

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


def rank_zero_output(outputs: list[StepOutput]) -> StepOutput:
    """A replica group's answer to a step: rank 0's output, once every rank's (rank order)
    shows it sampled the same tokens.

    Raises:
        RuntimeError: the ranks sampled different tokens. Each rank appends its tokens to its
            own copy of the sequences, so from then on they would compute different keys and
            values; the replica must be replaced.
    """
    first = outputs[0]
    for rank, out in enumerate(outputs[1:], start=1):
        if out.seq_ids != first.seq_ids or out.sampled_token_ids != first.sampled_token_ids:
            raise RuntimeError(
                f"step {first.step_id}: rank {rank} sampled {out.sampled_token_ids} for "
                f"sequences {out.seq_ids}, rank 0 {first.sampled_token_ids} for {first.seq_ids}"
            )
    return first
