"""Tool calls without a cluster: the request's tools and tool_choice checked (errors name the
field), the grammar of a forced choice (random walks of its mask parse into calls whose
arguments validate), rendering (kvray's block or the template's own `tools`), the parsers on
crafted text split at every point, and the response renderer's streamed deltas reassembling to
the whole message."""

from __future__ import annotations

import dataclasses
import json

import jsonschema
import pytest

from kvray.cluster.chat_prompt import ChatPrompt, render_chat
from kvray.cluster.chunks import CompletionChunk
from kvray.cluster.openai_api import ChatCompletionRequest
from kvray.cluster.openai_responses import Choices, Renderer
from kvray.cluster.sequence import FinishReason
from kvray.cluster.tool_call_parser import (
    CallArrayParser,
    NamedCallParser,
    Parsed,
    TaggedCallParser,
    parse_all,
)
from kvray.cluster.tool_calls import (
    MAX_TOOLS,
    ToolUse,
    make_tool_use,
    template_takes_tools,
)
from kvray.workers.protocol import InvalidParameterError
from kvray.workers.tiny_model import CHAT_TEMPLATE
from tests.unit.test_structured_output import compiler, tokenizer, walk_texts  # noqa: F401

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
POINT = {
    "$defs": {
        "P": {
            "type": "object",
            "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
            "required": ["x", "y"],
            "additionalProperties": False,
        }
    },
    "type": "object",
    "properties": {"at": {"$ref": "#/$defs/P"}},
    "required": ["at"],
    "additionalProperties": False,
}


def tool(name: str, parameters: dict | None = None, **function) -> dict:
    body = {"name": name, **function}
    if parameters is not None:
        body["parameters"] = parameters
    return {"type": "function", "function": body}


TOOLS = [tool("get_weather", WEATHER, description="Weather in a city"), tool("move", POINT)]
SCHEMAS = {"get_weather": WEATHER, "move": POINT}


def chat(**fields) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(body)


def param_of(fn) -> str:
    with pytest.raises(InvalidParameterError) as err:
        fn()
    return err.value.param


# ------------------------------------------------------------------ the request


@pytest.mark.parametrize(
    ("tools", "param"),
    [
        ([tool("bad name", WEATHER)], "tools[0].function.name"),
        ([tool("x" * 65, WEATHER)], "tools[0].function.name"),
        ([tool("f", WEATHER), tool("f", WEATHER)], "tools[1].function.name"),
        ([tool("f", {"type": "string"})], "tools[0].function.parameters"),
        ([tool("f", {"properties": {}})], "tools[0].function.parameters"),
        ([tool("f", WEATHER, description=5)], "tools[0].function.description"),
        ([{"type": "retrieval"}], "tools[0]"),
        ([{"type": "function"}], "tools[0].function"),
        ([tool(f"f{i}") for i in range(MAX_TOOLS + 1)], "tools"),
        ([tool("f", {"type": "object", "description": "x" * 200_000})], "tools"),
    ],
)
def test_bad_tools_are_refused_naming_the_field(tools, param):
    assert param_of(lambda: make_tool_use(tools, None, True)) == param


@pytest.mark.parametrize(
    "choice",
    [
        {"type": "function", "function": {"name": "nope"}},
        {"type": "function"},
        "sometimes",
        7,
    ],
)
def test_a_bad_tool_choice_is_refused_naming_it(choice):
    assert param_of(lambda: make_tool_use(TOOLS, choice, True)) == "tool_choice"


def test_a_forced_choice_without_tools_is_refused_and_auto_is_ignored():
    assert param_of(lambda: make_tool_use(None, "required", True)) == "tool_choice"
    assert make_tool_use(None, "auto", True) is None
    assert make_tool_use([], "none", True) is None


def test_tools_without_parameters_take_no_arguments():
    (checked,) = make_tool_use([tool("now")], None, True).tools
    assert checked["function"]["parameters"] == {"type": "object", "properties": {}}


def test_auto_is_the_default_and_none_shows_the_model_no_tools():
    assert chat(tools=TOOLS).tool_use.choice == "auto"
    assert len(chat(tools=TOOLS).prompt().tools) == 2
    assert chat(tools=TOOLS, tool_choice="none").prompt().tools == ()
    assert chat(tools=TOOLS).sampling_params().structured_output is None


