"""The router <-> worker contract: sampling parameters and the per-step messages.

Standard library only: the router imports this without torch, and every message is plain
lists, ints and small dataclasses so that it pickles cheaply across a Ray actor boundary.
`SamplingParams` and `InvalidParameterError` live in `sampling_params.py` and are re-exported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvray.workers.sampling_params import (
    MAX_BAD_WORD_CHARS,
    MAX_BAD_WORDS,
    MAX_BAD_WORDS_TOKENS,
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_VALUE,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    NEUTRAL_KNOBS,
    ROUTER_SET_FIELDS,
    InvalidParameterError,
    SamplingParams,
)

__all__ = [
    "MAX_BAD_WORDS",
    "MAX_BAD_WORDS_TOKENS",
    "MAX_BAD_WORD_CHARS",
    "MAX_LOGIT_BIAS",
    "MAX_LOGIT_BIAS_VALUE",
    "MAX_STOP_CHARS",
    "MAX_STOP_STRINGS",
    "MAX_STOP_TOKEN_IDS",
    "NEUTRAL_KNOBS",
    "ROUTER_SET_FIELDS",
    "BlockCopy",
    "Fork",
    "InvalidParameterError",
    "Logprobs",
    "NewSequence",
    "SamplingParams",
    "StepInput",
    "StepOutput",
    "WorkerInfo",
]


@dataclass(frozen=True)
class RankInfo:
    """One worker process of a replica: where it runs and what it holds."""

    rank: int  # in the replica's group; rank 0 answers for the replica
    device: str  # "cpu", or the GPU's name
    node: str  # the host name of the machine it runs on
    weights_bytes: int  # bytes of the model's weights this rank holds (its shard of them)
    kv_cache_bytes: int  # bytes of its KV cache (its key/value heads of every block)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker reports after `warmup()`: the model's limits and its KV cache's size.

    For a replica of several ranks the group reports rank 0's, with `ranks` listing them all
    and `weights_bytes` / `kv_cache_bytes` their sums."""

    model: str  # the path or hub id that was loaded
    device: str  # e.g. "cpu" or "NVIDIA H100 80GB HBM3"
    dtype: str  # e.g. "torch.float32"
    vocab_size: int  # logits width; valid token ids are [0, vocab_size)
    max_model_len: int  # prompt + output tokens one sequence may hold
    eos_token_ids: tuple[int, ...]  # end-of-sequence ids from the model's generation config
    block_size: int  # tokens per KV block
    num_kv_blocks: int  # blocks in the KV cache
    kv_cache_bytes: int  # bytes held by the KV cache
    weights_bytes: int  # bytes held by the model's parameters
    quantization: str | None = None  # "int8", or None
    decode_graph_batch_sizes: tuple[int, ...] = ()  # replayed decode sizes; () = eager steps
    # The model's sampling defaults (`NEUTRAL_KNOBS` names; its generation_config.json, or a
    # built-in model's own): what a request that leaves a knob unset samples with.
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    # Structured output: the worker masks logits with grammars (it loaded the model's tokenizer
    # and has end-of-sequence ids to end a finished answer with). The router refuses
    # constrained requests where this is false.
    can_constrain_output: bool = False
    # The execution plan, decided at load: which code computes the forward ("kvray
    # LlamaForCausalLM": kvray's own model; "transformers X, kvray's forward": transformers'
    # modules run by llama_family.py; "transformers X"), and how the replica is split.
    implementation: str = ""
    # Every field of this rank's `execution_plan.ExecutionPlan`, as text: dtype,
    # implementation, model_class, fuses_projections, linear (the linear layers' kernel),
    # attention (decode attention's kernel), decode (one-call or per-layer), decode_graphs,
    # tensor_parallel_size, pipeline_parallel_size, tensor_rank, stage_index.
    execution_plan: dict[str, str] = field(default_factory=dict)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    ranks: tuple[RankInfo, ...] = ()  # every rank, in rank order


