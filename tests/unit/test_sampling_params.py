"""SamplingParams validation: every bad value raises ValueError naming the field and the range."""

from __future__ import annotations

import json

import pytest

from kvray.workers.grammar_spec import GrammarSpec, from_response_format
from kvray.workers.protocol import InvalidParameterError, SamplingParams


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
        ("prompt_logprobs", -1, "prompt_logprobs must be in [0, 20]"),
        ("num_beams", 17, "num_beams must be in [1, 16]"),
        ("length_penalty", 11.0, "length_penalty must be in [-10.0, 10.0]"),
        ("early_stopping", "never", "early_stopping must be true or false"),
        ("best_of", 0, "best_of must be in [1, 16] (at least n)"),
        ("temperature", float("nan"), "temperature must be a number"),
        ("seed", 1.5, "seed must be an integer"),
        ("max_tokens", True, "max_tokens must be an integer"),
        ("logit_bias", {5: 100.5}, "logit_bias[5] must be a number in [-100, 100], got 100.5"),
        ("logit_bias", {5: float("nan")}, "logit_bias[5] must be a number in [-100, 100]"),
        ("logit_bias", {"5": 1.0}, "logit_bias keys must be token ids (integers >= 0), got '5'"),
        ("logit_bias", {-1: 1.0}, "logit_bias keys must be token ids (integers >= 0), got -1"),
        ("logit_bias", [(5, 1.0), (5, 2.0)], "logit_bias names a token id twice"),
        ("logit_bias", 5, "logit_bias must map token ids to biases"),
        ("allowed_token_ids", [3, -1], "allowed_token_ids must be in [0, 2147483647]"),
        ("bad_words", ["ok", " "], "bad_words must hold words (not only spaces)"),
        ("bad_words", ["x" * 257], "of at most 256 characters"),
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


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 0.7),
        ("top_k", 5),
        ("top_p", 0.9),
        ("min_p", 0.1),
        ("repetition_penalty", 1.2),
        ("presence_penalty", 0.5),
        ("frequency_penalty", 0.5),
        ("best_of", 4),
        ("stop", "END"),
        ("logprobs", 2),
    ],
)
def test_beam_search_refuses_what_does_not_combine_with_it(field, value):
    with pytest.raises(ValueError) as err:
        SamplingParams(num_beams=4, **{field: value})
    assert field in str(err.value) and "beam" in str(err.value)


def test_beam_search_returns_at_most_num_beams_beams():
    with pytest.raises(ValueError, match=r"n must be <= num_beams \(2\)"):
        SamplingParams(num_beams=2, n=3)
    beams = SamplingParams(num_beams=4, n=4, temperature=0)
    assert (beams.num_samples, beams.is_ranked) == (4, True)