def test_a_named_choice_constrains_the_answer_to_its_arguments():
    body = chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "move"}})
    spec = body.sampling_params().structured_output
    assert spec.kind == "json_schema" and json.loads(spec.spec) == POINT


@pytest.mark.parametrize("other", ["response_format", "structured_outputs", "guided_json"])
def test_a_forced_choice_with_another_constraint_is_refused_naming_tool_choice(other):
    value = {
        "response_format": {"type": "json_object"},
        "structured_outputs": {"regex": "a+"},
        "guided_json": WEATHER,
    }[other]
    body = chat(tools=TOOLS, tool_choice="required", **{other: value})
    assert param_of(body.sampling_params) == "tool_choice"
    chat(tools=TOOLS, **{other: value}).sampling_params()  # auto takes it


def required_schema(parallel: bool) -> dict:
    return json.loads(ToolUse(tuple(TOOLS), "required", parallel=parallel).grammar().spec)


def test_required_without_parallel_calls_allows_one_call():
    assert required_schema(False)["maxItems"] == 1 and "maxItems" not in required_schema(True)
    valid = [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}]
    jsonschema.validate(valid, required_schema(False))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(valid * 2, required_schema(False))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "move", "arguments": {"city": "x"}}], required_schema(True))


def test_a_tools_refs_still_resolve_in_the_required_schema():
    call = {"name": "move", "arguments": {"at": {"x": 1, "y": 2}}}
    jsonschema.validate([call], required_schema(True))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{**call, "arguments": {"at": {"x": "1"}}}], required_schema(True))


ZOD = {  # draft-07 "definitions", as zod-to-json-schema writes it
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {"p": {"$ref": "#/definitions/P"}},
    "definitions": {"P": {"type": "object", "properties": {"x": {"type": "number"}}}},
}
TREE = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}}


