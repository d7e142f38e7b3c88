"""SamplingParams validation: every bad value raises ValueError naming the field and the range."""

from __future__ import annotations

import pytest

from kvray.workers.protocol import SamplingParams


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.1, "temperature must be in [0.0, 100.0]"),
        ("top_p", 0.0, "top_p must be in (0.0, 1.0]"),
        ("top_p", 1.5, "top_p must be in (0.0, 1.0]"),
        ("top_k", -2, "top_k must be in [0, 2147483647] (0 or -1 disables it)"),
        ("min_p", 1.1, "min_p must be in [0.0, 1.0]"),
        ("repetition_penalty", 0.0, "repetition_penalty must be in (0.0, 100.0]"),
        ("presence_penalty", 3.0, "presence_penalty must be in [-2.0, 2.0]"),
        ("frequency_penalty", -2.5, "frequency_penalty must be in [-2.0, 2.0]"),
        ("max_tokens", 0, "max_tokens must be in [1, 2147483647]"),
        ("min_tokens", -1, "min_tokens must be in [0, 2147483647]"),
        ("n", 0, "n must be in [1, 16]"),
        ("logprobs", 21, "logprobs must be in [0, 20]"),
        ("temperature", float("nan"), "temperature must be a number"),
        ("seed", 1.5, "seed must be an integer"),
        ("max_tokens", True, "max_tokens must be an integer"),
    ],
)
def test_out_of_range_field_is_named(field, value, message):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    assert message in str(err.value)


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match="min_tokens must be <= max_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match="stop must hold non-empty strings"):
        SamplingParams(stop=["ok", ""])


@pytest.mark.parametrize("greedy", [{"temperature": 0}, {"temperature": 1.0, "top_k": 1}])
def test_greedy_n_greater_than_one_is_rejected(greedy):
    # One greedy rule: top_k=1 is greedy too, so its n samples would all be equal.
    assert SamplingParams(**greedy).is_greedy
    with pytest.raises(ValueError, match="n > 1 needs random sampling"):
        SamplingParams(n=2, **greedy)


def test_lists_become_tuples_and_minus_one_disables_top_k():
    p = SamplingParams(stop="END", stop_token_ids=[1, 2], top_k=-1)
    assert p.stop == ("END",) and p.stop_token_ids == (1, 2) and p.top_k == 0
    assert hash(p) == hash(SamplingParams(stop=("END",), stop_token_ids=(1, 2), top_k=0))
