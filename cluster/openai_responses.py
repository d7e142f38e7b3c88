"""The OpenAI-compatible API's responses: completions and chat completions, whole or as
server-sent-event chunks, with OpenAI's logprobs and usage objects.

`Choices` gathers the kvray chunks of one API call (several prompts × n samples) into OpenAI
choices; the functions below render them as OpenAI JSON. A chat request with tools has each
choice's text parsed for tool calls (`tool_call_parser.py`), whole or as it streams.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from kvray.cluster.chunks import CompletionChunk
from kvray.cluster.tool_call_parser import ToolCallParser, make_parser, parse_all
from kvray.cluster.tool_calls import ToolUse
from kvray.workers.protocol import Logprobs


@dataclass
class Choice:
    index: int
    text: str = ""
    num_tokens: int = 0
    logprobs: list[Logprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


class Choices:
    """The choices of one API call: prompt `p`'s sample `i` is choice `p * n + i`."""

    def __init__(self, num_prompts: int, n: int) -> None:
        self.n = n
        self.choices = [Choice(i) for i in range(num_prompts * n)]
        self.usage = Usage()
        self._prompts_counted: set[int] = set()

    def add(self, prompt_index: int, chunk: CompletionChunk) -> Choice:
        """Fold a chunk of prompt `prompt_index` into its choice; returns that choice."""
        choice = self.choices[prompt_index * self.n + chunk.index]
        choice.text += chunk.text
        choice.num_tokens += len(chunk.token_ids)
        choice.logprobs += [lp for lp in chunk.logprobs or () if lp is not None]
        if chunk.finish_reason is not None:
            choice.finish_reason = chunk.finish_reason.value
            choice.stop_reason = chunk.stop_reason
            self.usage.completion_tokens += chunk.num_output_tokens
            if prompt_index not in self._prompts_counted:  # once per prompt, not per sample
                self._prompts_counted.add(prompt_index)
                self.usage.prompt_tokens += chunk.num_prompt_tokens
                self.usage.cached_tokens += chunk.num_cached_tokens
        return choice


class Renderer:
    """OpenAI JSON for one API call: its id, creation time, model name and token strings.

    When streamed, `include_usage` ends the stream with a usage event, and `continuous_usage`
    (vLLM's `continuous_usage_stats`) adds each choice's usage so far to every chunk. With
    `tools` (chat), each choice's text is parsed for calls: a message's `tool_calls`, and
    finish_reason "tool_calls" for an answer that made calls and stopped."""

    def __init__(
        self,
        kind: str,
        model: str,
        tokenizer: Any | None,
        *,
        include_usage: bool = False,
        continuous_usage: bool = False,
        tools: ToolUse | None = None,
    ) -> None:
        self.chat = kind == "chat"
        self.tools = tools if self.chat else None
        self._parsers: dict[int, ToolCallParser | None] = {}  # by choice, as they stream
        self.include_usage = include_usage
        self.continuous_usage = continuous_usage
        prefix = "chatcmpl" if self.chat else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.tokenizer = tokenizer
        self._sent_role: set[int] = set()

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def response(self, choices: Choices) -> dict[str, Any]:
        """The whole (non-streamed) response."""
        items = []
        for c in choices.choices:
            item: dict[str, Any] = {
                "index": c.index,
                "logprobs": self._logprobs(c.logprobs, c.text) if c.logprobs else None,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            if self.chat:
                item["message"] = self._message(c, item)
            else:
                item["text"] = c.text
            items.append(item)
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._envelope(obj, items), "usage": choices.usage.to_json()}

    def _message(self, choice: Choice, item: dict[str, Any]) -> dict[str, Any]:
        """A whole choice's message; its calls (if any) change `item`'s finish_reason."""
        parser = make_parser(self.tools) if self.tools is not None else None
        if parser is None:
            return {"role": "assistant", "content": choice.text}
        content, calls = parse_all(parser, choice.text)
        if not calls:
            return {"role": "assistant", "content": content}
        item["finish_reason"] = _finish_reason(choice.finish_reason, made_calls=True)
        return {"role": "assistant", "content": content or None, "tool_calls": calls}

    def _delta(self, choice: Choice, delta: CompletionChunk) -> tuple[dict[str, Any], bool]:
        """A streamed chat delta's message part, and whether the choice has made calls."""
        if self.tools is not None and choice.index not in self._parsers:
            self._parsers[choice.index] = make_parser(self.tools)
        parser = self._parsers.get(choice.index)
        if parser is None:
            return {"content": delta.text}, False
        parsed = parser.feed(delta.text)
        if delta.finish_reason is not None:
            parsed.add(parser.finish())
        message: dict[str, Any] = {"content": parsed.content} if parsed.content else {}
        if parsed.calls:
            message["tool_calls"] = [call.to_json() for call in parsed.calls]
        return message, parser.num_calls > 0

    def chunk(self, choice: Choice, delta: CompletionChunk) -> str | None:
        """One streamed event for `delta`, which was folded into `choice`; None when it has
        nothing to say (a token whose text waits for the rest of a character, or text a tool
        call parser holds)."""
        logprobs = [lp for lp in delta.logprobs or () if lp is not None]
        first = self.chat and choice.index not in self._sent_role
        message, made_calls = self._delta(choice, delta) if self.chat else ({}, False)
        says = message.get("content") or message.get("tool_calls") or (not self.chat and delta.text)
        if not (says or logprobs or delta.finish_reason or first):
            return None
        finish = delta.finish_reason.value if delta.finish_reason else None
        item: dict[str, Any] = {
            "index": choice.index,
            "logprobs": self._logprobs(logprobs, delta.text) if logprobs else None,
            "finish_reason": _finish_reason(finish, made_calls=made_calls),
        }
        if delta.finish_reason is not None:
            item["stop_reason"] = delta.stop_reason
        if self.chat:
            item["delta"] = message
            if first:  # the first chunk of a choice says who speaks
                self._sent_role.add(choice.index)
                item["delta"]["role"] = "assistant"
        else:
            item["text"] = delta.text
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        event = self._envelope(obj, [item])
        if self.continuous_usage:  # this choice's so far, as vLLM sends it
            prompt, done = delta.num_prompt_tokens, delta.num_output_tokens
            event["usage"] = {
                "prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done
            }  # fmt: skip
        elif self.include_usage:
            event["usage"] = None
        return sse(event)

    def usage_chunk(self, choices: Choices) -> str:
        """The last event when `stream_options.include_usage`: no choices, the usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return sse({**self._envelope(obj, []), "usage": choices.usage.to_json()})

    def _token(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return str(self.tokenizer.decode([token_id]))

    def _logprobs(self, logprobs: list[Logprobs], text: str) -> dict[str, Any]:
        if self.chat:
            return {"content": [self._chat_logprob(lp) for lp in logprobs]}
        tokens = [self._token(lp.token_id) for lp in logprobs]
        offsets, offset = [], 0
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [
                {self._token(t): v for t, v in zip(lp.top_token_ids, lp.top_logprobs)}
                for lp in logprobs
            ],
            "text_offset": offsets,
        }

    def _chat_logprob(self, lp: Logprobs) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            token = self._token(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        return {
            **entry(lp.token_id, lp.logprob),
            "top_logprobs": [entry(t, v) for t, v in zip(lp.top_token_ids, lp.top_logprobs)],
        }


def _finish_reason(reason: str | None, *, made_calls: bool) -> str | None:
    """OpenAI's "tool_calls" for an answer that made calls and ended of itself."""
    return "tool_calls" if made_calls and reason == "stop" else reason


def sse(data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
