"""A conversation as the prompt: its bounds (roles, number of messages, characters) and its
rendering with the model's chat template. The bounds are cheap and run on any thread; the
rendering is input work, which the input pool runs off the event loop."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvray.cluster.tool_calls import template_inputs
from kvray.workers.protocol import InvalidParameterError

# OpenAI's roles. NOTE: most templates know only system/user/assistant (and raise on another);
# the OpenAI door passes "developer" as "system", the gRPC door passes every role as given.
ROLES = ("system", "developer", "user", "assistant", "tool")
# At most this many messages in a conversation (OpenAI allows 2,048): rendering costs about as
# much per message as tokenizing MESSAGE_COST characters, whatever the message holds.
MAX_MESSAGES = 1024
MESSAGE_COST = 64


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation as the prompt, rendered with the model's chat template."""

    # {"role": ..., "content": ...}, oldest first; the OpenAI door adds "name", "tool_call_id"
    # and "tool_calls" where the caller set them, and the template sees them all.
    messages: tuple[dict[str, Any], ...]
    add_generation_prompt: bool = True  # end with the opening of an assistant turn
    # OpenAI's tool objects the model is shown (`tool_calls.template_inputs` renders them).
    tools: tuple[dict[str, Any], ...] = ()


def chat_chars(chat: ChatPrompt) -> int:
    """Every character the messages and tools hold: roles, names, contents and tool fields,
    keys too."""
    return sum(_num_chars(m) for m in chat.messages) + _num_chars(chat.tools)


def _num_chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        return sum(_num_chars(k) + _num_chars(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return sum(_num_chars(v) for v in value)
    return 0


def check_num_messages(num_messages: int, max_messages: int = MAX_MESSAGES) -> None:
    """Raises InvalidParameterError past `max_messages` (before anything reads the messages)."""
    if num_messages > max_messages:
        raise InvalidParameterError(
            "messages", f"messages holds {num_messages} messages; at most {max_messages}"
        )


def check_chat(chat: ChatPrompt, *, max_messages: int = MAX_MESSAGES) -> None:
    """The conversation's shape: at least one message, at most `max_messages`, each a mapping
    with a known role and a string content.

    Raises:
        InvalidParameterError: naming the message and its field.
    """
    if not chat.messages:
        raise InvalidParameterError("messages", "messages is empty: give at least one message")
    check_num_messages(len(chat.messages), max_messages)
    for i, message in enumerate(chat.messages):
        if not isinstance(message, Mapping):
            raise InvalidParameterError("messages", f"messages[{i}] must be a mapping")
        role = message.get("role")
        if not isinstance(role, str):
            raise InvalidParameterError("messages", f"messages[{i}].role must be a string")
        if role not in ROLES:
            shown = repr(role[:32]) + ("…" if len(role) > 32 else "")
            raise InvalidParameterError(
                "messages",
                f"messages[{i}].role must be one of {', '.join(ROLES)}; got {shown} "
                f"({len(role)} characters)",
            )
        if not isinstance(message.get("content"), str):
            raise InvalidParameterError("messages", f"messages[{i}].content must be a string")


def render_chat(tokenizer: Any, chat: ChatPrompt) -> list[int]:
    """Token ids of a conversation rendered with the model's chat template (checked first).

    Raises:
        InvalidParameterError: no template, or the template rejects the conversation.
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise InvalidParameterError(
            "messages", "this model has no chat template; send a text or token-id prompt"
        )
    messages, tool_args = template_inputs(tokenizer, chat.messages, chat.tools)
    try:
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=chat.add_generation_prompt, tokenize=False, **tool_args
        )
    except Exception as exc:  # the template rejects the conversation (jinja raise_exception)
        raise InvalidParameterError(
            "messages", f"the model's chat template rejected the messages: {exc}"
        ) from None
    # NOTE: the template writes the special tokens (BOS, turn markers) itself.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
