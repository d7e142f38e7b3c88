"""A request's token constraints in the sampler: logit_bias, allowed_token_ids and bad_words.

Prepared once per step from the rows that set any (None when no row does, so a batch without
them pays nothing), then applied to the logits before penalties, the greedy argmax and the
sampling filters, and to beams' log-probabilities. It must not read the model or a tokenizer:
bad words arrive as token ids (`SamplingParams.bad_words_token_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvray.workers.sampler import SamplingRow


@dataclass
class TokenConstraints:
    """Sparse per-row changes to a batch's logits (rows index the batch)."""

    # NOTE: a banned token is an entry of -inf, so a ban outweighs any bias on the same token.
    rows: torch.Tensor  # [num_entries] long
    token_ids: torch.Tensor  # [num_entries] long
    values: torch.Tensor  # [num_entries] float32: a bias, or -inf for a bad word's banned token
    allowed_rows: torch.Tensor | None  # [num_allowed_rows] long: rows with allowed_token_ids
    allowed: torch.Tensor | None  # [num_allowed_rows, vocab] bool: the ids each of them may take


def banned_by_bad_words(
    bad_words_token_ids: Sequence[Sequence[int]], output_token_ids: Sequence[int]
) -> set[int]:
    """The tokens that would complete a bad word now: each word's last token, where the output
    ends with the rest of the word (a one-token word: always). Only output tokens count, as in
    vLLM: a prompt that ends with a word's beginning does not ban its end."""
    banned = set()
    num_output = len(output_token_ids)
    for word in bad_words_token_ids:
        num_prefix = len(word) - 1
        if num_prefix > num_output:
            continue
        if num_prefix == 0 or list(output_token_ids[num_output - num_prefix :]) == list(word[:-1]):
            banned.add(word[-1])
    return banned


def prepare_token_constraints(
    rows: Sequence[SamplingRow], *, vocab_size: int, device: torch.device
) -> TokenConstraints | None:
    """The batch's constraints, or None when no row has any (`has_token_constraints`)."""
    if not any(r.sampling_params.has_token_constraints for r in rows):
        return None
    row_idx: list[int] = []
    token_idx: list[int] = []
    values: list[float] = []
    allowed_rows: list[int] = []
    allowed_row_idx: list[int] = []
    allowed_token_idx: list[int] = []
    for i, row in enumerate(rows):
        params = row.sampling_params
        for token_id, bias in params.logit_bias:
            row_idx.append(i)
            token_idx.append(token_id)
            values.append(bias)
        if params.bad_words_token_ids:
            longest = max(len(word) for word in params.bad_words_token_ids)
            start = max(row.num_prompt_tokens, len(row.token_ids) - (longest - 1))
            banned = banned_by_bad_words(params.bad_words_token_ids, row.token_ids[start:])
            row_idx.extend([i] * len(banned))
            token_idx.extend(sorted(banned))
            values.extend([float("-inf")] * len(banned))
        if params.allowed_token_ids:
            allowed_row_idx.extend([len(allowed_rows)] * len(params.allowed_token_ids))
            allowed_token_idx.extend(params.allowed_token_ids)
            allowed_rows.append(i)
    allowed = None
    if allowed_rows:
        allowed = torch.zeros(len(allowed_rows), vocab_size, dtype=torch.bool, device=device)
        allowed[
            torch.tensor(allowed_row_idx, device=device),
            torch.tensor(allowed_token_idx, device=device),
        ] = True
    return TokenConstraints(
        rows=torch.tensor(row_idx, dtype=torch.long, device=device),
        token_ids=torch.tensor(token_idx, dtype=torch.long, device=device),
        values=torch.tensor(values, dtype=torch.float32, device=device),
        allowed_rows=torch.tensor(allowed_rows, device=device) if allowed_rows else None,
        allowed=allowed,
    )


def apply_token_constraints(
    logits: torch.Tensor,  # [batch, vocab] float32; changed in place
    constraints: TokenConstraints,
) -> torch.Tensor:
    """Mask every token outside a row's allowed ids to -inf, then add the biases and bans."""
    if constraints.allowed_rows is not None and constraints.allowed is not None:
        rows = constraints.allowed_rows
        logits[rows] = logits[rows].masked_fill(~constraints.allowed, float("-inf"))
    if constraints.rows.numel():
        logits.index_put_(
            (constraints.rows, constraints.token_ids), constraints.values, accumulate=True
        )
    return logits
