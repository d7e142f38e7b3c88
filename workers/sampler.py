"""The sampler: one next token per sequence from a batch of logits, vectorised over the batch.

Order of operations (as in transformers' logits processors): min_tokens stop masking,
token constraints (allowed_token_ids, bad_words, logit_bias: `token_constraints.py`),
structured output's grammar masks (`token_bitmask.py`), penalties, greedy argmax; for sampled
rows temperature, top-k, top-p, min-p, then one draw.
Logprobs are the model's own log-softmax, taken before all of these (vLLM's raw logprobs).
A draw is an inverse transform: one uniform number a row, located in the row's cumulative
probabilities; a seeded row's number comes from its own generator, so its tokens never depend on
what else is in the batch. (The exponential race, argmax of probs / Exp(1) noise, draws one
number per token of the vocabulary: on CPU 51 ms of a 32-row step, against under 1 ms here.)
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvray.workers.protocol import NEUTRAL_KNOBS, Logprobs, SamplingParams
from kvray.workers.structured_output import SequenceGrammar
from kvray.workers.token_bitmask import GrammarMasks, apply_grammar_masks, prepare_grammar_masks
from kvray.workers.token_constraints import (
    TokenConstraints,
    _tensor,
    apply_token_constraints,
    prepare_token_constraints,
)

_MASK64 = (1 << 64) - 1


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence this step."""

    sampling_params: SamplingParams
    token_ids: list[int]  # prompt + output so far
    num_prompt_tokens: int
    eos_token_ids: tuple[int, ...] = ()
    grammar: SequenceGrammar | None = None  # structured output's state; None: unconstrained

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors; a field is None when no sampled row uses it."""

    is_greedy: torch.Tensor  # [batch] bool: the row takes the argmax (SamplingParams.is_greedy)
    is_all_greedy: bool
    temperature: torch.Tensor | None  # [batch] float, each row's own (0 for some greedy rows)
    top_k: torch.Tensor | None  # [batch] long, vocab size where disabled
    top_p: torch.Tensor | None  # [batch] float
    min_p: torch.Tensor | None  # [batch] float
    penalties: _Penalties | None
    min_tokens_mask: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) to set to -inf
    constraints: TokenConstraints | None  # logit_bias, allowed_token_ids, bad_words; None: none
    grammar: GrammarMasks | None  # structured output's masks for the constrained rows; None: none
    generators: dict[int, torch.Generator]  # row -> generator seeded for this token
    max_num_logprobs: int | None
    num_logprobs: list[int | None]  # per row: None, or how many alternatives to return
    # The rows that draw (not greedy), and of those (positions in `sampled_rows`) the ones
    # with a top-k or top-p filter: vocabulary-wide work is done for these rows only.
    sampled_rows: torch.Tensor | None = None  # [num_sampled] long; None: all greedy
    filtered_rows: torch.Tensor | None = None  # [num_filtered] long; None: no row filters


@dataclass
class _Penalties:
    """One entry per (penalised row, token in its prompt or output): the logits it changes."""

    rows: torch.Tensor  # [num_entries] long
    token_ids: torch.Tensor  # [num_entries] long; a row's tokens each once
    counts: torch.Tensor  # [num_entries] float: times the token is in the row's output
    repetition: torch.Tensor  # [num_entries] float: the row's
    presence: torch.Tensor  # [num_entries] float: the row's
    frequency: torch.Tensor  # [num_entries] float: the row's


def token_seed(seed: int, output_index: int) -> int:
    """A generator seed for the `output_index`-th token of a request seeded with `seed`.

    NOTE: derived from the token's index, not carried as generator state, so that a request
    that is preempted and recomputed (or moved to another replica) draws the same tokens.
    """
    z = (seed * 0x9E3779B97F4A7C15 + output_index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def prepare_sampling_batch(
    rows: list[SamplingRow], *, vocab_size: int, device: torch.device
) -> SamplingBatch:
    """The batch's knobs as tensors. An all-greedy batch reads no knob: its only tensor is
    `is_greedy`, and those of the penalties, constraints and min_tokens its rows ask for."""
    # NOTE: the grammar masks first: on a GPU the host fills them while the forward runs.
    grammar = prepare_grammar_masks(rows, vocab_size=vocab_size, device=device)
    sampling_params = [r.sampling_params for r in rows]
    is_greedy = [p.is_greedy for p in sampling_params]
    sampled = [i for i, greedy in enumerate(is_greedy) if not greedy]
    knobs = _sampling_knobs(sampling_params, vocab_size) if sampled else {}

    def column(name: str, dtype: torch.dtype) -> torch.Tensor | None:
        """A knob's values, or None when no sampled row moves it off its neutral value."""
        values = knobs.get(name)
        neutral = vocab_size if name == "top_k" else NEUTRAL_KNOBS[name]
        if values is None or all(values[i] == neutral for i in sampled):
            return None
        return torch.tensor(values, dtype=dtype, device=device)

    asked = [p.logprobs for p in sampling_params if p.logprobs is not None]
    filtered = [
        k
        for k, i in enumerate(sampled)
        if knobs["top_k"][i] != vocab_size or knobs["top_p"][i] != 1.0
    ]
    return SamplingBatch(
        is_greedy=torch.tensor(is_greedy, dtype=torch.bool, device=device),
        is_all_greedy=not sampled,
        temperature=column("temperature", torch.float32),
        top_k=column("top_k", torch.long),
        top_p=column("top_p", torch.float32),
        min_p=column("min_p", torch.float32),
        penalties=_prepare_penalties(rows, device),
        min_tokens_mask=_prepare_min_tokens_mask(rows, device),
        constraints=prepare_token_constraints(rows, device=device),
        grammar=grammar,
        generators=_generators(rows, sampled, device),
        max_num_logprobs=max(asked) if asked else None,
        num_logprobs=[p.logprobs for p in sampling_params],
        sampled_rows=_index(sampled, device) if sampled else None,
        filtered_rows=_index(filtered, device) if filtered else None,
    )


