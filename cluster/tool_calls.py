"""Tool calls on the chat endpoint, request side: OpenAI's `tools`, `tool_choice` and
`parallel_tool_calls` validated into a `ToolUse`; the tools rendered for the model (through its
chat template where the template takes `tools`, else as kvray's system-prompt block in the
Hermes format); and the grammar that forces a call for `required` or a named function.
Parsing the model's answer is `tool_call_parser.py`'s.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvray.workers.grammar_spec import GrammarSpec, compact_json
from kvray.workers.protocol import InvalidParameterError

# The tool-call format of kvray's default block, as Hermes and Qwen2.5 write it: each call is
# one JSON object {"name": ..., "arguments": {...}} between these tags.
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_CHOICES = ("none", "auto", "required")
MAX_TOOLS = 128  # as OpenAI
MAX_TOOLS_CHARS = 128 * 1024  # every tool's JSON: half a grammar spec's bound (the rest: framing)
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")

# kvray's block for a template that does not take `tools`: Qwen2.5's own tool prompt.
_BLOCK = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass(frozen=True)
class ToolUse:
    """What a chat request allows the model: `tools` (OpenAI's tool objects, checked) and the
    choice: "none" (never called), "auto" (the model decides; its answer is parsed), "required"
    (at least one call, forced by a grammar) or "function" (the call of `function`, forced)."""

    tools: tuple[dict[str, Any], ...]
    choice: str = "auto"
    function: str | None = None  # the named function, for choice "function"
    parallel: bool = True  # more than one call per answer

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t["function"]["name"] for t in self.tools)

    @property
    def rendered(self) -> tuple[dict[str, Any], ...]:
        """The tools the model is shown: none for "none" (it may not call them)."""
        return () if self.choice == "none" else self.tools

    def grammar(self) -> GrammarSpec | None:
        """The constraint of a forced choice: a named function's arguments object, or for
        "required" a JSON array of calls {"name", "arguments"} (one at most without
        `parallel`). None for "auto" and "none"."""
        if self.choice == "function":
            arguments = self._parameters(self.names.index(self.function or ""))
            return GrammarSpec.json_schema(arguments, param="tool_choice")
        if self.choice != "required":
            return None
        defs: dict[str, Any] = {}
        items = []
        for i, name in enumerate(self.names):
            arguments = self._parameters(i)
            if _has_ref(arguments):  # NOTE: its "#/..." refs point into it: moved to $defs
                defs[f"tool_{i}"] = _rebased(arguments, f"#/$defs/tool_{i}")
                arguments = {"$ref": f"#/$defs/tool_{i}"}
            items.append({
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": arguments},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            })  # fmt: skip
        schema: dict[str, Any] = {"type": "array", "items": {"anyOf": items}, "minItems": 1}
        if not self.parallel:
            schema["maxItems"] = 1
        if defs:
            schema["$defs"] = defs
        return GrammarSpec.json_schema(schema, param="tool_choice")

    def parameter_specs(self) -> list[GrammarSpec]:
        """Each tool's parameters as a spec, its errors naming the tool's field."""
        return [
            GrammarSpec.json_schema(self._parameters(i), param=f"tools[{i}].function.parameters")
            for i in range(len(self.tools))
        ]

    def _parameters(self, index: int) -> dict[str, Any]:
        return dict(self.tools[index]["function"]["parameters"])


def make_tool_use(tools: Any, tool_choice: Any, parallel_tool_calls: bool) -> ToolUse | None:
    """The request's tool use, checked; None without tools (and a choice that needs none).

    Raises:
        InvalidParameterError: naming `tools[i]...` or `tool_choice`.
    """
    checked = check_tools(tools or [])
    if tool_choice is None:
        choice, function = "auto", None
    elif isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICES:
            raise InvalidParameterError(
                "tool_choice",
                f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or "
                f'{{"type": "function", "function": {{"name": ...}}}}, got {tool_choice!r:.40}',
            )
        choice, function = tool_choice, None
    else:
        choice, function = "function", _named_function(tool_choice)
    if not checked:
        if choice in ("required", "function"):
            raise InvalidParameterError(
                "tool_choice", f"tool_choice {function or choice!r:.70} needs tools: none given"
            )
        return None
    use = ToolUse(checked, choice, function, parallel=bool(parallel_tool_calls))
    if function is not None and function not in use.names:
        raise InvalidParameterError(
            "tool_choice",
            f"tool_choice names the function {function!r:.70}, which is not among the tools "
            f"({', '.join(use.names)[:200]})",
        )
    return use


def _named_function(value: Any) -> str:
    is_function = isinstance(value, Mapping) and value.get("type", "function") == "function"
    function = value.get("function") if is_function else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str):
        raise InvalidParameterError(
            "tool_choice",
            'tool_choice must be "none", "auto", "required" or {"type": "function", '
            f'"function": {{"name": ...}}}}, got {value!r:.80}',
        )
    return name


def check_tools(tools: Any) -> tuple[dict[str, Any], ...]:
    """OpenAI's tools, checked and made plain: {"type": "function", "function": {"name",
    "description" (if given), "parameters" (an object schema; {} given none), "strict" (if
    given)}}. Names are unique and [a-zA-Z0-9_-]{1,64}; at most MAX_TOOLS tools of
    MAX_TOOLS_CHARS characters of JSON in all.

    Raises:
        InvalidParameterError: naming the tool's field (`tools[2].function.name`).
    """
    if not isinstance(tools, list):
        raise InvalidParameterError("tools", "tools must be a list of tools")
    if len(tools) > MAX_TOOLS:
        raise InvalidParameterError("tools", f"tools holds {len(tools)} tools; at most {MAX_TOOLS}")
    checked = tuple(_check_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools))
    names = [t["function"]["name"] for t in checked]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise InvalidParameterError(
                f"tools[{i}].function.name", f"tools[{i}].function.name {name!r} is given twice"
            )
    size = len(compact_json(list(checked)))
    if size > MAX_TOOLS_CHARS:
        raise InvalidParameterError(
            "tools", f"tools is {size} characters of JSON; at most {MAX_TOOLS_CHARS}"
        )
    return checked


def _check_tool(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
        raise InvalidParameterError(where, f'{where} must be {{"type": "function", "function": …}}')
    function = tool.get("function")
    if not isinstance(function, Mapping):
        raise InvalidParameterError(f"{where}.function", f"{where}.function must be an object")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidParameterError(
            f"{where}.function.name",
            f"{where}.function.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -, got {name!r:.70}",
        )
    plain: dict[str, Any] = {"name": name}
    description = function.get("description")
    if description is not None:
        if not isinstance(description, str):
            raise InvalidParameterError(
                f"{where}.function.description", f"{where}.function.description must be text"
            )
        plain["description"] = description
    plain["parameters"] = _check_parameters(function.get("parameters"), f"{where}.function")
    if function.get("strict") is not None:
        plain["strict"] = bool(function["strict"])
    return {"type": "function", "function": plain}


def _check_parameters(parameters: Any, where: str) -> dict[str, Any]:
    """An object schema; none given is one with no properties, as OpenAI takes it."""
    if parameters is None:
        return {"type": "object", "properties": {}}
    if not isinstance(parameters, Mapping) or parameters.get("type") != "object":
        got = parameters.get("type") if isinstance(parameters, Mapping) else parameters
        raise InvalidParameterError(
            f"{where}.parameters",
            f'{where}.parameters must be a JSON schema of "type": "object" (the arguments), '
            f"got {got!r:.60}",
        )
    return dict(parameters)


def _has_ref(schema: Any) -> bool:
    if isinstance(schema, Mapping):
        return "$ref" in schema or any(_has_ref(v) for v in schema.values())
    if isinstance(schema, list):
        return any(_has_ref(v) for v in schema)
    return False


def _rebased(schema: Any, root: str) -> Any:
    """`schema` with its local refs ("#", "#/...") pointing under `root` instead."""
    if isinstance(schema, Mapping):
        out = {k: _rebased(v, root) for k, v in schema.items()}
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            out["$ref"] = root + ref[1:]
        return out
    if isinstance(schema, list):
        return [_rebased(v, root) for v in schema]
    return schema


# ------------------------------------------------------------------ rendering


def template_inputs(
    tokenizer: Any, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and extra `apply_chat_template` arguments for a conversation with `tools`:
    `tools=...` where the model's template reads them (and earlier calls' arguments as objects);
    else kvray's block in the system prompt and earlier calls written into the assistant's
    messages in its format. Without tools, such a template sees the messages as given."""
    has_calls = any(_calls(m) for m in messages)
    if not (tools or has_calls):
        return list(messages), {}
    if template_takes_tools(_template(tokenizer)):
        extra = {"tools": list(tools)} if tools else {}
        return [_arguments_as_objects(m) for m in messages], extra
    if not tools:
        return list(messages), {}
    return with_tool_block(messages, tools), {}


