"""The client's own types: what `KvrayClient` returns instead of protobuf messages (the
generation results are `kvray.outputs`', shared with the offline `LLM`), and the conversions
from the `kvray.v1` messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvray.client.errors import KvrayError
from kvray.outputs import Accumulator, Completion, GenerationChunk, TokenLogprob
from kvray.protos.kvray.v1 import generation_pb2 as pb

_FINISH = {1: "stop", 2: "length", 3: "abort"}


@dataclass
class RankInfo:
    """One worker process of a replica (a tensor-parallel rank; the only one at size 1)."""

    rank: int
    device: str
    node: str  # host name
    weights_bytes: int  # its shard of the model's weights
    kv_cache_bytes: int  # its share of every KV block


@dataclass
class ReplicaStatus:
    replica_id: str
    state: str
    device: str
    num_waiting: int
    num_running: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int
    num_finished_requests: int
    num_prefix_queries: int = 0  # prompt tokens looked up in its prefix cache
    num_prefix_hits: int = 0  # of which were served from it
    ranks: list[RankInfo] = field(default_factory=list)  # its worker processes, rank order


@dataclass
class ScalingDecision:
    time_unix: float
    from_replicas: int
    to_replicas: int
    reason: str


@dataclass
class ClusterStatus:
    replicas: list[ReplicaStatus]
    queue_depth: int
    num_running: int
    min_replicas: int = 0
    max_replicas: int = 0
    target_replicas: int = 0
    recent_decisions: list[ScalingDecision] = field(default_factory=list)
    num_moved_requests: int = 0  # continued elsewhere after a failure or drain timeout
    num_rebalanced_requests: int = 0  # queued ones moved to a less busy replica


@dataclass
class ModelInfo:
    model: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    has_tokenizer: bool
    dtype: str
    has_chat_template: bool = False
    quantization: str = ""  # "int8", or "" for none
    decode_graph_batch_sizes: list[int] = field(default_factory=list)  # [] = eager decode steps
    # What requests that leave temperature, top_k, top_p, min_p or repetition_penalty unset
    # sample with (the model's generation_config.json)
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    # The execution plan: which code computes the forward, and how a replica is split
    implementation: str = ""
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    ranks: list[RankInfo] = field(default_factory=list)  # a replica's processes and their bytes
    # Every field of the plan as text: linear and attention kernels, decode path, shards
    execution_plan: dict[str, str] = field(default_factory=dict)


def _logprobs(entries: Any) -> list[TokenLogprob]:
    return [
        TokenLogprob(lp.token_id, lp.logprob, list(lp.top_token_ids), list(lp.top_logprobs))
        for lp in entries
    ]


def chunk_from_proto(resp: pb.GenerateResponse) -> GenerationChunk:
    chunk = GenerationChunk(
        request_id=resp.request_id,
        index=resp.index,
        text=resp.text,
        token_ids=list(resp.token_ids),
        logprobs=_logprobs(resp.logprobs),
    )
    if resp.prompt_logprobs:  # the wire leaves out the first prompt token's (it has none)
        chunk.prompt_logprobs = [None, *_logprobs(resp.prompt_logprobs)]
    if resp.HasField("cumulative_logprob"):
        chunk.cumulative_logprob = resp.cumulative_logprob
    if resp.HasField("finish_reason"):
        chunk.finish_reason = _FINISH.get(resp.finish_reason, "abort")
        chunk.prompt_tokens = resp.usage.prompt_tokens
        chunk.completion_tokens = resp.usage.completion_tokens
        chunk.cached_tokens = resp.usage.cached_tokens
        kind = resp.WhichOneof("stop_reason")
        chunk.stop_reason = getattr(resp, kind) if kind else None
    return chunk


def completion_of(acc: Accumulator) -> Completion:
    """The accumulated completion. Raises KvrayError if the stream ended without a chunk."""
    if acc.completion is None:
        raise KvrayError("the server ended the stream without a response")
    return acc.completion


def status_from_proto(resp: pb.ClusterStatus) -> ClusterStatus:
    """Field by field, by name: the dataclasses mirror the proto messages (a test checks)."""
    return ClusterStatus(
        replicas=[ReplicaStatus(**_scalars(r), ranks=_ranks(r.ranks)) for r in resp.replicas],
        recent_decisions=[ScalingDecision(**_scalars(d)) for d in resp.recent_decisions],
        **_scalars(resp),
    )


def info_from_proto(resp: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(**_scalars(resp), ranks=_ranks(resp.ranks))


def _ranks(ranks: Any) -> list[RankInfo]:
    return [RankInfo(**_scalars(rank)) for rank in ranks]


def _scalars(message: Any) -> dict[str, Any]:
    """A message's non-message fields by name (repeated scalars as lists, maps as dicts)."""
    out: dict[str, Any] = {}
    for f in message.DESCRIPTOR.fields:
        value = getattr(message, f.name)
        if f.message_type is None:
            out[f.name] = list(value) if f.is_repeated else value
        elif f.message_type.GetOptions().map_entry:
            out[f.name] = dict(value)
    return out