@pytest.mark.parametrize("parameters", [ZOD, TREE], ids=["definitions", "root ref"])
def test_refs_of_every_form_compile_and_resolve_in_the_required_grammar(
    compiler,  # noqa: F811
    parameters,
):
    use = make_tool_use([tool("f", parameters), tool("g")], "required", True)
    compiler.compile(use.grammar())
    schema = json.loads(use.grammar().spec)
    jsonschema.validate([{"name": "f", "arguments": {"p": {"x": 1}, "kids": [{}]}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        bad = {"p": {"x": "1"}} if parameters is ZOD else {"kids": [{"kids": 1}]}
        jsonschema.validate([{"name": "f", "arguments": bad}], schema)


@pytest.mark.parametrize("parallel", [True, False])
def test_random_walks_of_the_required_grammar_parse_into_valid_calls(
    compiler,  # noqa: F811
    tokenizer,  # noqa: F811
    parallel,
):
    spec = ToolUse(tuple(TOOLS), "required", parallel=parallel).grammar()
    for text in walk_texts(compiler, tokenizer, spec, 20):
        content, calls = parse_all(CallArrayParser(), text)
        assert content == "" and calls, text
        assert len(calls) == len(json.loads(text)) and (parallel or len(calls) == 1)
        for call in calls:
            schema = SCHEMAS[call["function"]["name"]]
            jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
        assert [c["function"]["name"] for c in calls] == [c["name"] for c in json.loads(text)]


# ------------------------------------------------------------------ rendering

TOOL_TEMPLATE = (
    "{% if tools %}TOOLS:{{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}:{{ m.content }}"
    "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments.city }}]"
    "{% endfor %}\n{% endfor %}"
)


class Tokenizer:
    """The tokenizer interface `render_chat` uses, writing the text as one token per char."""

    def __init__(self, template) -> None:
        from transformers import PreTrainedTokenizerBase

        self.chat_template = template
        self._base = PreTrainedTokenizerBase
        self.text = ""

    def get_chat_template(self, tools=None):
        return self._base.get_chat_template(self, tools=tools)

    def apply_chat_template(self, messages, *, tools=None, add_generation_prompt, tokenize):
        import jinja2

        template = self.get_chat_template(tools=tools)
        self.text = (
            jinja2.Environment()
            .from_string(template)
            .render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt)
        )
        return self.text

    def __call__(self, text, add_special_tokens):
        return {"input_ids": [ord(c) for c in text]}


HISTORY = (
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    },
    {"role": "tool", "content": "-3 C", "tool_call_id": "call_1"},
)


def test_a_template_that_reads_tools_gets_them_and_arguments_as_objects():
    assert template_takes_tools(TOOL_TEMPLATE) and not template_takes_tools(CHAT_TEMPLATE)
    tok = Tokenizer(TOOL_TEMPLATE)
    render_chat(tok, ChatPrompt(HISTORY, tools=tuple(TOOLS)))
    assert tok.text.startswith("TOOLS:get_weather,move\n")
    assert "[get_weather Oslo]" in tok.text and "tool:-3 C" in tok.text
    assert "# Tools" not in tok.text


def test_a_tool_use_template_is_chosen_when_the_model_names_one():
    tok = Tokenizer({"default": CHAT_TEMPLATE, "tool_use": TOOL_TEMPLATE})
    render_chat(tok, ChatPrompt(HISTORY, tools=tuple(TOOLS)))
    assert tok.text.startswith("TOOLS:get_weather,move\n")


def test_a_template_without_tools_gets_kvrays_block_and_calls_as_text():
    tok = Tokenizer(CHAT_TEMPLATE)
    render_chat(tok, ChatPrompt(HISTORY, tools=tuple(TOOLS)))
    system, rest = tok.text.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\n# Tools")
    assert json.dumps(TOOLS[0], separators=(",", ":")) in system and "<tool_call>" in system
    assert '<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo"}}\n</tool_call>' in rest
    assert "<|im_start|>tool\n-3 C<|im_end|>" in rest


def test_kvrays_block_joins_an_existing_system_prompt():
    tok = Tokenizer(CHAT_TEMPLATE)
    messages = ({"role": "system", "content": "Be brief."}, *HISTORY)
    render_chat(tok, ChatPrompt(messages, tools=tuple(TOOLS)))
    assert tok.text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert tok.text.count("<|im_start|>system") == 1


def test_without_tools_a_template_that_does_not_read_them_sees_the_messages_as_given():
    tok = Tokenizer(CHAT_TEMPLATE)
    render_chat(tok, ChatPrompt(HISTORY))
    assert "# Tools" not in tok.text and "<tool_call>" not in tok.text
    assert "<|im_start|>assistant\n<|im_end|>" in tok.text


# ------------------------------------------------------------------ parsers

NAMES = {"get_weather", "move"}


def fed(parser, pieces) -> Parsed:
    """Every piece fed, then finish: the parts joined."""
    out = Parsed()
    for piece in pieces:
        out.add(parser.feed(piece))
    return out.add(parser.finish())


def calls_of(parsed: Parsed) -> list[tuple[str, str]]:
    names = [d.name for d in parsed.calls if d.id is not None]
    arguments = [""] * len(names)
    for delta in parsed.calls:
        arguments[delta.index] += delta.arguments
    return list(zip(names, arguments))


AUTO_TEXT = (
    "Let me check. <tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n'
    "</tool_call>\n<tool_call>"
    '{"name": "move", "arguments": "{\\"at\\": {\\"x\\": 1, \\"y\\": 2}}"}'
    "</tool_call>"
)
AUTO_CALLS = [
    ("get_weather", '{"city":"Oslo","unit":"c"}'),
    ("move", '{"at":{"x":1,"y":2}}'),
]


def test_auto_parses_tagged_calls_and_keeps_the_text_before_them():
    content, calls = parse_all(TaggedCallParser(NAMES, True), AUTO_TEXT)
    assert content == "Let me check."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == AUTO_CALLS
    assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]


def test_auto_gives_the_same_calls_whatever_the_split():
    whole = fed(TaggedCallParser(NAMES, True), [AUTO_TEXT])
    for cut in range(1, len(AUTO_TEXT)):
        parts = fed(TaggedCallParser(NAMES, True), [AUTO_TEXT[:cut], AUTO_TEXT[cut:]])
        assert (parts.content, calls_of(parts)) == (whole.content, calls_of(whole)), cut
    by_char = fed(TaggedCallParser(NAMES, True), list(AUTO_TEXT))
    assert (by_char.content, calls_of(by_char)) == ("Let me check.", AUTO_CALLS)