def _template(tokenizer: Any) -> str:
    """The template `apply_chat_template` uses with tools (a "tool_use" one, if named)."""
    try:
        return str(tokenizer.get_chat_template(tools=[]))
    except (AttributeError, ValueError):
        return str(tokenizer.chat_template)


@functools.lru_cache(maxsize=8)
def template_takes_tools(template: str) -> bool:
    """Whether a chat template reads the `tools` variable (transformers passes it to every
    template; one that never reads it would drop the tools)."""
    import jinja2
    from jinja2 import meta

    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols", "jinja2.ext.do"])
    try:
        return "tools" in meta.find_undeclared_variables(env.parse(template))
    except jinja2.TemplateSyntaxError:  # a tag of transformers' own ({% generation %})
        return re.search(r"\btools\b", template) is not None


def _arguments_as_objects(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message whose calls' arguments are objects, as tool-use templates expect
    (OpenAI sends them as JSON text); arguments that are not JSON stay text."""
    calls = []
    for call in _calls(message):
        function = dict(call["function"])
        with_object = _json_object(function.get("arguments"))
        if with_object is not None:
            function["arguments"] = with_object
        calls.append({**call, "function": function})
    return {**message, "tool_calls": calls} if calls else message


def with_tool_block(
    messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The conversation with kvray's tool block: appended to the first message's content when
    it is the system prompt, else a system message of its own before the rest. Earlier calls
    of the assistant are written at the end of its message, as the block asks the model to."""
    block = _BLOCK.format(tools="\n".join(compact_json(t) for t in tools))
    out = [_calls_as_text(m) for m in messages]
    if out and out[0].get("role") == "system":
        content = out[0].get("content") or ""
        out[0] = {**out[0], "content": f"{content}\n\n{block}" if content else block}
    else:
        out.insert(0, {"role": "system", "content": block})
    return out


def _calls_as_text(message: dict[str, Any]) -> dict[str, Any]:
    calls = _calls(message)
    if not calls:
        return message
    texts = [message.get("content") or ""]
    for call in calls:
        function = call["function"]
        arguments = function.get("arguments")
        parsed = _json_object(arguments)
        written = compact_json(
            {"name": function.get("name"), "arguments": parsed if parsed is not None else arguments}
        )
        texts.append(f"{CALL_OPEN}\n{written}\n{CALL_CLOSE}")
    return {**message, "content": "\n".join(t for t in texts if t)}


def _calls(message: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A message's calls, where each is a mapping with a "function" mapping of JSON values (the
    OpenAI door checks them); none otherwise (the template sees the message as given)."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list) or not all(
        isinstance(c, Mapping) and isinstance(c.get("function"), Mapping) for c in calls
    ):
        return []
    try:
        compact_json(calls)
    except (TypeError, ValueError):
        return []
    return calls


def _json_object(text: Any) -> dict[str, Any] | None:
    if isinstance(text, Mapping):
        return dict(text)
    if not isinstance(text, str):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
