"""Sampler on hand-built logits: filters keep exactly the expected tokens, seeds, penalties, statistics."""

from __future__ import annotations

import math

import pytest
import torch

from kvray.workers.protocol import SamplingParams
from kvray.workers.sampler import (
    Sampler,
    SamplingRow,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    prepare_sampling_batch,
)

CPU = torch.device("cpu")
PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])


def sample(logits, params_list, token_ids=None, eos=()):
    rows = [
        SamplingRow(p, list(token_ids[i]) if token_ids else [0], 1, eos)
        for i, p in enumerate(params_list)
    ]
    batch = prepare_sampling_batch(rows, vocab_size=logits.shape[-1], device=CPU)
    return Sampler().sample(logits, batch)


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


@pytest.mark.parametrize(
    ("top_p", "expected"), [(0.5, {0}), (0.8, {0, 1}), (0.81, {0, 1, 2}), (1.0, {0, 1, 2, 3})]
)
def test_top_p_keeps_smallest_set_reaching_p(top_p, expected):
    out = apply_top_k_top_p(PROBS.log(), None, torch.tensor([top_p]))
    assert kept(out) == expected


def test_top_p_1_keeps_every_token_of_a_wide_vocabulary():
    logits = torch.randn(4, 49152, generator=torch.Generator().manual_seed(0)) * 3
    out = apply_top_k_top_p(logits, None, torch.tensor([1.0, 1.0, 1.0, 0.9]))
    assert torch.isfinite(out[:3]).all()  # float32 mass past 1 cuts no tail
    assert not torch.isfinite(out[3]).all()


@pytest.mark.parametrize(("top_k", "expected"), [(1, {0}), (2, {0, 1}), (4, {0, 1, 2, 3})])
def test_top_k_keeps_k_most_likely(top_k, expected):
    out = apply_top_k_top_p(PROBS.log(), torch.tensor([top_k]), None)
    assert kept(out) == expected


@pytest.mark.parametrize(("min_p", "expected"), [(0.0, {0, 1, 2, 3}), (0.2, {0, 1, 2}), (0.7, {0})])
def test_min_p_drops_tokens_below_fraction_of_top(min_p, expected):
    out = apply_min_p(PROBS.clone(), torch.tensor([min_p]))
    assert set(torch.nonzero(out[0]).flatten().tolist()) == expected


def test_filters_hold_when_sampling_many_times():
    logits = PROBS.log().repeat(4000, 1)
    torch.manual_seed(0)
    tokens, _ = sample(logits, [SamplingParams(temperature=1.0, top_p=0.8)] * 4000)
    assert set(tokens) == {0, 1}
    tokens, _ = sample(logits, [SamplingParams(temperature=1.0, min_p=0.2)] * 4000)
    assert set(tokens) == {0, 1, 2}


def test_top_k_1_equals_greedy():
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(0))
    greedy, _ = sample(logits, [SamplingParams(temperature=0)] * 16)
    top1, _ = sample(logits, [SamplingParams(temperature=1.3, top_k=1)] * 16)
    assert top1 == greedy == logits.argmax(-1).tolist()


def test_seeded_row_ignores_batch_composition():
    g = torch.Generator().manual_seed(0)
    row = torch.randn(1, 500, generator=g)
    params = SamplingParams(temperature=1.0, seed=1234)
    alone, _ = sample(row, [params])
    others = torch.randn(5, 500, generator=g)
    mixed_logits = torch.cat([others[:3], row, others[3:]])
    mixed_params = (
        [SamplingParams(temperature=0.7)] * 3 + [params] + [SamplingParams(temperature=0)] * 2
    )
    mixed, _ = sample(mixed_logits, mixed_params)
    assert mixed[3] == alone[0]


def test_seed_changes_the_draw_per_output_position():
    row = torch.zeros(1, 1000)  # uniform: every position draws afresh
    params = SamplingParams(temperature=1.0, seed=7)
    draws = {sample(row, [params], token_ids=[[0] * (1 + k)])[0][0] for k in range(20)}
    assert len(draws) > 10


def test_temperature_sampling_follows_softmax_chi_square():
    # 20,000 draws from softmax(logits / T); chi-square against the expected counts.
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    temperature, n = 0.7, 20_000
    torch.manual_seed(0)
    tokens, _ = sample(logits.repeat(n, 1), [SamplingParams(temperature=temperature)] * n)
    observed = torch.bincount(torch.tensor(tokens), minlength=6).double()
    expected = torch.softmax(logits[0].double() / temperature, -1) * n
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    # 5 degrees of freedom: P(chi2 > 20.52) = 0.001 under the null hypothesis.
    assert chi2 < 20.52, (observed.tolist(), expected.tolist())


