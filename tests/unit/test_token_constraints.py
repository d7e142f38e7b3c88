"""logit_bias, allowed_token_ids and bad_words in the sampler, on hand-built logits: greedy and
sampled rows, beams, logprobs, and a batch without them left as it was."""

from __future__ import annotations

import math

import pytest
import torch

from kvray.workers.protocol import SamplingParams
from kvray.workers.sampler import Sampler, SamplingRow, beam_candidates, prepare_sampling_batch
from kvray.workers.token_constraints import banned_by_bad_words

CPU = torch.device("cpu")
LOGITS = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])  # argmax 0


def sample(logits, params_list, outputs=None, num_prompt_tokens=1):
    rows = [
        SamplingRow(
            p, [0] * num_prompt_tokens + list(outputs[i] if outputs else []), num_prompt_tokens
        )
        for i, p in enumerate(params_list)
    ]
    batch = prepare_sampling_batch(rows, vocab_size=logits.shape[-1], device=CPU)
    return Sampler().sample(logits, batch)


def greedy(**constraints) -> SamplingParams:
    return SamplingParams(temperature=0, **constraints)


def sampled(**constraints) -> SamplingParams:
    return SamplingParams(temperature=1.0, **constraints)


def test_plus_100_forces_a_token_greedy_and_sampled():
    torch.manual_seed(0)
    for params in (greedy(logit_bias={4: 100}), sampled(logit_bias={4: 100})):
        tokens, _ = sample(LOGITS.repeat(200, 1), [params] * 200)
        assert set(tokens) == {4}, params


def test_minus_100_bans_the_argmax():
    tokens, _ = sample(LOGITS, [greedy(logit_bias={0: -100})])
    assert tokens == [1]
    torch.manual_seed(0)
    tokens, _ = sample(torch.zeros(400, 6), [sampled(logit_bias={0: -100, 2: -100})] * 400)
    assert set(tokens) == {1, 3, 4, 5}


def test_a_small_bias_moves_a_near_tie():
    tokens, _ = sample(LOGITS, [greedy(logit_bias={1: 1.5})])
    assert tokens == [1]  # 3 + 1.5 > 4


def test_allowed_token_ids_restrict_greedy_and_sampled_rows():
    tokens, _ = sample(LOGITS, [greedy(allowed_token_ids=[3, 5])])
    assert tokens == [3]
    torch.manual_seed(0)
    tokens, _ = sample(torch.zeros(400, 6), [sampled(allowed_token_ids=[2, 5])] * 400)
    assert set(tokens) == {2, 5}


def test_a_bias_applies_within_the_allowed_tokens_only():
    tokens, _ = sample(LOGITS, [greedy(allowed_token_ids=[3, 5], logit_bias={5: 5, 0: 100})])
    assert tokens == [5]  # 0 is not allowed, whatever its bias


def test_a_one_token_bad_word_is_always_banned():
    tokens, _ = sample(LOGITS, [greedy(bad_words_token_ids=[(0,)])])
    assert tokens == [1]


def test_a_bad_words_last_token_is_banned_only_right_after_its_prefix():
    word = greedy(bad_words_token_ids=[(2, 3, 0)])
    assert sample(LOGITS, [word], outputs=[[2, 3]])[0] == [1]  # "2 3" just generated
    assert sample(LOGITS, [word], outputs=[[3]])[0] == [0]  # only part of the prefix
    assert sample(LOGITS, [word], outputs=[[2, 3, 4]])[0] == [0]  # not right after it
    assert sample(LOGITS, [word], outputs=[[]])[0] == [0]


def test_a_bad_words_prefix_in_the_prompt_does_not_count():
    word = greedy(bad_words_token_ids=[(2, 3, 0)])
    rows = [SamplingRow(word, [2, 3], num_prompt_tokens=2)]
    batch = prepare_sampling_batch(rows, vocab_size=6, device=CPU)
    assert Sampler().sample(LOGITS, batch)[0] == [0]


def test_banned_by_bad_words_lists_every_word_completed_now():
    words = [(7,), (1, 2), (5, 1, 3), (9, 9)]
    assert banned_by_bad_words(words, [4, 5, 1]) == {7, 2, 3}
    assert banned_by_bad_words(words, [1]) == {7, 2}
    assert banned_by_bad_words(words, []) == {7}


def test_a_ban_outweighs_a_bias_on_the_same_token():
    tokens, _ = sample(LOGITS, [greedy(logit_bias={4: 100}, bad_words_token_ids=[(4,)])])
    assert tokens == [0]


def test_each_row_keeps_its_own_constraints_in_a_mixed_batch():
    logits = LOGITS.repeat(4, 1)
    params = [greedy(), greedy(logit_bias={5: 100}), sampled(allowed_token_ids=[3]), greedy()]
    tokens, _ = sample(logits, params)
    assert tokens == [0, 5, 3, 0]


def test_a_batch_without_constraints_prepares_none():
    rows = [SamplingRow(p, [0], 1) for p in (greedy(), sampled(), SamplingParams(top_k=3))]
    assert prepare_sampling_batch(rows, vocab_size=6, device=CPU).constraints is None


def test_logprobs_are_the_models_before_the_bias():
    tokens, logprobs = sample(LOGITS, [greedy(logit_bias={4: 100}, logprobs=1)])
    raw = torch.log_softmax(LOGITS[0], -1)
    assert tokens == [4] and logprobs[0].token_id == 4
    assert math.isclose(logprobs[0].logprob, float(raw[4]), rel_tol=1e-6)
    assert logprobs[0].top_token_ids == [0]


def test_the_callers_logits_are_left_unchanged():
    logits = LOGITS.clone()
    sample(logits, [greedy(logit_bias={4: 100}, allowed_token_ids=[4, 5])])
    assert torch.equal(logits, LOGITS)


def beam_row(**constraints) -> SamplingRow:
    return SamplingRow(SamplingParams(num_beams=2, max_tokens=4, **constraints), [0], 1)


def test_beams_take_no_banned_token_as_a_candidate():
    logits = LOGITS.repeat(2, 1)
    rows = [beam_row(allowed_token_ids=[2, 4]), beam_row(bad_words_token_ids=[(0,), (1,)])]
    ids, scores = beam_candidates(logits, rows)
    assert ids[0] == [2, 4]  # fewer than the 4 candidates a beam offers: the rest are banned
    assert ids[1] == [2, 3, 4, 5]
    assert all(math.isfinite(s) for row in scores for s in row)


def test_a_beams_bias_adds_to_its_log_probabilities():
    ids, scores = beam_candidates(LOGITS, [beam_row(logit_bias={5: 10})])
    raw = torch.log_softmax(LOGITS[0], -1)
    assert ids[0][0] == 5
    assert scores[0][0] == pytest.approx(float(raw[5]) + 10)


def test_an_allowed_end_of_sequence_stays_masked_below_min_tokens():
    params = greedy(allowed_token_ids=[0, 4], min_tokens=2)
    rows = [SamplingRow(params, [9], 1, eos_token_ids=(0,))]
    batch = prepare_sampling_batch(rows, vocab_size=6, device=CPU)
    assert Sampler().sample(LOGITS, batch)[0] == [4]