def test_best_of_below_n_or_greedy_is_refused():
    with pytest.raises(ValueError, match=r"best_of must be in \[3, 16\]"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(ValueError, match="best_of > 1 needs random sampling"):
        SamplingParams(best_of=2, temperature=0)
    assert SamplingParams(n=2, best_of=2).is_ranked is False
    assert SamplingParams(n=2, best_of=3).is_ranked is True


def test_unset_knobs_take_the_models_defaults_then_their_neutral_values():
    unset = SamplingParams(top_k=7)
    assert (unset.temperature, unset.top_p, unset.min_p, unset.repetition_penalty) == (None,) * 4
    got = unset.with_defaults({"temperature": 0.2, "top_p": 0.9, "top_k": 50})
    assert (got.temperature, got.top_p, got.top_k) == (0.2, 0.9, 7)  # the request's top_k stays
    assert (got.min_p, got.repetition_penalty) == (0.0, 1.0)
    assert got.with_defaults({"temperature": 0.5}) == got  # resolved once, for good
    assert SamplingParams(temperature=0).with_defaults({"temperature": 0.7}).is_greedy


def test_beams_take_no_sampling_defaults_and_refuse_an_explicit_temperature():
    beams = SamplingParams(num_beams=4, n=2)
    assert beams.with_defaults({"temperature": 0.2, "top_p": 0.9}) is beams
    assert SamplingParams(num_beams=4, temperature=0).num_beams == 4
    with pytest.raises(ValueError, match="beam search is deterministic: leave temperature unset"):
        SamplingParams(num_beams=4, temperature=1.0)  # the old default: no longer "unset"
    assert SamplingParams(num_beams=4, top_p=1.0, top_k=0).num_beams == 4  # off is fine


def test_n_samples_over_a_greedy_model_default_are_refused():
    with pytest.raises(ValueError, match="n > 1 needs random sampling"):
        SamplingParams(n=2).with_defaults({"temperature": 0.0})
    assert SamplingParams(n=2).with_defaults({"temperature": 0.3}).temperature == 0.3


def test_logit_bias_holds_at_most_300_tokens():
    assert len(SamplingParams(logit_bias=dict.fromkeys(range(300), 1.0)).logit_bias) == 300
    with pytest.raises(ValueError, match="logit_bias holds 301 tokens; at most 300") as err:
        SamplingParams(logit_bias=dict.fromkeys(range(301), 1.0))
    assert err.value.param == "logit_bias"


def test_bad_words_hold_at_most_128_words():
    with pytest.raises(ValueError, match="bad_words holds 129 words; at most 128"):
        SamplingParams(bad_words=[f"w{i}" for i in range(129)])


def test_token_constraints_are_kept_as_sorted_tuples_and_stay_hashable():
    p = SamplingParams(logit_bias={9: -1, 2: 100}, allowed_token_ids=[4, 1], bad_words="darn")
    assert p.logit_bias == ((2, 100), (9, -1))
    assert (p.allowed_token_ids, p.bad_words) == ((4, 1), ("darn",))
    assert hash(p) == hash(
        SamplingParams(logit_bias=[(9, -1), (2, 100)], allowed_token_ids=(4, 1), bad_words=["darn"])
    )


# ------------------------------------------------------------------ structured output

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


def test_structured_output_takes_a_spec_or_vllms_mapping_and_stays_hashable():
    spec = GrammarSpec.json_schema(SCHEMA)
    p = SamplingParams(structured_output=spec)
    q = SamplingParams(structured_output={"json": SCHEMA, "disable_any_whitespace": True})
    assert p.structured_output == q.structured_output == spec and hash(p) == hash(q)
    assert q.structured_output.param == "structured_output.json"
    assert (
        SamplingParams(structured_output={"choice": ["a", "b"]}).structured_output.kind == "choice"
    )


@pytest.mark.parametrize(
    ("value", "param", "message"),
    [
        ("{}", "structured_output", "must be a GrammarSpec or a mapping"),
        ({}, "structured_output", "must be a GrammarSpec or a mapping"),
        ({"json": SCHEMA, "regex": "a+"}, "structured_output", "sets json and regex: set one"),
        ({"structural_tag": "x"}, "structured_output.structural_tag", "is not supported"),
        ({"json_object": "yes"}, "structured_output.json_object", "must be true"),
        ({"regex": 5}, "structured_output.regex", "must be text"),
        ({"choice": "ab"}, "structured_output.choice", "must be a list of strings"),
    ],
)
def test_a_bad_structured_output_is_named(value, param, message):
    with pytest.raises(InvalidParameterError, match=message) as err:
        SamplingParams(structured_output=value)
    assert err.value.param == param


@pytest.mark.parametrize(("field", "value"), [("ignore_eos", True), ("min_tokens", 3)])
def test_structured_output_refuses_what_would_keep_a_finished_answer_going(field, value):
    with pytest.raises(InvalidParameterError, match="does not combine with structured output") as e:
        SamplingParams(structured_output={"regex": "a+"}, **{field: value})
    assert e.value.param == field


def test_structured_output_combines_with_beams_and_samples():
    spec = {"choice": ["yes", "no"]}
    assert SamplingParams(structured_output=spec, num_beams=2, n=2).num_beams == 2
    assert SamplingParams(structured_output=spec, n=4, temperature=1.0).n == 4


@pytest.mark.parametrize(
    ("response_format", "kind", "spec"),
    [
        ({"type": "text"}, None, None),
        ({"type": "json_object"}, "json_object", ""),
        (
            {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}},
            "json_schema",
            '{"type":"object","properties":{"a":{"type":"integer"}}}',
        ),
        ({"type": "json_schema", "json_schema": {"name": "any"}}, "json_schema", "{}"),
    ],
)
def test_openai_response_format_becomes_a_spec(response_format, kind, spec):
    got = from_response_format(response_format)
    if kind is None:
        assert got is None
    else:
        assert got is not None and (got.kind, got.spec, got.param) == (
            kind,
            spec,
            "response_format",
        )


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "structural_tag"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": 1},
    ],
)
def test_a_response_format_kvray_cannot_take_names_response_format(response_format):
    with pytest.raises(InvalidParameterError) as err:
        from_response_format(response_format)
    assert err.value.param == "response_format"


def test_a_pydantic_model_gives_its_json_schema():
    pydantic = pytest.importorskip("pydantic")

    class Pet(pydantic.BaseModel):
        name: str
        age: int

    spec = GrammarSpec.json_schema(Pet)
    assert json.loads(spec.spec)["required"] == ["name", "age"]
