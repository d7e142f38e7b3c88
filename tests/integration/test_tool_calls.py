"""Tool calls through the HTTP door of a local cluster (tiny random model) with the official
`openai` client: required and named calls always parse and their arguments validate, streamed
deltas reassemble to the whole answer's calls, `auto` parses the model's tagged calls, a tool
result round trip is answered, and bad tools or choices are 400s naming the field."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.helpers import free_port
from tests.integration.conftest import start_cluster

pytestmark = pytest.mark.ray

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
MOVE = {
    "type": "object",
    "properties": {
        "x": {"type": "integer", "minimum": -99, "maximum": 99},
        "y": {"type": "integer", "minimum": -99, "maximum": 99},
    },
    "required": ["x", "y"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "move", "parameters": MOVE}},
]
SCHEMAS = {"get_weather": WEATHER, "move": MOVE}
MESSAGES = [{"role": "user", "content": "What is the weather in Oslo?"}]
SAMPLED = {"temperature": 1.0, "seed": 3, "max_tokens": 600}  # every answer ends well before


@pytest.fixture(scope="module")
def cluster(ray_session, model_cache_dir):
    settings = {
        "replicas": 1,
        "http_port": free_port(),
        "max_model_len": 2048,
    }  # kvray's tools block: ~800 tokens
    with start_cluster(model_cache_dir, **settings) as running:
        yield running


@pytest.fixture(scope="module")
def http(cluster):
    return openai.OpenAI(base_url=cluster.http_url, api_key="unused", max_retries=0)


def calls_of(message) -> list[tuple[str, dict]]:
    """Each call's name and parsed arguments, its id checked."""
    out = []
    for call in message.tool_calls or ():
        assert call.type == "function" and call.id.startswith("call_")
        out.append((call.function.name, json.loads(call.function.arguments)))
    return out


def assert_valid(calls: list[tuple[str, dict]]) -> None:
    assert calls
    for name, arguments in calls:
        jsonschema.validate(arguments, SCHEMAS[name])


def streamed(http, **params) -> tuple[str | None, list[tuple[str, dict]], str]:
    """A streamed answer's content, calls (from OpenAI's deltas) and finish_reason."""
    content, calls, finish = None, [], None
    for chunk in http.chat.completions.create(stream=True, **params):
        (choice,) = chunk.choices
        finish = choice.finish_reason or finish
        delta = choice.delta
        if delta.content:
            content = (content or "") + delta.content
        for part in delta.tool_calls or ():
            if part.id is not None:  # a call's first delta: id, type and name
                assert part.index == len(calls) and part.type == "function"
                calls.append([part.function.name, part.function.arguments or ""])
            else:
                assert part.function.name is None
                calls[part.index][1] += part.function.arguments
    return content, [(name, json.loads(arguments)) for name, arguments in calls], finish


def test_required_calls_always_parse_and_validate(http):
    answer = http.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", n=4, **SAMPLED
    )
    assert len(answer.choices) == 4
    for choice in answer.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        assert_valid(calls_of(choice.message))
    assert answer.usage.completion_tokens > 0


def test_a_named_choice_calls_that_function(http):
    choice = {"type": "function", "function": {"name": "move"}}
    for seed in range(3):
        answer = http.chat.completions.create(
            model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=choice,
            **{**SAMPLED, "seed": seed},
        )  # fmt: skip
        (calls,) = [calls_of(c.message) for c in answer.choices]
        assert [name for name, _ in calls] == ["move"]
        assert_valid(calls)
        assert answer.choices[0].finish_reason == "tool_calls"


def test_without_parallel_calls_required_gives_one_call(http):
    for seed in range(3):
        answer = http.chat.completions.create(
            model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
            parallel_tool_calls=False, **{**SAMPLED, "seed": seed},
        )  # fmt: skip
        assert len(calls_of(answer.choices[0].message)) == 1


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_streamed_deltas_reassemble_to_the_whole_answers_calls(http, tool_choice):
    params = {"model": "tiny", "messages": MESSAGES, "tools": TOOLS, "tool_choice": tool_choice}
    whole = http.chat.completions.create(**params, **SAMPLED)
    content, calls, finish = streamed(http, **params, **SAMPLED)
    assert (content, calls, finish) == (None, calls_of(whole.choices[0].message), "tool_calls")
    assert_valid(calls)


# A constraint that makes the random model write a tagged call, so that "auto" has one to parse.
TAGGED = (
    "Sure. <tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>'
)


def test_auto_parses_a_tagged_call_whole_and_streamed(http):
    params = {
        "model": "tiny", "messages": MESSAGES, "tools": TOOLS, "temperature": 0,
        "max_tokens": 200, "extra_body": {"structured_outputs": {"choice": [TAGGED]}},
    }  # fmt: skip
    whole = http.chat.completions.create(**params).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Sure."
    assert calls_of(whole.message) == [("get_weather", {"city": "Oslo", "unit": "c"})]
    assert streamed(http, **params) == ("Sure.", calls_of(whole.message), "tool_calls")


def test_auto_without_a_call_answers_with_content_and_none_hides_the_tools(http):
    params = {"model": "tiny", "messages": MESSAGES, "max_tokens": 20, "temperature": 0}
    answer = http.chat.completions.create(**params, tools=TOOLS)
    (choice,) = answer.choices
    assert choice.message.tool_calls is None and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    plain = http.chat.completions.create(**params)
    hidden = http.chat.completions.create(**params, tools=TOOLS, tool_choice="none")
    assert answer.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the tools block
    assert hidden.usage.prompt_tokens == plain.usage.prompt_tokens
    assert hidden.choices[0].message.content == plain.choices[0].message.content


def test_a_tool_result_round_trip_is_answered(http):
    first = http.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", **SAMPLED
    ).choices[0]
    (call, *_) = first.message.tool_calls
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": -3}'},
    ]
    answer = http.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, max_tokens=8, temperature=0
    )
    assert answer.usage.prompt_tokens > 0 and answer.choices[0].finish_reason in ("stop", "length")
    more = http.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, tool_choice="required", **SAMPLED
    )
    assert_valid(calls_of(more.choices[0].message))


def test_beam_search_with_a_forced_choice_gives_valid_calls(http):
    answer = http.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS[:1], tool_choice="required", n=2,
        max_tokens=300, extra_body={"use_beam_search": True},
    )  # fmt: skip
    assert len(answer.choices) == 2
    for choice in answer.choices:
        assert choice.finish_reason == "tool_calls"
        assert_valid(calls_of(choice.message))


UNIQUE = {"type": "array", "uniqueItems": True}  # a schema the grammar engine refuses


def bad(name: str = "get_weather", parameters: dict | None = None) -> list[dict]:
    return [{"type": "function", "function": {"name": name, "parameters": parameters or MOVE}}]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": bad("get weather")}, "tools[0].function.name"),
        ({"tools": bad(parameters={"type": "string"})}, "tools[0].function.parameters"),
        (
            {"tools": bad(parameters={"type": "object", "properties": {"a": UNIQUE}})},
            "tools[0].function.parameters",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}},
            "tool_choice",
        ),
        ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
    ],
)
def test_bad_tools_and_choices_are_400_naming_the_field(http, fields, param):
    with pytest.raises(openai.BadRequestError) as err:
        http.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, **fields)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param, err.value.body
