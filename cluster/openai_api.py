"""The OpenAI-compatible API's requests: `/v1/completions` and `/v1/chat/completions` bodies,
validated, and turned into kvray prompts and `SamplingParams`.

Parameters keep OpenAI's names and vLLM's extras (`top_k`, `min_p`, `repetition_penalty`,
`ignore_eos`, `min_tokens`, `stop_token_ids`, `skip_special_tokens`,
`include_stop_str_in_output`, `add_generation_prompt`, `allowed_token_ids`, `bad_words`,
`structured_outputs` and its older `guided_json`, `guided_regex`, `guided_choice`,
`guided_grammar`); OpenAI's `response_format` on both endpoints. Fields kvray does not support
yet are refused by name rather than ignored; unknown fields are ignored, as OpenAI SDKs send
extras.
A chat message's `name`, `tool_call_id` and `tool_calls` reach the chat template (earlier
calls in the form the template reads: `tool_calls.template_inputs`).
Tool calls (chat only): `tools`, `tool_choice` (none, auto, required or a named function) and
`parallel_tool_calls` become a `ToolUse` (`tool_calls.py`): the tools reach the prompt, a
required or named choice becomes the request's grammar, and the answer is parsed for calls
(`openai_responses.Renderer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

from kvray.cluster.chat_prompt import ChatPrompt, check_num_messages
from kvray.cluster.input_processor import Prompt
from kvray.cluster.tool_calls import ToolUse, make_tool_use
from kvray.workers.grammar_spec import (
    GrammarSpec,
    from_response_format,
    from_structured_outputs,
    make_spec,
)
from kvray.workers.protocol import InvalidParameterError, SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage on every chunk too (needs include_usage)


class _SamplingRequest(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as OpenAI's abuse-monitoring id
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None  # token ids as strings (JSON keys) -> bias
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    # Structured output: OpenAI's response_format, vLLM's structured_outputs, or one of vLLM's
    # older guided_* fields (at most one of them).
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # Beam search, as vLLM's extra parameters: max(n, best_of) beams, the n best returned.
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool = False

    def caller_param(self, name: str) -> str:
        """The body's field that carries `SamplingParams` field `name`, as the caller set it."""
        return name

    def as_callers(self, exc: InvalidParameterError) -> InvalidParameterError:
        """The error, naming the field the caller set (a check past this body names kvray's)."""
        return InvalidParameterError(self.caller_param(exc.param), str(exc))

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """Every streamed chunk carries its choice's usage so far, as vLLM's
        `continuous_usage_stats` (which, as there, needs `include_usage`)."""
        options = self.stream_options
        return self.include_usage and options is not None and options.continuous_usage_stats

    def _sampling(self, *, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """SamplingParams from the shared fields. Raises InvalidParameterError."""
        given = {
            name: getattr(self, name)
            for name in (
                "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                "frequency_penalty", "repetition_penalty", "stop_token_ids", "bad_words",
            )
            if getattr(self, name) is not None
        }  # fmt: skip
        beams = max(self.n, self.best_of or self.n) if self.use_beam_search else 1
        if self.use_beam_search and beams == 1:
            raise InvalidParameterError(
                "use_beam_search", "use_beam_search needs n or best_of > 1: they are the beams"
            )
        return SamplingParams(
            **given,
            n=self.n,
            best_of=None if self.use_beam_search else self.best_of,
            num_beams=beams,
            length_penalty=self.length_penalty,
            early_stopping=self.early_stopping,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
            logit_bias=self._logit_bias(),
            allowed_token_ids=self._allowed_token_ids(),
            structured_output=self._structured_output(),
        )

    def _structured_output(self) -> GrammarSpec | None:
        """The one constraint the body sets, its errors naming the body's field."""
        given: list[GrammarSpec | None] = []
        if self.response_format is not None:
            given.append(from_response_format(self.response_format))
        if self.structured_outputs is not None:
            given.append(from_structured_outputs(self.structured_outputs))
        for name, kind in _GUIDED.items():
            if getattr(self, name) is not None:
                given.append(make_spec(kind, getattr(self, name), param=name))
        specs = [spec for spec in given if spec is not None]
        if len(specs) > 1:
            names = " and ".join(spec.param.split(".")[0] for spec in specs)
            raise InvalidParameterError(
                specs[1].param, f"{names} each constrain the output: set one"
            )
        return specs[0] if specs else None

    def _logit_bias(self) -> tuple[tuple[int, float], ...]:
        """OpenAI's logit_bias, whose keys are token ids written as strings."""
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                token_id = int(key)
            except ValueError:
                raise InvalidParameterError(
                    "logit_bias", f"logit_bias keys must be token ids, got {key!r:.40}"
                ) from None
            if token_id in bias:
                raise InvalidParameterError("logit_bias", f"logit_bias names token {key} twice")
            bias[token_id] = value
        return tuple(bias.items())

    def _allowed_token_ids(self) -> tuple[int, ...]:
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise InvalidParameterError(
                "allowed_token_ids", "allowed_token_ids is empty: no token could be sampled"
            )
        return tuple(self.allowed_token_ids or ())


# vLLM's older structured output fields, and the kind each gives.
_GUIDED = {
    "guided_json": "json_schema",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def prompts(self) -> list[Prompt]:
        """One prompt or several (a batch): each becomes its own request."""
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
            return [p]  # type: ignore[list-item]  # one text, or one prompt of token ids
        if not p:
            raise InvalidParameterError("prompt", "prompt is empty")
        return list(p)  # type: ignore[arg-type]  # several texts or token-id lists

    def sampling_params(self) -> SamplingParams:
        if self.echo:
            raise InvalidParameterError("echo", "echo is not supported")
        if self.suffix:
            raise InvalidParameterError("suffix", "suffix is not supported")
        return self._sampling(max_tokens=self.max_tokens, logprobs=self.logprobs)


# OpenAI's roles that chat templates do not know, as the role they mean. NOTE: most templates
# know only system/user/assistant, and some raise on any other role.
_ROLES = {"developer": "system"}


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: str  # JSON, as the model wrote it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    type: str = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None  # a tool message: the call it answers
    tool_calls: list[ToolCall] | None = None  # an assistant message: the calls it made

    def as_template_message(self, index: int) -> dict[str, Any]:
        """The message as chat templates take it: role and content, and the other fields the
        caller set."""
        message: dict[str, Any] = {
            "role": _ROLES.get(self.role, self.role),
            "content": _text(self.content, index),
        }
        for name in ("name", "tool_call_id"):
            if getattr(self, name) is not None:
                message[name] = getattr(self, name)
        if self.tool_calls is not None:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        return message


def _at_most_max_messages(value: Any) -> Any:
    """Refuse too many messages before pydantic builds one model per message."""
    if isinstance(value, list):
        check_num_messages(len(value))
    return value


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], BeforeValidator(_at_most_max_messages)]
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True

    @cached_property
    def tool_use(self) -> ToolUse | None:
        """The tools and the choice, checked; None without tools. Raises InvalidParameterError."""
        return make_tool_use(self.tools, self.tool_choice, self.parallel_tool_calls)

    def prompt(self) -> ChatPrompt:
        messages = tuple(m.as_template_message(i) for i, m in enumerate(self.messages))
        tools = self.tool_use.rendered if self.tool_use is not None else ()
        return ChatPrompt(messages, add_generation_prompt=self.add_generation_prompt, tools=tools)

    def sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidParameterError("top_logprobs", "top_logprobs needs logprobs: true")
        max_tokens = self.max_tokens
        if self.max_completion_tokens is not None:  # OpenAI's newer name wins
            max_tokens = self.max_completion_tokens
        try:
            return self._sampling(
                max_tokens=max_tokens, logprobs=(self.top_logprobs or 0) if self.logprobs else None
            )
        except InvalidParameterError as exc:
            raise self.as_callers(exc) from None

    def _structured_output(self) -> GrammarSpec | None:
        """A required or named tool choice's grammar, or the body's constraint (not both)."""
        spec, use = super()._structured_output(), self.tool_use
        forced = use.grammar() if use is not None else None
        if use is None or forced is None:
            return spec
        if spec is not None:
            raise InvalidParameterError(
                "tool_choice",
                f"tool_choice {use.function or use.choice!r:.70} constrains "
                f"the answer to tool calls, and {spec.param.split('.')[0]} constrains it too: "
                "set one",
            )
        return forced

    def caller_param(self, name: str) -> str:
        if name == "logprobs":
            return "top_logprobs"
        if name == "max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return name


def _text(content: str | Sequence[dict[str, Any]] | None, index: int) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidParameterError(
                "messages", f"messages[{index}].content: only text parts are supported"
            )
        parts.append(part["text"])
    return "\n".join(parts)