def test_auto_holds_only_a_possible_tag_start():
    parser = TaggedCallParser(NAMES, True)
    assert parser.feed("Use <to").content == "Use"
    assert parser.feed("ols <b>").content == " <tools <b>"
    assert parser.feed("<tool_call>{").content == ""
    assert parser.finish().content == "<tool_call>{"  # never closed: content


@pytest.mark.parametrize(
    "body",
    [
        '{"name": "get_weather", "arguments": {"city": ',  # not JSON
        '{"name": "launch", "arguments": {}}',  # no such tool
        '{"name": "move", "arguments": [1]}',  # arguments not an object
        "[]",
    ],
)
def test_auto_leaves_a_call_it_cannot_read_as_content(body):
    text = f"Hi <tool_call>{body}</tool_call>"
    assert parse_all(TaggedCallParser(NAMES, True), text) == (text, [])


def test_auto_without_calls_gives_the_text_unchanged():
    text = "  Plain answer, <b>bold</b> and <tool_\n\n"
    assert parse_all(TaggedCallParser(NAMES, True), text) == (text, [])


def test_auto_without_parallel_calls_keeps_the_first_call():
    content, calls = parse_all(TaggedCallParser(NAMES, False), AUTO_TEXT + " bye")
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["get_weather"]


def test_required_streams_arguments_as_they_come_and_holds_them_until_the_name():
    parser = CallArrayParser()
    first = parser.feed('[{"name":"move","arguments":{"at"')
    assert [(d.index, d.name, d.arguments) for d in first.calls] == [(0, "move", '{"at"')]
    assert parser.feed(':{"x":1}}').calls[0].arguments == ':{"x":1}}'
    later = parser.feed('},{"arguments":{"city":"a\\"}"},"name":"get_weather"}]')
    assert [(d.index, d.name, d.arguments) for d in later.calls] == [
        (1, "get_weather", '{"city":"a\\"}"}')
    ]


def test_required_gives_the_same_calls_char_by_char_as_whole():
    text = (
        '[{"name":"get_w\\u0065ather","arguments":{"city":"}],{","unit":"c"}}, '
        '{"name": "move", "arguments": {"at": {"x": 1, "y": 2}}}]'
    )
    whole = calls_of(fed(CallArrayParser(), [text]))
    assert whole == [
        ("get_weather", '{"city":"}],{","unit":"c"}'),
        ("move", '{"at": {"x": 1, "y": 2}}'),
    ]
    assert calls_of(fed(CallArrayParser(), list(text))) == whole


def test_a_named_call_is_the_whole_answer():
    assert calls_of(fed(NamedCallParser("move"), ['{"at":', '{"x":1,"y":2}}'])) == [
        ("move", '{"at":{"x":1,"y":2}}')
    ]
    assert calls_of(fed(NamedCallParser("move"), [])) == [("move", "")]


# ------------------------------------------------------------------ the renderer


