"""The model runner: flattens one step's sequences into a single forward over the paged KV cache.

It knows token layout, positions and cache slots; it does not know about requests, sampling or
scheduling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvray.workers.attention import AttentionMetadata, PrefillSeq, attention_context
from kvray.workers.kv_cache import KVCache


@dataclass
class ScheduledSeq:
    """One sequence in a step: compute token_ids[num_computed : num_computed + num_tokens]."""

    token_ids: list[int]
    block_ids: list[int]
    num_computed: int
    num_tokens: int

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
    metadata: AttentionMetadata
    order: list[int]  # order[k] = index (into the step's sequences) of the k-th batch sequence


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.block_size

    def prepare(self, seqs: list[ScheduledSeq]) -> ModelInput:
        """Lay out the batch: single-token sequences first, then prompt chunks."""
        order = [i for i, s in enumerate(seqs) if s.num_tokens == 1]
        num_decodes = len(order)
        order += [i for i, s in enumerate(seqs) if s.num_tokens > 1]
        ordered = [seqs[i] for i in order]
        bs, dev = self.block_size, self.device

        input_ids: list[int] = []
        for s in ordered:
            input_ids.extend(s.token_ids[s.num_computed : s.context_len])
        num_blocks = [-(-s.context_len // bs) for s in ordered]
        width = max(num_blocks)
        block_table = torch.tensor(
            [s.block_ids[:n] + [0] * (width - n) for s, n in zip(ordered, num_blocks)], device=dev
        )  # [num_seqs, width]
        lens = torch.tensor([s.num_tokens for s in ordered], device=dev)
        starts = torch.tensor([s.num_computed for s in ordered], device=dev)
        seq_of_token = torch.repeat_interleave(torch.arange(len(ordered), device=dev), lens)
        first_row = torch.cumsum(lens, 0) - lens
        positions = (
            starts[seq_of_token]
            + torch.arange(len(input_ids), device=dev)
            - first_row[seq_of_token]
        )
        slot_mapping = block_table[seq_of_token, positions // bs] * bs + positions % bs
        # [num_seqs, width * bs]: every slot of every block each sequence touches, in order.
        context_slots = (block_table[:, :, None] * bs + torch.arange(bs, device=dev)).reshape(
            len(ordered), -1
        )

        prefills = []
        for k in range(num_decodes, len(ordered)):
            s = ordered[k]
            slots = context_slots[k, : s.context_len] if s.num_computed else None
            prefills.append(PrefillSeq(int(first_row[k]), s.num_tokens, s.num_computed, slots))
        decode_width = max(num_blocks[:num_decodes], default=0) * bs
        metadata = AttentionMetadata(
            slot_mapping=slot_mapping,
            num_decodes=num_decodes,
            decode_slots=context_slots[:num_decodes, :decode_width] if num_decodes else None,
            decode_positions=positions[:num_decodes] if num_decodes else None,
            prefills=prefills,
            kv_caches=self.kv_cache.layers,
        )
        last_rows = first_row + lens - 1
        sample_rows = last_rows[torch.tensor([s.samples for s in ordered], device=dev)]
        return ModelInput(
            input_ids=torch.tensor([input_ids], device=dev),
            positions=positions[None, :],
            sample_rows=sample_rows,
            metadata=metadata,
            order=order,
        )

    @torch.inference_mode()
    def execute(self, model_input: ModelInput) -> torch.Tensor:
        """One forward. Returns logits [num_samples, vocab] for the sampling sequences, in batch order."""
        # NOTE: a step of partial prompt chunks only samples nothing; one row of logits is still
        # asked for because some models treat an empty `logits_to_keep` as "keep all".
        keep = model_input.sample_rows
        if keep.numel() == 0:
            keep = keep.new_zeros(1)
        with attention_context(model_input.metadata):
            out = self.model(
                input_ids=model_input.input_ids,
                position_ids=model_input.positions,
                use_cache=False,
                logits_to_keep=keep,
            )
        return out.logits[0, : model_input.sample_rows.numel()]
