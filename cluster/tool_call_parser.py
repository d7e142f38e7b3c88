"""Tool calls out of a chat answer, as it streams: each parser takes the answer's text piece by
piece and says what is content and what is a call (a call's header, then its arguments' text),
so that a streamed answer and a whole one (its text fed at once) give the same calls.

One parser per choice, by the request's tool choice: "auto" reads the Hermes tags of
`tool_calls.CALL_OPEN`/`CALL_CLOSE`, "required" the JSON array its grammar forces, a named
function the arguments object its grammar forces.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvray.cluster.tool_calls import CALL_CLOSE, CALL_OPEN, ToolUse
from kvray.workers.grammar_spec import compact_json


@dataclass
class CallDelta:
    """Part of call `index`: its header (`id` and `name`, once, first) and/or arguments text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_json(self) -> dict[str, Any]:
        """OpenAI's streamed form: the header carries type and name, later parts only text."""
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {
            "index": self.index,
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class Parsed:
    """What a piece of the answer turned out to be: content text and parts of calls."""

    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def add(self, other: Parsed) -> Parsed:
        self.content += other.content
        for delta in other.calls:
            self.add_call(delta)
        return self

    def add_call(self, delta: CallDelta) -> None:
        """Add a part of a call, joining a part of the same call that came just before."""
        if self.calls and self.calls[-1].index == delta.index and delta.id is None:
            self.calls[-1].arguments += delta.arguments
        else:
            self.calls.append(delta)


class ToolCallParser(Protocol):
    num_calls: int  # calls begun so far

    def feed(self, text: str) -> Parsed:
        """The next piece of the answer's text: what can be said of it now (some text may be
        held until more comes)."""
        ...

    def finish(self) -> Parsed:
        """The answer ended: whatever was held."""
        ...


def make_parser(tools: ToolUse) -> ToolCallParser | None:
    """A parser for one choice of a request with `tools`; None for choice "none"."""
    if tools.choice == "function":
        return NamedCallParser(tools.function or "")
    if tools.choice == "required":
        return CallArrayParser()
    if tools.choice == "auto":
        return TaggedCallParser(set(tools.names), tools.parallel)
    return None


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def parse_all(parser: ToolCallParser, text: str) -> tuple[str, list[dict[str, Any]]]:
    """A whole answer: its content and its calls, in OpenAI's message form."""
    parsed = parser.feed(text).add(parser.finish())
    calls: list[dict[str, Any]] = []
    for delta in parsed.calls:
        if delta.id is not None:
            calls.append({"id": delta.id, "type": "function", "function": {"name": delta.name}})
            calls[-1]["function"]["arguments"] = ""
        calls[delta.index]["function"]["arguments"] += delta.arguments
    return parsed.content, calls


class NamedCallParser:
    """A named function's call: the whole answer is its arguments object (the grammar's)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.num_calls = 0

    def feed(self, text: str) -> Parsed:
        if self.num_calls:
            return Parsed(calls=[CallDelta(0, arguments=text)] if text else [])
        self.num_calls = 1
        return Parsed(calls=[CallDelta(0, new_call_id(), self.name, text)])

    def finish(self) -> Parsed:
        return self.feed("") if not self.num_calls else Parsed()


class CallArrayParser:
    """Choice "required": the answer is a JSON array of {"name": ..., "arguments": {...}} (the
    grammar's). It is scanned a character at a time, following strings and nesting: a call
    begins once its name is complete, and its arguments' text passes on as it comes (held until
    the name, were the name to come last)."""

    def __init__(self) -> None:
        self.num_calls = 0
        self._depth = 0
        self._in_string = self._escaped = False
        self._in_value = False  # in an item (depth 2): reading a value, not a key
        self._key = ""  # the item's key being read, or whose value is being read (JSON text)
        self._member: str | None = None  # that key, once read
        self._name = ""  # the name's value, as JSON text
        self._held = ""  # arguments read before the name
        self._in_arguments = False  # the arguments' value has begun
        self._call = -1  # the index of the item's call, once it has begun

    def feed(self, text: str) -> Parsed:
        out = Parsed()
        for char in text:
            if self._in_value and not self._ends_value(char):
                self._value_char(char, out)
            self._follow(char, out)
        return out

    def finish(self) -> Parsed:
        return Parsed()  # an unfinished name begins no call

    def _ends_value(self, char: str) -> bool:
        return not self._in_string and self._depth == 2 and char in ",}"

    def _value_char(self, char: str, out: Parsed) -> None:
        if self._member == "name":
            self._name += char
        elif self._member == "arguments" and (self._in_arguments or not char.isspace()):
            self._in_arguments = True  # (the spaces before the value are not its text)
            if self._call >= 0:
                out.add_call(CallDelta(self._call, arguments=char))
            else:
                self._held += char

    def _follow(self, char: str, out: Parsed) -> None:
        """Strings, nesting, and at depth 2 (an item's members) where a key or value ends."""
        is_key = self._depth == 2 and not self._in_value
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
            if is_key:
                self._key += char
        elif char == '"':
            self._in_string = True
            if is_key:
                self._key = char
        elif char in "[{":
            self._depth += 1
            if self._depth == 2:
                self._key, self._name, self._held, self._call = "", "", "", -1
                self._in_arguments = False
        elif self._depth == 2 and char in ",}":  # a member ends
            if self._in_value and self._member == "name":
                self._begin(out)
            self._in_value = False
            self._depth -= char == "}"
        elif char in "]}":
            self._depth -= 1
        elif is_key and char == ":":
            self._in_value, self._member = True, self._key_name()

    def _key_name(self) -> str | None:
        try:
            key = json.loads(self._key)
        except ValueError:
            return None
        return key if isinstance(key, str) else None

    def _begin(self, out: Parsed) -> None:
        try:
            name = json.loads(self._name)
        except ValueError:
            return
        if isinstance(name, str) and self._call < 0:
            self._call, self.num_calls = self.num_calls, self.num_calls + 1
            out.add_call(CallDelta(self._call, new_call_id(), name, self._held))
            self._held = ""


class TaggedCallParser:
    """Choice "auto": calls are `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in free
    text; the rest is content, less the whitespace that only separates it from a call. A call
    whose JSON does not parse, or that names no tool, stays content. Text is held only while
    it may begin a tag, is whitespace, or is a call not yet closed. Without `parallel`, what
    follows the first call is dropped."""

    def __init__(self, names: set[str], parallel: bool) -> None:
        self.names, self.parallel = names, parallel
        self.num_calls = 0
        self._buffer = ""
        self._in_call = False
        self._spaces = ""  # whitespace held: it is dropped if a call follows
        self._after_call = False  # a call has been made
        self._has_content = False  # content has been given

    def feed(self, text: str) -> Parsed:
        self._buffer += text
        out = Parsed()
        while self._buffer:
            if self.num_calls and not self.parallel:
                self._buffer = ""
            elif self._in_call:
                end = self._buffer.find(CALL_CLOSE)
                if end < 0:
                    break
                body, self._buffer = self._buffer[:end], self._buffer[end + len(CALL_CLOSE) :]
                self._in_call = False
                self._end_call(body, out)
            else:
                start = self._buffer.find(CALL_OPEN)
                if start < 0:
                    kept = _partial_tag(self._buffer)
                    self._content(self._buffer[: len(self._buffer) - kept], out)
                    self._buffer = self._buffer[len(self._buffer) - kept :]
                    break
                self._content(self._buffer[:start], out)
                self._buffer, self._in_call = self._buffer[start + len(CALL_OPEN) :], True
        return out

    def finish(self) -> Parsed:
        out = Parsed()
        rest, self._buffer = self._buffer, ""
        self._content((CALL_OPEN if self._in_call else "") + rest, out)
        self._in_call = False
        if not self.num_calls:
            out.content += self._spaces
        self._spaces = ""
        return out

    def _end_call(self, body: str, out: Parsed) -> None:
        call = self._call(body)
        if call is None:
            self._content(CALL_OPEN + body + CALL_CLOSE, out)
            return
        name, arguments = call
        self._spaces, self._after_call = "", True
        out.add_call(CallDelta(self.num_calls, new_call_id(), name, arguments))
        self.num_calls += 1

    def _call(self, body: str) -> tuple[str, str] | None:
        try:
            call = json.loads(body)
        except ValueError:
            return None
        if not isinstance(call, dict) or call.get("name") not in self.names:
            return None
        arguments = call.get("arguments", call.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as JSON text
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        return call["name"], compact_json(arguments)

    def _content(self, text: str, out: Parsed) -> None:
        """Content, but its trailing whitespace is held: dropped if a call comes next."""
        if self._after_call and not self._has_content:
            text = text.lstrip()  # the answer's content begins after a call
        body = text.rstrip()
        if body:
            out.content += self._spaces + body
            self._spaces, self._has_content = "", True
        self._spaces += text[len(body) :]


def _partial_tag(text: str) -> int:
    """How many characters at the end of `text` could begin CALL_OPEN."""
    for size in range(min(len(text), len(CALL_OPEN) - 1), 0, -1):
        if CALL_OPEN.startswith(text[-size:]):
            return size
    return 0
