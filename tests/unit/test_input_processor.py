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
