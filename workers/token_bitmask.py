"""Token bitmasks: which tokens a grammar allows next, one bit per token, and applying them to
logits. The torch side of structured output (the grammar side is `structured_output.py`).

A bitmask row is `ceil(vocab_size / 32)` int32 words; token `t` is allowed when bit `t % 32` of
word `t // 32` is 1 (llguidance's and xgrammar's layout, so their fills write into it directly).
"""

from __future__ import annotations

import struct

import torch

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
