"""The model runner: flattens one step's sequences into a single forward over the paged KV cache.

It knows token layout, positions and cache slots; it does not know about requests, sampling or
scheduling.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

from kvray.workers.attention import AttentionMetadata, PrefillSeq, attention_context, decode_kernel
from kvray.workers.decode_graphs import DecodeGraphs
from kvray.workers.execution_plan import (
    FAMILY_FORWARD,
    ONE_CALL,
    PER_LAYER,
    TORCH_ATTENTION,
    ExecutionPlan,
    decide_plan,
)
from kvray.workers.kv_cache import KVCache
from kvray.workers.llama_family import Forward, family_forward, transformers_forward

logger = logging.getLogger(__name__)


@dataclass
class ScheduledSeq:
    """One sequence in a step: compute token_ids[num_computed : num_computed + num_tokens]."""

    token_ids: list[int]
    block_ids: list[int]
    num_computed: int
    num_tokens: int
    num_prompt_logits: int = 0  # rows, from its first, whose logits score the next prompt token

    @property
    def context_len(self) -> int:
        return self.num_computed + self.num_tokens

    @property
    def samples(self) -> bool:
        """Whether this step reaches the last known token, so a next token is sampled."""
        return self.context_len == len(self.token_ids)


@dataclass
class ModelInput:
    input_ids: torch.Tensor  # [1, num_tokens]
    positions: torch.Tensor  # [1, num_tokens]
    sample_rows: torch.Tensor  # [num_samples] rows of the flat batch whose logits are kept
    prompt_rows: torch.Tensor  # [num_prompt_logits] rows kept to score prompt tokens
    prompt_row_offsets: dict[int, int]  # step's sequence index -> its first entry in prompt_rows
    metadata: AttentionMetadata
    order: list[int]  # order[k] = index (into the step's sequences) of the k-th batch sequence


@dataclass
class GraphInput:
    """A decode-only step that replays a prepared forward (workers/decode_graphs.py)."""

    batch: int  # the padded batch size it runs at
    seqs: list[tuple[int, int, list[int]]]  # (token id, position, block ids) per sequence
    prompt_row_offsets: dict[int, int] = field(default_factory=dict)  # none: decodes only

    @property
    def order(self) -> list[int]:
        return list(range(len(self.seqs)))


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCache,
        device: torch.device,
        plan: ExecutionPlan | None = None,
    ) -> None:
        """`plan`: the worker's (`execution_plan.decide_plan`); by default one decided for
        `model` as it is. `self.plan` is what runs (the worker reports it)."""
        self.model = model
        spec = kv_cache.spec
        self.plan = plan or decide_plan(model, device=device, dtype=spec.dtype)
        self.forward = self._forward()
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.block_size
        self.decode_kernel = (
            None
            if self.plan.attention == TORCH_ATTENTION
            else decode_kernel(spec.dtype, device, spec.head_dim)
        )
        self.graphs: DecodeGraphs | None = None

    def _forward(self) -> Forward:
        """The plan's forward (`llama_family.Forward`'s contract)."""
        if self.plan.is_own_model:
            return self.model  # type: ignore[return-value]  # NOTE: takes the runner's arguments
        if self.plan.implementation == FAMILY_FORWARD:
            forward = family_forward(
                self.model, one_call=self.plan.decode == ONE_CALL, cpu_ops=self.plan.cpu_ops
            )
            assert forward is not None, "the plan chose kvray's forward for a model it cannot run"
            if self.plan.decode == ONE_CALL and forward.stack is None:
                # NOTE: a layer the plan's shape rules did not foresee; slower, never wrong
                logger.warning("a decode step's layers cannot run in one call; one call a layer")
                self.plan = dataclasses.replace(self.plan, decode=PER_LAYER)
            return forward
        return transformers_forward(self.model)

    def build_decode_graphs(self, max_batch: int, max_model_len: int) -> None:
        """Prepare decode steps of up to `max_batch` sequences as replays (at warmup). Needs
        the paged decode kernel; where the build fails, steps stay eager."""
        assert self.decode_kernel is not None
        # NOTE: transformers' forward, not kvray's own: Dynamo took 1.4x as long to compile
        # kvray's (a 2-layer model: 30 against 21 s; SmolLM2: ~9 against ~3 min) for a replay
        # no faster (13.4 ms at one stream), and a replay has no module overhead to remove.
        graphs = DecodeGraphs(
            transformers_forward(self.model),
            self.kv_cache,
            self.decode_kernel,
            self.device,
            max_batch,
            max_model_len,
        )
        self.graphs = graphs if graphs.build() else None

    def prepare(self, seqs: list[ScheduledSeq]) -> ModelInput | GraphInput:
        """Lay out the batch: single-token sequences first, then prompt chunks. A step of
        decodes only, within the prepared batch sizes, becomes a replay instead."""
        if self.graphs is not None and all(
            s.num_tokens == 1 and s.samples and not s.num_prompt_logits for s in seqs
        ):
            batch = self.graphs.batch_size(len(seqs))
            if batch is not None:
                return GraphInput(
                    batch,
                    [(s.token_ids[s.num_computed], s.num_computed, s.block_ids) for s in seqs],
                )
        order = [i for i, s in enumerate(seqs) if s.num_tokens == 1]
        num_decodes = len(order)
        order += [i for i, s in enumerate(seqs) if s.num_tokens > 1]
        ordered = [seqs[i] for i in order]
        bs, dev = self.block_size, self.device

        input_ids: list[int] = []
        first_rows: list[int] = []
        for s in ordered:
            first_rows.append(len(input_ids))
            input_ids.extend(s.token_ids[s.num_computed : s.context_len])
        num_blocks = [-(-s.context_len // bs) for s in ordered]
        width = max(num_blocks)
        block_table = torch.tensor(
            [s.block_ids[:n] + [0] * (width - n) for s, n in zip(ordered, num_blocks)], device=dev
        )  # [num_seqs, width]
        positions, slot_mapping = self._positions_and_slots(ordered, first_rows, block_table)

        prefills = [
            PrefillSeq(first_rows[k], s.num_tokens, s.num_computed, self._context_slots(s))
            for k, s in enumerate(ordered[num_decodes:], start=num_decodes)
        ]
        decode_width = max(num_blocks[:num_decodes], default=0)
        decode_positions = positions[:num_decodes] if num_decodes else None
        metadata = AttentionMetadata(
            slot_mapping=slot_mapping,
            block_size=bs,
            num_decodes=num_decodes,
            decode_block_ids=block_table[:num_decodes, :decode_width].flatten()
            if num_decodes
            else None,
            decode_positions=decode_positions,
            prefills=prefills,
            kv_caches=self.kv_cache.layers,
            decode_kernel=self.decode_kernel,
            # NOTE: once per step here, not once per layer in the attention.
            decode_context_lens=None
            if decode_positions is None or self.decode_kernel is None
            else decode_positions + 1,
        )
        sample_rows = [first_rows[k] + s.num_tokens - 1 for k, s in enumerate(ordered) if s.samples]
        prompt_rows: list[int] = []
        prompt_row_offsets: dict[int, int] = {}
        for k, s in enumerate(ordered):
            if s.num_prompt_logits:
                prompt_row_offsets[order[k]] = len(prompt_rows)
                prompt_rows.extend(range(first_rows[k], first_rows[k] + s.num_prompt_logits))
        return ModelInput(
            input_ids=torch.tensor([input_ids], device=dev),
            positions=positions[None, :],
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=dev),
            prompt_rows=torch.tensor(prompt_rows, dtype=torch.long, device=dev),
            prompt_row_offsets=prompt_row_offsets,
            metadata=metadata,
            order=order,
        )

    def _positions_and_slots(
        self, ordered: list[ScheduledSeq], first_rows: list[int], block_table: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Position and cache slot of every token in the flat batch: ([num_tokens], [num_tokens])."""
        dev, bs = self.device, self.block_size
        if all(s.num_tokens == 1 for s in ordered):
            # NOTE: one token a sequence (decodes): from Python ints, a quarter of a millisecond
            # less host work a step than the tensor arithmetic below.
            at = [s.num_computed for s in ordered]
            cells = [s.block_ids[p // bs] * bs + p % bs for s, p in zip(ordered, at)]
            return torch.tensor(at, device=dev), torch.tensor(cells, device=dev)
        lens = torch.tensor([s.num_tokens for s in ordered], device=dev)
        offsets = torch.tensor(
            [s.num_computed - row for s, row in zip(ordered, first_rows)], device=dev
        )
        seq_of_token = torch.repeat_interleave(torch.arange(len(ordered), device=dev), lens)
        positions = torch.arange(seq_of_token.numel(), device=dev) + offsets[seq_of_token]
        slots = block_table[seq_of_token, positions // bs] * bs + positions % bs
        return positions, slots

    def _context_slots(self, s: ScheduledSeq) -> torch.Tensor | None:
        """[context_len] slots of a prompt chunk's whole context; None when nothing is cached."""
        if s.num_computed == 0:
            return None
        bs = self.block_size
        blocks = torch.tensor(s.block_ids[: -(-s.context_len // bs)], device=self.device)
        return (blocks[:, None] * bs + torch.arange(bs, device=self.device)).flatten()[
            : s.context_len
        ]

    @torch.inference_mode()
    def execute(self, model_input: ModelInput | GraphInput) -> torch.Tensor:
        """One forward. Returns logits [num_samples + num_prompt_logits, vocab]: the sampling
        sequences' in batch order, then the `prompt_rows`'."""
        if isinstance(model_input, GraphInput):
            assert self.graphs is not None
            return self.graphs.run(model_input.seqs, model_input.batch)
        # NOTE: a step of partial prompt chunks only samples nothing; one row of logits is still
        # asked for because some models treat an empty `logits_to_keep` as "keep all".
        keep = torch.cat([model_input.sample_rows, model_input.prompt_rows])
        if keep.numel() == 0:
            keep = keep.new_zeros(1)
        with attention_context(model_input.metadata):
            logits = self.forward(model_input.input_ids, model_input.positions, keep)
        num_kept = model_input.sample_rows.numel() + model_input.prompt_rows.numel()
        return logits[0, :num_kept]