def test_temperature_changes_the_distribution():
    # The same check must reject a wrong temperature: draws at T=1.5 against softmax(x / 0.7).
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 20_000
    torch.manual_seed(0)
    tokens, _ = sample(logits.repeat(n, 1), [SamplingParams(temperature=1.5)] * n)
    observed = torch.bincount(torch.tensor(tokens), minlength=6).double()
    expected = torch.softmax(logits[0].double() / 0.7, -1) * n
    assert float(((observed - expected) ** 2 / expected).sum()) > 20.52


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, 3.0]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    # prompt [0], output [1]: tokens 0 and 1 are seen. 2/2 = 1, -2*2 = -4; argmax stays 3.
    tokens, _ = sample(logits, [params], token_ids=[[0, 1]])
    assert tokens == [3]
    logits = torch.tensor([[3.0, -2.0, 1.0, 2.0]])
    tokens, _ = sample(logits, [params], token_ids=[[0, 1]])
    assert tokens == [3]  # 3/2 = 1.5 < 2


def test_frequency_and_presence_penalties_count_output_tokens():
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    # output holds token 0 three times: 5 - 3 * 0.5 (frequency) - 0.2 (presence) = 3.3 < 4.
    params = SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=0.2)
    tokens, _ = sample(logits, [params], token_ids=[[2, 0, 0, 0]])
    assert tokens == [1]
    # The same count in the prompt is not penalised by frequency/presence.
    tokens, _ = sample(logits, [params], token_ids=[[0]])
    assert tokens == [0]


def test_penalties_change_only_the_seen_logits_of_penalised_rows():
    logits = torch.tensor([[2.0, -2.0, 1.0, -0.5], [2.0, -2.0, 1.0, -0.5]])
    params = [
        SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=0.5),
        SamplingParams(temperature=0),
    ]
    # row 0: prompt [0], output [1, 1]
    rows = [SamplingRow(params[0], [0, 1, 1], 1), SamplingRow(params[1], [0, 1, 1], 1)]
    batch = prepare_sampling_batch(rows, vocab_size=4, device=CPU)
    assert batch.penalties is not None
    out = apply_penalties(logits.clone(), batch.penalties)
    # token 0 seen in the prompt: 2 / 2; token 1 twice in the output: -2 * 2 - 0.5 * 2
    assert out[0].tolist() == [1.0, -5.0, 1.0, -0.5]
    assert torch.equal(out[1], logits[1])


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[9.0, 8.0, 1.0]])
    eos_first = SamplingParams(temperature=0, min_tokens=2)
    tokens, _ = sample(logits, [eos_first], token_ids=[[2]], eos=(0,))
    assert tokens == [1]
    stop_too = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1])
    tokens, _ = sample(logits, [stop_too], token_ids=[[2]], eos=(0,))
    assert tokens == [2]
    done = SamplingParams(temperature=0, min_tokens=2)
    tokens, _ = sample(logits, [done], token_ids=[[2, 5, 5]], eos=(0,))
    assert tokens == [0]


def test_logprobs_are_the_models_log_softmax():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    params = [SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=0)]
    tokens, logprobs = sample(logits, params)
    assert tokens == [1, 3]
    ref = torch.log_softmax(logits[0], -1)
    lp = logprobs[0]
    assert lp.token_id == 1 and math.isclose(lp.logprob, float(ref[1]), rel_tol=1e-6)
    assert lp.top_token_ids == [1, 2]
    assert lp.top_logprobs == pytest.approx([float(ref[1]), float(ref[2])])
    assert logprobs[1] is None


def test_the_batch_keeps_each_rows_temperature_and_marks_greedy_rows_apart():
    rows = [
        SamplingParams(temperature=0.7, top_k=1),  # greedy by top_k, its temperature kept
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.5, seed=3),
    ]
    batch = prepare_sampling_batch([SamplingRow(p, [0], 1) for p in rows], vocab_size=4, device=CPU)
    assert batch.is_greedy.tolist() == [True, True, False] and not batch.is_all_greedy
    assert batch.temperature is not None
    assert batch.temperature.tolist() == pytest.approx([0.7, 0.0, 0.5])
    assert list(batch.generators) == [2]  # only the sampled row draws
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 3)
    tokens, _ = Sampler().sample(logits, batch)
    assert tokens[:2] == [1, 1]


def test_unset_knobs_sample_as_their_neutral_values():
    logits = torch.randn(1, 50)
    seeded = {"seed": 11, "max_tokens": 4}
    unset, _ = sample(logits, [SamplingParams(**seeded)])
    neutral, _ = sample(
        logits,
        [SamplingParams(**seeded, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                        repetition_penalty=1.0)],
    )  # fmt: skip
    assert unset == neutral