def chunks_of(text: str, pieces: int, reason: str = "stop") -> list[CompletionChunk]:
    size = max(1, len(text) // pieces)
    parts = [text[i : i + size] for i in range(0, len(text), size)]
    return [
        CompletionChunk(
            "r",
            0,
            [1],
            part,
            finish_reason=FinishReason(reason) if i == len(parts) - 1 else None,
            num_output_tokens=i + 1,
        )
        for i, part in enumerate(parts)
    ]


def stream(renderer: Renderer, chunks: list[CompletionChunk]) -> tuple[dict, str]:
    """The streamed deltas joined as the openai client joins them, and the last finish_reason."""
    choices, message, finish = Choices(1, 1), {"content": None, "tool_calls": []}, None
    for chunk in chunks:
        event = renderer.chunk(choices.add(0, chunk), chunk)
        if event is None:
            continue
        (item,) = json.loads(event.removeprefix("data: "))["choices"]
        finish = item["finish_reason"] or finish
        delta = item["delta"]
        if delta.get("content"):
            message["content"] = (message["content"] or "") + delta["content"]
        for call in delta.get("tool_calls", ()):
            if "id" in call:
                assert call["index"] == len(message["tool_calls"])
                message["tool_calls"].append({**call, "function": dict(call["function"])})
                del message["tool_calls"][-1]["index"]
            else:
                message["tool_calls"][call["index"]]["function"]["arguments"] += call["function"][
                    "arguments"
                ]
    return message, finish


@pytest.mark.parametrize(
    ("choice", "text"),
    [
        ("auto", AUTO_TEXT),
        ("required", '[{"name":"get_weather","arguments":{"city":"Oslo","unit":"f"}}]'),
        ({"type": "function", "function": {"name": "move"}}, '{"at":{"x":3,"y":4}}'),
    ],
)
def test_streamed_deltas_reassemble_to_the_whole_message(choice, text):
    use = make_tool_use(TOOLS, choice, True)
    whole = Renderer("chat", "m", None, tools=use)
    choices = Choices(1, 1)
    for chunk in chunks_of(text, 1):
        choices.add(0, chunk)
    (item,) = whole.response(choices)["choices"]
    assert item["finish_reason"] == "tool_calls" and item["message"]["tool_calls"]
    for pieces in (1, 7, len(text)):
        message, finish = stream(Renderer("chat", "m", None, tools=use), chunks_of(text, pieces))
        assert finish == "tool_calls"
        assert message["content"] == item["message"]["content"]
        strip = [{k: v for k, v in c.items() if k != "id"} for c in message["tool_calls"]]
        assert strip == [
            {k: v for k, v in c.items() if k != "id"} for c in item["message"]["tool_calls"]
        ]


def test_an_answer_cut_short_keeps_finish_reason_length():
    use = make_tool_use(TOOLS, "required", True)
    message, finish = stream(
        Renderer("chat", "m", None, tools=use),
        chunks_of('[{"name":"move","arguments":{"at"', 3, "length"),
    )
    assert finish == "length" and message["tool_calls"][0]["function"]["name"] == "move"


def test_without_calls_the_answer_is_content_and_stops():
    use = make_tool_use(TOOLS, "auto", True)
    message, finish = stream(Renderer("chat", "m", None, tools=use), chunks_of("Hello!", 3))
    assert message == {"content": "Hello!", "tool_calls": []} and finish == "stop"


def test_a_tool_template_gets_earlier_arguments_as_objects_even_without_tools():
    tok = Tokenizer(TOOL_TEMPLATE)
    render_chat(tok, ChatPrompt(HISTORY))
    assert "[get_weather Oslo]" in tok.text and not tok.text.startswith("TOOLS")


@pytest.mark.parametrize("calls", ["call", [{"id": 7}], [{"function": "f"}], [{"function": {1}}]])
def test_calls_of_odd_shape_reach_the_template_as_given(calls):
    tok = Tokenizer(CHAT_TEMPLATE)
    message = {"role": "assistant", "content": "ok", "tool_calls": calls}
    render_chat(tok, ChatPrompt((message,), tools=tuple(TOOLS)))
    assert "<|im_start|>assistant\nok<|im_end|>" in tok.text


def test_each_choice_is_parsed_on_its_own_when_streams_interleave():
    use = make_tool_use(TOOLS, "auto", True)
    renderer, choices = Renderer("chat", "m", None, tools=use), Choices(1, 2)
    texts = {0: AUTO_TEXT, 1: "No call here <tool_call>{bad</tool_call>"}
    pieces = {i: chunks_of(text, 9) for i, text in texts.items()}
    seen: dict[int, list] = {0: [], 1: []}
    for step in range(max(len(p) for p in pieces.values())):
        for index, chunks in pieces.items():
            if step < len(chunks):
                chunk = dataclasses.replace(chunks[step], index=index)
                event = renderer.chunk(choices.add(0, chunk), chunk)
                if event is not None:
                    seen[index].append(json.loads(event.removeprefix("data: "))["choices"][0])
    for index, items in seen.items():
        assert {item["index"] for item in items} == {index}
    content = "".join(item["delta"].get("content", "") for item in seen[1])
    assert content == texts[1] and seen[1][-1]["finish_reason"] == "stop"
    names = [c["function"]["name"] for i in seen[0] for c in i["delta"].get("tool_calls", ())]
    assert names == ["get_weather", "move"] and seen[0][-1]["finish_reason"] == "tool_calls"
