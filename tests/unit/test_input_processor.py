"""The input step's model-dependent checks: the context limit and the model's sampling
defaults, applied before a request is queued."""

from __future__ import annotations

import pytest

from kvray.cluster.input_processor import InputProcessor
from kvray.workers.fake import FakeWorker
from kvray.workers.protocol import InvalidParameterError, SamplingParams


def processor(**info_changes) -> InputProcessor:
    info = FakeWorker(vocab_size=100).warmup()
    return InputProcessor(info.__class__(**{**info.__dict__, **info_changes}), tokenizer=None)


def test_a_prompt_plus_max_tokens_past_the_context_is_refused():
    inputs = processor(max_model_len=64)
    prompt = list(range(1, 41))  # 40 tokens: 24 left
    assert inputs.process(prompt, SamplingParams(max_tokens=24), "fits").sampling_params
    with pytest.raises(InvalidParameterError) as err:
        inputs.process(prompt, SamplingParams(max_tokens=25), "over")
    assert err.value.param == "max_tokens"
    assert "40 tokens + max_tokens=25" in str(err.value) and "at most 24" in str(err.value)
    unbounded = inputs.process(prompt, SamplingParams(max_tokens=None), "rest")
    assert unbounded.sampling_params.max_tokens is None  # up to the end of the context


def test_samples_of_the_largest_seed_wrap_into_int64_and_draw_as_seed_plus_index():
    from kvray.workers.sampler import token_seed

    largest = 2**63 - 1
    request = processor().process([1, 2, 3], SamplingParams(n=3, seed=largest), "r")
    assert [s.sampling_params.seed for s in request.seqs] == [largest, -(2**63), -(2**63) + 1]
    for index, seq in enumerate(request.seqs):
        assert seq.sampling_params.seed is not None
        assert token_seed(seq.sampling_params.seed, 5) == token_seed(largest + index, 5)


def test_unset_knobs_take_the_models_sampling_defaults():
    inputs = processor(sampling_defaults={"temperature": 0.2, "top_p": 0.9})
    request = inputs.process([1, 2, 3], SamplingParams(top_p=0.5), "r")
    assert (request.sampling_params.temperature, request.sampling_params.top_p) == (0.2, 0.5)
    assert all(s.sampling_params.temperature == 0.2 for s in request.seqs)
    beams = inputs.process([1, 2, 3], SamplingParams(num_beams=2, max_tokens=4), "b")
    assert beams.sampling_params.temperature is None


@pytest.mark.parametrize(
    ("params", "param", "message"),
    [
        ({"logit_bias": {100: 5.0}}, "logit_bias", "outside the vocabulary [0, 100): [100]"),
        ({"allowed_token_ids": [1, 250]}, "allowed_token_ids", "ids in [0, 100); got 2 ids"),
        ({"allowed_token_ids": [1] * 101}, "allowed_token_ids", "at most 100 ids"),
        ({"bad_words": ["darn"]}, "bad_words", "bad_words need a tokenizer"),
    ],
)
def test_token_constraints_outside_the_model_are_refused_before_queueing(params, param, message):
    with pytest.raises(InvalidParameterError) as err:
        processor().process([1, 2, 3], SamplingParams(**params), "r")
    assert err.value.param == param and message in str(err.value)


# How a BPE tokenizer may split these texts: a word after a space starts with another token
# ("darn"), or is fewer tokens ("heck"), or the space is a token of its own ("x").
WORD_TOKENS = {"darn": [10, 11], " darn": [12, 11], "heck": [13, 16], " heck": [14]}
WORD_TOKENS |= {"x": [15], " x": [1, 15]}


class WordTokenizer:
    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": WORD_TOKENS[text]}


def test_bad_words_become_token_ids_at_a_texts_start_and_after_a_space():
    inputs = InputProcessor(processor().info, tokenizer=WordTokenizer())
    request = inputs.process([1, 2], SamplingParams(bad_words=["darn", " heck", "x"]), "r")
    want = ((10, 11), (12, 11), (13, 16), (14,), (15,))  # (1, 15) ends with (15,): banned
    assert request.sampling_params.bad_words_token_ids == want
    assert all(seq.sampling_params.bad_words_token_ids == want for seq in request.seqs)


def test_allowed_ids_that_bad_words_all_ban_are_refused():
    inputs = InputProcessor(processor().info, tokenizer=WordTokenizer())
    with pytest.raises(InvalidParameterError, match="one-token word of bad_words") as err:
        inputs.process(
            [1, 2], SamplingParams(allowed_token_ids=[15, 14], bad_words=["x", " heck"]), "r"
        )
    assert err.value.param == "allowed_token_ids"
    # a word of two tokens bans its last one only after the first: allowed ids stay usable
    request = inputs.process(
        [1, 2], SamplingParams(allowed_token_ids=[11], bad_words=["darn"]), "r"
    )
    assert request.sampling_params.allowed_token_ids == (11,)


def test_allowed_ids_that_all_end_the_sequence_below_min_tokens_are_refused():
    eos = processor().info.eos_token_ids
    stops = SamplingParams(allowed_token_ids=[*eos, 7], stop_token_ids=[7], min_tokens=2)
    with pytest.raises(InvalidParameterError, match="min_tokens") as err:
        processor().process([1, 2, 3], stops, "r")
    assert err.value.param == "allowed_token_ids"
    # with ignore_eos the end-of-sequence ids are ordinary tokens
    ignored = SamplingParams(allowed_token_ids=list(eos), min_tokens=2, ignore_eos=True)
    assert processor().process([1, 2, 3], ignored, "r").sampling_params.min_tokens == 2


def test_bad_words_token_ids_a_caller_set_are_replaced():
    inputs = InputProcessor(processor().info, tokenizer=WordTokenizer())
    forged = SamplingParams(bad_words_token_ids=[(1,)])
    assert inputs.process([1, 2], forged, "r").sampling_params.bad_words_token_ids == ()


def test_bad_words_giving_too_many_token_sequences_are_refused():
    inputs = InputProcessor(processor().info, tokenizer=WordTokenizer())
    with pytest.raises(InvalidParameterError, match="give 130 token sequences") as err:
        inputs.process([1, 2], SamplingParams(bad_words=["darn"] * 65), "r")
    assert err.value.param == "bad_words"
