"""Token bitmasks: which tokens a grammar allows next, one bit per token, and applying them to
logits. The torch side of structured output (the grammar side is `structured_output.py`): a
step's masks are prepared from its constrained rows (`prepare_grammar_masks`) and applied to
their logits after min_tokens masking and the token constraints (`apply_grammar_masks`).

A bitmask row is `ceil(vocab_size / 32)` int32 words; token `t` is allowed when bit `t % 32` of
word `t // 32` is 1 (llguidance's and xgrammar's layout, so their fills write into it directly).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvray.workers.structured_output import GrammarMatcher, fill_masks

if TYPE_CHECKING:
    from kvray.workers.sampler import SamplingRow

# float32 -inf as an int32 bit pattern: a banned logit's bits become these.
_NEG_INF_BITS = struct.unpack("<i", struct.pack("<f", float("-inf")))[0]


def allocate_token_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    """A CPU bitmask of `num_rows` rows, every token allowed.  # [num_rows, ceil(vocab / 32)]"""
    return torch.full((num_rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def apply_token_bitmask(
    logits: torch.Tensor,  # [batch, vocab], float; changed in place
    bitmask: torch.Tensor,  # [num_rows, words] int32, on any device
    rows: torch.Tensor | None = None,  # [num_rows] long: the logits rows the masks belong to
) -> None:
    """Set to -inf the logits of tokens whose bit is 0 (row `i` of `bitmask` masks logits row
    `rows[i]`, or row `i` when `rows` is None). Tokens past the bitmask's width are masked."""
    bitmask = bitmask.to(logits.device, non_blocking=True)
    if rows is None:
        _apply(logits, bitmask)
    else:
        masked = logits[rows]
        _apply(masked, bitmask)
        logits[rows] = masked


def _apply(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    vocab = logits.shape[1]
    covered = min(vocab, 32 * bitmask.shape[1])
    logits[:, covered:] = float("-inf")
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = (bitmask.unsqueeze(-1) >> shifts).bitwise_and_(1)  # [num_rows, words, 32]: 1 allowed
    whole = covered // 32 * 32 if logits.dtype == torch.float32 else 0
    tail = bits.flatten(1)[:, whole:covered] == 0
    logits[:, whole:covered].masked_fill_(tail, float("-inf"))
    if whole:
        # NOTE: masked_fill_ reads a bool mask element by element on CPU (~5x slower here):
        # write -inf's bits through an int32 view instead, in place in one buffer (`keep` is
        # all ones where allowed, `banned` all ones where banned).
        view = logits[:, :whole].view(torch.int32).unflatten(1, (-1, 32))
        keep = bits[:, : whole // 32].neg_()
        view.bitwise_and_(keep)
        banned = keep.bitwise_not_().bitwise_and_(_NEG_INF_BITS)
        view.bitwise_or_(banned)


@dataclass
class GrammarMasks:
    """A step's grammar masks: a bitmask row for each constrained row of the batch."""

    bitmask: torch.Tensor  # [num_masked, ceil(vocab / 32)] int32, on the CPU
    rows: torch.Tensor | None  # [num_masked] long: the batch rows masked; None: all, in order
    seconds: float = 0.0  # host time catching matchers up, filling and applying the masks


def prepare_grammar_masks(
    rows: Sequence[SamplingRow], *, vocab_size: int, device: torch.device
) -> GrammarMasks | None:
    """Catch each constrained row's grammar up with its output and fill its mask (None when
    no row has a grammar, so an unconstrained batch pays nothing). A row whose output can only
    end gets a mask of its end-of-sequence ids."""
    constrained = [(i, row) for i, row in enumerate(rows) if row.grammar is not None]
    if not constrained:
        return None
    start = time.perf_counter()
    bitmask = allocate_token_bitmask(len(constrained), vocab_size)
    fills: list[tuple[GrammarMatcher, int]] = []
    for k, (_, row) in enumerate(constrained):
        assert row.grammar is not None
        matcher = row.grammar.follow(row.token_ids, row.num_prompt_tokens)
        if matcher is not None:
            fills.append((matcher, k))
        else:
            _allow_only(bitmask[k], row.eos_token_ids)
    fill_masks(fills, bitmask)
    indices = None
    if len(constrained) < len(rows):
        indices = torch.tensor([i for i, _ in constrained], dtype=torch.long, device=device)
    return GrammarMasks(bitmask, indices, time.perf_counter() - start)


def _allow_only(bitmask_row: torch.Tensor, token_ids: Sequence[int]) -> None:
    words = [0] * bitmask_row.numel()
    for t in token_ids:
        words[t // 32] |= 1 << (t % 32)
    signed = [w - (1 << 32) if w >= 1 << 31 else w for w in words]  # int32's bit 31 is its sign
    bitmask_row.copy_(torch.tensor(signed, dtype=torch.int32))


@torch.inference_mode()  # NOTE: the model's logits are inference tensors, masked in place
def apply_grammar_masks(
    logits: torch.Tensor,  # [batch, vocab] float; changed in place
    masks: GrammarMasks,
    *,
    unmasked: torch.Tensor | None = None,  # [batch, vocab]: the logits before other masks
) -> None:
    """Set to -inf each constrained row's tokens that its grammar forbids. `unmasked`: where
    other masks ran first (token constraints), the logits before them; a row that they and the
    grammar leave with no token takes the grammar's mask alone, so the sampled token always
    follows the grammar."""
    start = time.perf_counter()
    apply_token_bitmask(logits, masks.bitmask, masks.rows)
    if unmasked is not None:
        rows = masks.rows
        if rows is None:
            rows = torch.arange(masks.bitmask.shape[0], device=logits.device)
        is_empty = logits[rows].amax(dim=-1) == float("-inf")
        if bool(is_empty.any()):
            fresh = unmasked[rows[is_empty]].to(logits.dtype)
            apply_token_bitmask(fresh, masks.bitmask[is_empty.cpu()])
            logits[rows[is_empty]] = fresh
    masks.seconds += time.perf_counter() - start
