"""A conversation through each front door's parsing: the number of messages is bounded before
a message is built, and the OpenAI door hands the template every field the caller set."""

from __future__ import annotations

import pydantic
import pytest

from kvray.cluster.chat_prompt import MAX_MESSAGES
from kvray.cluster.grpc_server import prompt_from_proto
from kvray.cluster.openai_api import ChatCompletionRequest
from kvray.protos.kvray.v1 import generation_pb2 as pb
from kvray.workers.protocol import InvalidParameterError


def chat_body(messages: list[dict]) -> dict:
    return {"model": "m", "messages": messages}


def test_the_openai_door_refuses_too_many_messages_naming_the_field():
    ok = ChatCompletionRequest.model_validate(chat_body([{"role": "user"}] * MAX_MESSAGES))
    assert len(ok.prompt().messages) == MAX_MESSAGES
    with pytest.raises(pydantic.ValidationError) as err:
        ChatCompletionRequest.model_validate(chat_body([{"role": "user"}] * 2047))
    [error] = err.value.errors()
    assert error["loc"] == ("messages",)
    assert f"2047 messages; at most {MAX_MESSAGES}" in error["msg"]


def test_the_openai_door_passes_names_and_tool_fields_to_the_template():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    body = chat_body(
        [
            {"role": "developer", "content": "Be brief.", "name": "ops"},
            {"role": "assistant", "content": None, "tool_calls": [call], "extra": 1},
            {"role": "tool", "content": [{"type": "text", "text": "42"}], "tool_call_id": "c1"},
        ]
    )
    messages = ChatCompletionRequest.model_validate(body).prompt().messages
    assert messages == (
        {"role": "system", "content": "Be brief.", "name": "ops"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    )


@pytest.mark.parametrize(
    "message",
    [
        {"role": "user", "name": 7},
        {"role": "assistant", "tool_calls": [{"id": "c"}]},
        {"role": "assistant", "tool_calls": "call"},
        {"role": "user", "content": [{"type": "text", "text": {"nested": "x"}}]},
        {"role": "user", "content": [1, 2]},
    ],
)
def test_the_openai_door_refuses_fields_of_the_wrong_type(message):
    with pytest.raises((pydantic.ValidationError, InvalidParameterError)):
        ChatCompletionRequest.model_validate(chat_body([message])).prompt()


def test_the_grpc_door_refuses_too_many_messages_naming_the_field():
    request = pb.GenerateRequest()
    for _ in range(MAX_MESSAGES):
        request.messages.messages.add(role="user", content="hi")
    assert len(prompt_from_proto(request).messages) == MAX_MESSAGES  # type: ignore[union-attr]
    request.messages.messages.add(role="user", content="hi")
    with pytest.raises(InvalidParameterError, match="1025 messages; at most 1024") as err:
        prompt_from_proto(request)
    assert err.value.param == "messages"