@dataclass
class NewSequence:
    """A sequence the worker has not seen (or dropped after a preemption): sent once, in full."""

    seq_id: int
    token_ids: list[int]  # prompt, then any tokens generated before a preemption
    num_prompt_tokens: int  # how many of token_ids are prompt (penalties, min_tokens, bad_words)
    sampling_params: SamplingParams
    block_ids: list[int]  # KV blocks, in order; more arrive in StepInput.new_block_ids
    num_computed_tokens: int = 0  # > 0 when a cached prefix already holds these tokens' KV


@dataclass
class Fork:
    """A new sequence that starts as a copy of another one: same tokens, computed count and KV
    blocks (shared, not copied). `n` samples fork from one prefill; beams fork from beams."""

    child_id: int
    parent_id: int
    sampling_params: SamplingParams  # the child's own (its seed)


@dataclass
class BlockCopy:
    """Copy-on-write: sequence `seq_id` is about to write into block `src`, which another
    sequence shares, so the worker copies it to `dst` and uses `dst` at `index` from now on."""

    seq_id: int
    index: int  # position in the sequence's block table
    src: int
    dst: int


@dataclass
class StepInput:
    """One forward pass for one replica: which sequences compute how many tokens.

    Every scheduled sequence computes `num_scheduled_tokens` tokens starting at
    `num_computed_tokens` (the same rule for prompt chunks and decodes). A sequence whose
    computed tokens then cover every token the worker knows samples one new token, which the
    worker appends to its own copy, so a later step can compute it before the router has seen it.
    A beam (`num_beams > 1`) instead returns its best next tokens; the router sends the one it
    chose in `beam_token_ids`.

    The worker applies the diffs in this order: drop `finished_seq_ids`, add `new_seqs`, make
    `forks` (from their parents' state before this step), append `beam_token_ids`, apply
    `block_copies`, append `new_block_ids`.
    """

    step_id: int
    new_seqs: list[NewSequence] = field(default_factory=list)
    seq_ids: list[int] = field(default_factory=list)  # scheduled sequences, in batch order
    num_scheduled_tokens: list[int] = field(default_factory=list)  # parallel to seq_ids
    num_computed_tokens: list[int] = field(default_factory=list)  # parallel; before this step
    new_block_ids: dict[int, list[int]] = field(default_factory=dict)  # seq_id -> appended blocks
    finished_seq_ids: list[int] = field(default_factory=list)  # drop before running this step
    forks: list[Fork] = field(default_factory=list)  # new sequences copied from others
    beam_token_ids: dict[int, int] = field(default_factory=dict)  # seq_id -> token the router chose
    block_copies: list[BlockCopy] = field(default_factory=list)  # copy-on-write, before the forward

    @property
    def num_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)


@dataclass
class Logprobs:
    """Log-probabilities from the model's own distribution (before temperature and filters)."""

    token_id: int
    logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass
class StepOutput:
    """What one step produced: one sampled token per sequence that finished its known tokens."""

    step_id: int
    seq_ids: list[int] = field(default_factory=list)
    sampled_token_ids: list[int] = field(default_factory=list)  # parallel to seq_ids
    logprobs: list[Logprobs | None] | None = None  # parallel to seq_ids when any asked for them
    # Beam search rows: instead of a sampled token, each beam's best next tokens
    # (up to `SamplingParams.num_beam_candidates`; a banned token never) and their
    # log-probabilities; the router picks the next beams (`BeamSearch`).
    beam_seq_ids: list[int] = field(default_factory=list)
    beam_token_ids: list[list[int]] = field(default_factory=list)  # parallel to beam_seq_ids
    beam_logprobs: list[list[float]] = field(default_factory=list)  # parallel to beam_seq_ids
    # seq_id -> (position of the first prompt token scored, one entry per prompt token scored):
    # log-probabilities of the prompt tokens that follow the positions this step computed, for
    # sequences that asked for prompt_logprobs.
    prompt_logprobs: dict[int, tuple[int, list[Logprobs]]] = field(default_factory=dict)
    forward_s: float = 0.0  # seconds the worker spent in this step (forward + sampling)
    # Of forward_s: host seconds making and applying structured output's masks (catching
    # grammars up, filling bitmasks, masking logits); 0 without constrained rows.
    mask_s: float = 0.0
