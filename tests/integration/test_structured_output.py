"""Structured output through the offline API on the tiny random model (fp32): every answer to a
JSON schema parses and validates (`jsonschema`), regexes match and choices are chosen, greedy
and seeded, whole and streamed, for n samples and beams; and a constrained sample is exact
through a preemption and a resume, which rebuild its grammar from its tokens."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import jsonschema
import pytest

from kvray import LLM, SamplingParams
from kvray.cluster.input_processor import Resumed
from kvray.workers.protocol import InvalidParameterError
from tests.helpers import text_of, tokens_of

PROMPT = "Hello"
# NOTE: a random model may write a string forever: every string here has a maxLength.
SCHEMAS = {
    "enum, bounded numbers": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "kind": {"enum": ["cat", "dog", "fish"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 30},
            "weight": {"type": "number", "minimum": 0.5, "maximum": 80},
        },
        "required": ["name", "kind", "age", "weight"],
        "additionalProperties": False,
    },
    "array with maxItems": {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 5},
                "minItems": 1,
                "maxItems": 3,
            },
            "ok": {"type": "boolean"},
        },
        "required": ["tags", "ok"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "owner": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 6},
                    "zip": {"type": "integer", "minimum": 1000, "maximum": 9999},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
            "pets": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "n": {"type": "string", "maxLength": 4},
                        "legs": {"enum": [2, 4]},
                    },
                    "required": ["n", "legs"],
                    "additionalProperties": False,
                },
                "maxItems": 2,
            },
        },
        "required": ["owner", "pets"],
        "additionalProperties": False,
    },
}
REGEX = r"[a-z]{2,5}-[0-9]{1,3}"
CHOICES = ["yes", "no", "maybe later"]
GREEDY = {"temperature": 0, "max_tokens": 200}
SEEDED = {"temperature": 1.0, "seed": 1, "max_tokens": 200}


@pytest.fixture(scope="module")
def llm(model_cache_dir):
    return LLM("tiny", cache_dir=model_cache_dir, max_model_len=512)


def assert_valid(text: str, schema: dict) -> None:
    errors = [
        e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(json.loads(text))
    ]
    assert not errors, f"{text!r}: {errors}"


def answers(llm, params: SamplingParams) -> list:
    return llm.generate(PROMPT, params)[0].choices


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_answers_to_a_json_schema_validate_and_end_with_eos(llm, name, sampling):
    schema = SCHEMAS[name]
    (answer,) = answers(llm, SamplingParams(structured_output={"json": schema}, **sampling))
    assert_valid(answer.text, schema)
    assert answer.finish_reason == "stop"
    assert answer.token_ids[-1] in llm.worker.eos_token_ids  # the grammar ended it


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_regex_and_a_choice_are_followed(llm, sampling):
    (match,) = answers(llm, SamplingParams(structured_output={"regex": REGEX}, **sampling))
    assert re.fullmatch(REGEX, match.text) and match.finish_reason == "stop"
    (chosen,) = answers(llm, SamplingParams(structured_output={"choice": CHOICES}, **sampling))
    assert chosen.text in CHOICES and chosen.finish_reason == "stop"


def test_json_object_gives_an_object(llm):
    (answer,) = answers(llm, SamplingParams(structured_output={"json_object": True}, **GREEDY))
    assert isinstance(json.loads(answer.text), dict)


def test_the_same_seed_gives_the_same_constrained_answer(llm):
    params = SamplingParams(structured_output={"json": SCHEMAS["nested"]}, **SEEDED)
    assert answers(llm, params)[0].token_ids == answers(llm, params)[0].token_ids


def test_n_samples_all_validate_and_differ(llm):
    schema = SCHEMAS["enum, bounded numbers"]
    params = SamplingParams(structured_output={"json": schema}, n=4, **SEEDED)
    samples = answers(llm, params)
    assert len(samples) == 4 and len({s.text for s in samples}) > 1
    for sample in samples:
        assert_valid(sample.text, schema)


def test_beams_all_follow_the_schema(llm):
    schema = SCHEMAS["array with maxItems"]
    params = SamplingParams(structured_output={"json": schema}, num_beams=3, n=3, max_tokens=120)
    beams = answers(llm, params)
    assert len(beams) == 3
    for beam in beams:
        assert_valid(beam.text, schema)


def test_streamed_deltas_join_to_the_whole_answer(llm):
    params = SamplingParams(structured_output={"json": SCHEMAS["nested"]}, **SEEDED)
    chunks = list(llm.stream(PROMPT, params))
    assert len(chunks) > 10
    whole = answers(llm, params)[0]
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids


def test_max_tokens_cuts_an_answer_with_finish_reason_length(llm):
    params = SamplingParams(
        structured_output={"json": SCHEMAS["nested"]}, **{**GREEDY, "max_tokens": 6}
    )
    (cut,) = answers(llm, params)
    full = answers(llm, replace(params, max_tokens=200))[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 6
    assert full.text.startswith(cut.text)
    with pytest.raises(ValueError):
        json.loads(cut.text)  # what was cut short is not JSON: the client sees "length"


def test_token_constraints_hold_beside_the_grammar(llm):
    digits = {str(d): llm.tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)}
    schema = {"type": "integer", "minimum": 0, "maximum": 99999}
    banned = SamplingParams(
        structured_output={"json": schema},
        bad_words=[d for d in digits if d not in "37"],
        **GREEDY,
    )
    (answer,) = answers(llm, banned)
    assert answer.text and set(answer.text) <= {"3", "7"}
    assert_valid(answer.text, schema)


def test_a_schema_the_engine_cannot_enforce_is_refused_naming_the_field(llm):
    with pytest.raises(InvalidParameterError, match="uniqueItems") as err:
        llm.generate(PROMPT, SamplingParams(structured_output={"json": {"uniqueItems": True}}))
    assert err.value.param == "structured_output.json"
    assert not llm.engine.has_unfinished()


# ------------------------------------------------------------------ exact through interruptions

CONSTRAINED = SamplingParams(
    structured_output={"json": SCHEMAS["nested"]}, temperature=0.9, seed=3, max_tokens=200
)


def test_a_constrained_sample_is_exact_through_preemption(model_cache_dir, llm):
    tight = LLM(
        "tiny", cache_dir=model_cache_dir, max_model_len=256, num_kv_blocks=16, block_size=16
    )
    prompts = ["Hello " * 20, "The quick brown fox " * 6, "Once upon a time " * 8]
    params = replace(CONSTRAINED, max_tokens=150)
    expected = [o.choices[0] for o in llm.generate(prompts, params)]
    got = [o.choices[0].text for o in tight.generate(prompts, params)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert got == [answer.text for answer in expected]
    for answer in expected:
        assert answer.finish_reason == "stop"
        assert_valid(answer.text, SCHEMAS["nested"])


@pytest.fixture(scope="module")
def other(model_cache_dir):
    """A second engine, as a second router's replica."""
    return LLM("tiny", cache_dir=model_cache_dir, max_model_len=512)


@pytest.mark.parametrize("cut", [1, 9, 25])
def test_a_resumed_constrained_sample_continues_exactly(llm, other, cut):
    chunks = list(llm.stream(PROMPT, CONSTRAINED))
    assert len(chunks) > cut
    received = chunks[:cut]  # what the client had when its router went away
    resume = {0: Resumed(tuple(tokens_of(received)), len(text_of(received)), finished=False)}
    other.engine.add(other.processor.process(PROMPT, CONSTRAINED, f"resumed-{cut}", resume=resume))
    rest = []
    while other.engine.has_unfinished():
        rest += other.step()
    assert tokens_of(received) + tokens_of(rest) == tokens_of(chunks)
    assert text_of(received) + text_of(rest) == text_of(chunks)
    assert rest[-1].finish_reason == "stop"