def _sampling_knobs(params: list[SamplingParams], vocab_size: int) -> dict[str, list[float]]:
    """Every row's temperature, top_k (the vocabulary size where off), top_p and min_p."""
    knobs = {
        name: [neutral if (value := getattr(p, name)) is None else value for p in params]
        for name, neutral in NEUTRAL_KNOBS.items()
        if name != "repetition_penalty"  # (the penalties' own)
    }
    knobs["top_k"] = [int(k) or vocab_size for k in knobs["top_k"]]  # 0: every token
    return knobs


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _generators(
    rows: list[SamplingRow], sampled: list[int], device: torch.device
) -> dict[int, torch.Generator]:
    """A generator for each seeded sampled row, seeded for the row's next token."""
    generators = {}
    for i in sampled:
        seed = rows[i].sampling_params.seed
        if seed is not None:
            g = torch.Generator(device=device)
            g.manual_seed(token_seed(seed, rows[i].num_output_tokens))
            generators[i] = g
    return generators


def _prepare_penalties(rows: list[SamplingRow], device: torch.device) -> _Penalties | None:
    """The penalised rows' seen tokens, as entries."""
    entry_rows, token_ids, counts = array("q"), array("q"), array("f")
    knobs: tuple[array, array, array] = (array("f"), array("f"), array("f"))
    for i, row in enumerate(rows):
        p = row.sampling_params
        values = (p.knob("repetition_penalty"), p.presence_penalty, p.frequency_penalty)
        if values == (1.0, 0.0, 0.0):
            continue
        output = Counter(row.token_ids[row.num_prompt_tokens :])
        seen = set(row.token_ids[: row.num_prompt_tokens]).union(output)
        token_ids.extend(seen)
        counts.extend([output.get(t, 0) for t in seen])
        entry_rows.extend(array("q", [i]) * len(seen))
        for column, value in zip(knobs, values):
            column.extend(array("f", [value]) * len(seen))
    if not entry_rows:
        return None
    tensors = [_tensor(a, device) for a in (entry_rows, token_ids, counts, *knobs)]
    return _Penalties(*tensors)


def _prepare_min_tokens_mask(
    rows: list[SamplingRow], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    row_idx: list[int] = []
    token_idx: list[int] = []
    for i, row in enumerate(rows):
        if row.num_output_tokens < row.sampling_params.min_tokens:
            stop_ids = set(row.sampling_params.stop_token_ids)
            if not row.sampling_params.ignore_eos:
                stop_ids.update(row.eos_token_ids)
            row_idx.extend([i] * len(stop_ids))
            token_idx.extend(sorted(stop_ids))
    if not row_idx:
        return None
    return torch.tensor(row_idx, device=device), torch.tensor(token_idx, device=device)


class Sampler:
    """Stateless: `sample(logits, batch)` -> (token ids, logprobs per row or None). `argmax`:
    an op that gives torch.argmax(x, dim=-1) of contiguous fp32 CPU rows faster than ATen's
    (`cpu_kernels.argmax_rows`, ~10x on a batch of logits), or None for torch's."""

    def __init__(self, argmax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self._argmax = argmax

    def _greedy(self, logits: torch.Tensor) -> torch.Tensor:  # [batch, vocab] fp32 -> [batch]
        if self._argmax is not None and logits.device.type == "cpu" and logits.is_contiguous():
            return self._argmax(logits)
        return logits.argmax(dim=-1)

    def sample(
        self,
        logits: torch.Tensor,  # [batch, vocab]
        batch: SamplingBatch,
    ) -> tuple[list[int], list[Logprobs | None] | None]:
        logits = logits.float()
        raw_logprobs = (
            torch.log_softmax(logits, dim=-1) if batch.max_num_logprobs is not None else None
        )
        unmasked = logits
        changes = (batch.min_tokens_mask, batch.constraints, batch.penalties)
        if any(change is not None for change in changes):
            logits = logits.clone()
        # NOTE: without those, the grammar masks the caller's logits in place: the worker reads
        # a sampling row's logits only here (logprobs were taken above).
        if batch.min_tokens_mask is not None:
            mask_rows, mask_ids = batch.min_tokens_mask
            logits[mask_rows, mask_ids] = float("-inf")
        if batch.constraints is not None:
            logits = apply_token_constraints(logits, batch.constraints)
        if batch.grammar is not None:
            masked_before = batch.constraints is not None or batch.min_tokens_mask is not None
            apply_grammar_masks(logits, batch.grammar, unmasked=unmasked if masked_before else None)
        if batch.penalties is not None:
            logits = apply_penalties(logits, batch.penalties)
        tokens = self._greedy(logits)
        if not batch.is_all_greedy:
            assert batch.sampled_rows is not None
            tokens[batch.sampled_rows] = self._sample_random(logits, batch)
        token_ids: list[int] = tokens.tolist()
        if raw_logprobs is None:
            return token_ids, None
        return token_ids, _gather_logprobs(raw_logprobs, tokens, batch)

    def _sample_random(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """A draw for each sampled row: [num_sampled], parallel to `batch.sampled_rows`.

        NOTE: every filter works row by row, so a row's draw is the same whether or not the
        batch's other rows are computed beside it; only the sampled rows are.
        """
        assert batch.sampled_rows is not None
        rows = batch.sampled_rows
        logits = logits[rows]  # [num_sampled, vocab]
        if batch.temperature is not None:
            logits.div_(batch.temperature[rows][:, None])  # (a copy: the rows were gathered)
        if batch.filtered_rows is not None:
            f = batch.filtered_rows
            top_k = None if batch.top_k is None else batch.top_k[rows[f]]
            top_p = None if batch.top_p is None else batch.top_p[rows[f]]
            logits[f] = apply_top_k_top_p(logits[f], top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        if batch.min_p is not None:
            probs = apply_min_p(probs, batch.min_p[rows])
        # NOTE: the unseeded rows' numbers are a draw for the whole batch from the global
        # generator, whichever rows sample: the same numbers, step after step.
        uniform = torch.rand(batch.is_greedy.shape[0], dtype=torch.float64, device=probs.device)
        for row, generator in batch.generators.items():
            uniform[row] = torch.rand(
                (), dtype=torch.float64, generator=generator, device=probs.device
            )
        return draw(probs, uniform[rows])


def apply_penalties(logits: torch.Tensor, p: _Penalties) -> torch.Tensor:
    """Repetition (prompt + output), presence and frequency (output only) penalties, in place
    on the logits of the tokens each row has seen (the others are left as they are).

    NOTE: each entry takes the arithmetic a dense [batch, vocab] pass would, in its order.
    """
    seen = logits[p.rows, p.token_ids]  # [num_entries]
    penalised = torch.where(seen > 0, seen / p.repetition, seen * p.repetition)
    logits[p.rows, p.token_ids] = (
        penalised - p.frequency * p.counts - p.presence * (p.counts > 0).to(logits.dtype)
    )
    return logits


def draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token a row of `probs` ([rows, vocab], each row's weights, not necessarily summing
    to 1) for `uniform` ([rows] in [0, 1)): the first token whose cumulative weight passes
    `uniform` times the row's total. Exact up to fp32's rounding of the running sums."""
    cdf = probs.cumsum(dim=-1)
    target = (uniform[:, None] * cdf[:, -1:].double()).to(cdf.dtype)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)
    # NOTE: only rounding at a row's end can land on a token of weight 0 (masked): its likeliest
    unlikely = probs.gather(1, tokens[:, None]).squeeze(1) == 0
    return torch.where(unlikely, probs.argmax(dim=-1), tokens)


def apply_top_k_top_p(
    logits: torch.Tensor,  # [batch, vocab]
    top_k: torch.Tensor | None,  # [batch] long
    top_p: torch.Tensor | None,  # [batch] float
) -> torch.Tensor:
    """Keep each row's top_k tokens, then the smallest set whose probability reaches top_p."""
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        ranks = torch.arange(logits.shape[-1], device=logits.device)
        sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # NOTE: the first token always stays (mass before it is 0 < top_p). A row at 1.0 keeps
        # every token: a float32 sum of many probabilities can round past 1, which would cut
        # its tail (and make its draws depend on whether another row filters).
        cut = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
        sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero tokens whose probability is below min_p times the row's top probability."""
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return probs.masked_fill(probs < threshold, 0.0)


def _gather_logprobs(
    raw_logprobs: torch.Tensor,  # [batch, vocab]
    tokens: torch.Tensor,  # [batch]
    batch: SamplingBatch,
) -> list[Logprobs | None]:
    assert batch.max_num_logprobs is not None
    chosen = raw_logprobs.gather(-1, tokens[:, None])[:, 0].tolist()
    top_values, top_ids = raw_logprobs.topk(max(batch.max_num_logprobs, 1), dim=-1)
    top_values_list, top_ids_list = top_values.tolist(), top_ids.tolist()
    token_list = tokens.tolist()
    out: list[Logprobs | None] = []
    for i, k in enumerate(batch.num_logprobs):
        if k is None:
            out.append(None)
        else:
            out.append(
                Logprobs(token_list[i], chosen[i], top_ids_list[i][:k], top_values_list[i][:k])
            )
    return out


def beam_candidates(
    logits: torch.Tensor,  # [num_beams_in_batch, vocab]
    rows: list[SamplingRow],
    *,
    grammar: GrammarMasks | None = None,  # `prepare_grammar_masks(rows)`, where any has one
) -> tuple[list[list[int]], list[list[float]]]:
    """Each beam's best next tokens (`SamplingParams.num_beam_candidates`, fewer where the
    rest are banned) and their log-probabilities, as Hugging Face's beam search scores them:
    log-softmax, then EOS and stop ids masked below min_tokens, then the token constraints (a
    bias adds to the score, as HF's `sequence_bias`), then the grammar masks. A banned token is
    never a candidate, and every candidate of a constrained beam follows its grammar."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    min_tokens_mask = _prepare_min_tokens_mask(rows, logits.device)
    if min_tokens_mask is not None:
        logprobs[min_tokens_mask] = float("-inf")
    vocab = logprobs.shape[-1]
    constraints = prepare_token_constraints(rows, device=logits.device)
    unmasked = logprobs.clone() if grammar is not None and constraints is not None else None
    if constraints is not None:
        logprobs = apply_token_constraints(logprobs, constraints)
    if grammar is not None:
        apply_grammar_masks(logprobs, grammar, unmasked=unmasked)
    widths = [min(r.sampling_params.num_beam_candidates(r.eos_token_ids), vocab) for r in rows]
    values, ids = logprobs.topk(max(widths), dim=-1)
    ids_list, values_list = [], []
    for token_ids, scores, width in zip(ids.tolist(), values.tolist(), widths):
        kept = [k for k in range(width) if scores[k] != float("-inf")]
        ids_list.append([token_ids[k] for k in kept])
        values_list.append([scores[k] for k in kept])
    return ids_list, values_list


def prompt_logprobs(
    logits: torch.Tensor,  # [num_positions, vocab]: positions p .. p + num_positions - 1
    next_token_ids: list[int],  # the prompt tokens at p + 1 .. p + num_positions
    num_top: int,
) -> list[Logprobs]:
    """Log-probability of each next prompt token, and the `num_top` most likely tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor(next_token_ids, device=logits.device)
    chosen = logprobs.gather(-1, targets[:, None])[:, 0].tolist()
    top_values, top_ids = logprobs.topk(max(num_top, 1), dim=-1)
    return [
        Logprobs(token_id, value, ids[:num_top], values[:num_top])
        for token_id, value, ids, values in zip(
            next_token_ids, chosen, top_ids.tolist(), top_values.tolist()
        )
    ]
