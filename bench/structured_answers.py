"""Do constrained answers parse? The acceptance run of structured output against a live smollm2
cluster, through the OpenAI HTTP API with the `openai` client:

- json_schema: 50 prompts (extract a person, product, event, recipe, order, ... into one of 20
  schemas: objects, enums, integers and numbers with minimum/maximum (numbers in steps,
  multipleOf), arrays with maxItems, nested objects, additionalProperties false, patterns, strings
  with maxLength so that answers end), each greedy and sampled
  (temperature 0.8, a seed), whole and streamed: 200 answers, each parsed and validated with
  `jsonschema`;
- regex and choice (vLLM's `structured_outputs`): each answer checked with `re.fullmatch` or
  membership, greedy and sampled, whole and streamed;
- parse: `client.chat.completions.parse(response_format=PydanticModel)` returns the object.

`--part tools` checks tool calls instead (`tools` with `tool_choice="required"` and a named
function, whole and streamed, the streamed calls reassembled from OpenAI's delta format): every
call's arguments validate against its function's parameters and finish_reason is "tool_calls"
(kvray answers so for a named function too, where OpenAI answers "stop").

An answer that stops on max_tokens counts as invalid. Prints valid/total per category and exits
1 on any invalid answer.

    python bench/structured_answers.py                    # starts `kvray serve --model smollm2`
    python bench/structured_answers.py --url http://127.0.0.1:8000/v1   # a running server
    python bench/structured_answers.py --part tools
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log
from structured_workloads import (
    CHOICES,
    PROMPTS,
    REGEXES,
    SCHEMAS,
    TOOL_PROMPTS,
    TOOLS,
    make_validator,
    pydantic_models,
    tool_specs,
)

# -- one answer -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """How an answer is asked for: greedy or sampled, whole or streamed."""

    sampled: bool
    streamed: bool

    def sampling(self, seed: int) -> dict[str, Any]:
        return {"temperature": 0.8, "seed": seed} if self.sampled else {"temperature": 0.0}

    @property
    def name(self) -> str:
        return (
            f"{'sampled' if self.sampled else 'greedy'}/{'streamed' if self.streamed else 'whole'}"
        )


MODES = [Mode(sampled, streamed) for sampled in (False, True) for streamed in (False, True)]


@dataclass
class Answer:
    """One checked answer: `error` is empty where it is valid."""

    category: str
    mode: str
    name: str
    error: str = ""
    text: str = ""


Check = Callable[[], Awaitable[tuple[str, str]]]  # asks; returns (what is wrong or "", the text)


@dataclass(frozen=True)
class Task:
    category: str
    mode: str
    name: str
    check: Check

    async def run(self) -> Answer:
        try:
            error, text = await self.check()
        except Exception as exc:  # a refused request, or the SDK's own refusal to parse
            error, text = f"{type(exc).__name__}: {exc}", ""
        return Answer(self.category, self.mode, self.name, error, text)


async def ask(client: Any, model: str, prompt: str, mode: Mode, seed: int, **extra: Any):
    """The answer's text and finish_reason, whole or reassembled from the stream."""
    kwargs = {"model": model, "messages": [{"role": "user", "content": prompt}], **extra}
    kwargs.update(mode.sampling(seed))
    if not mode.streamed:
        reply = await client.chat.completions.create(**kwargs)
        return reply.choices[0].message.content or "", reply.choices[0].finish_reason
    pieces, finish = [], None
    async for chunk in await client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(pieces), finish


def check_finish(finish: str | None) -> str:
    return "" if finish == "stop" else f"finish_reason {finish!r}"


def schema_task(client, args, name: str, prompt: str, mode: Mode, seed: int):
    schema = SCHEMAS[name]
    response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}

    async def check() -> tuple[str, str]:
        content, finish = await ask(
            client, args.model, f"{prompt}\nExtract the {name} as JSON.", mode, seed,
            response_format=response_format, max_tokens=args.max_tokens,
        )  # fmt: skip
        return check_finish(finish) or schema_error(content, schema), content

    return Task("json_schema", mode.name, name, check)


def schema_error(content: str, schema: dict[str, Any]) -> str:
    """Empty where `content` is JSON that validates against `schema`, else why not."""
    try:
        value = json.loads(content)
    except ValueError as exc:
        return f"not JSON: {exc}"
    errors = list(make_validator(schema).iter_errors(value))
    return "; ".join(e.message for e in errors[:3])


def regex_task(client, args, name: str, pattern: str, prompt: str, mode: Mode, seed: int):
    async def check() -> tuple[str, str]:
        content, finish = await ask(
            client, args.model, prompt, mode, seed, max_tokens=64,
            extra_body={"structured_outputs": {"regex": pattern}},
        )  # fmt: skip
        if re.fullmatch(pattern, content) is None:
            return check_finish(finish) or f"does not match {pattern!r}", content
        return check_finish(finish), content

    return Task("regex", mode.name, name, check)


def choice_task(client, args, name: str, choices: list[str], prompt: str, mode: Mode, seed: int):
    async def check() -> tuple[str, str]:
        content, finish = await ask(
            client, args.model, prompt, mode, seed, max_tokens=16,
            extra_body={"structured_outputs": {"choice": choices}},
        )  # fmt: skip
        if content not in choices:
            return check_finish(finish) or f"not one of {choices}", content
        return check_finish(finish), content

    return Task("choice", mode.name, name, check)


def parse_task(client, args, model_class: type, prompt: str, mode: Mode, seed: int):
    async def check() -> tuple[str, str]:
        # NOTE: the SDK raises on an answer cut off by max_tokens or one it cannot parse.
        reply = await client.chat.completions.parse(
            model=args.model, messages=[{"role": "user", "content": prompt}],
            response_format=model_class, max_tokens=args.max_tokens, **mode.sampling(seed),
        )  # fmt: skip
        message = reply.choices[0].message
        if not isinstance(message.parsed, model_class):
            error = f"parsed is {type(message.parsed).__name__}, not {model_class.__name__}"
            return error, message.content or ""
        return check_finish(reply.choices[0].finish_reason), message.content or ""

    return Task("parse", mode.name, model_class.__name__, check)


# -- tool calls -------------------------------------------------------------------------------


async def ask_tools(client: Any, model: str, prompt: str, mode: Mode, seed: int, **extra: Any):
    """The answer's tool calls as [(name, arguments text)] and its finish_reason, whole or
    reassembled from the stream's deltas (by `index`: the first delta of a call names it, the
    following ones append to its arguments)."""
    kwargs = {"model": model, "messages": [{"role": "user", "content": prompt}], **extra}
    kwargs.update(mode.sampling(seed))
    if not mode.streamed:
        reply = await client.chat.completions.create(**kwargs)
        choice = reply.choices[0]
        calls = choice.message.tool_calls or []
        return [(c.function.name, c.function.arguments) for c in calls], choice.finish_reason
    calls: dict[int, list[str]] = {}
    finish = None
    async for chunk in await client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, ["", ""])
                if delta.function is not None:
                    call[0] += delta.function.name or ""
                    call[1] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    return [(name, arguments) for _, (name, arguments) in sorted(calls.items())], finish


def tool_task(client, args, tool: str, prompt: str, named: bool, mode: Mode, seed: int):
    choice = {"type": "function", "function": {"name": tool}} if named else "required"
    category = "tools: named" if named else "tools: required"

    async def check() -> tuple[str, str]:
        calls, finish = await ask_tools(
            client, args.model, prompt, mode, seed, tools=tool_specs(), tool_choice=choice,
            max_tokens=args.max_tokens,
        )  # fmt: skip
        if finish != "tool_calls":
            return f"finish_reason {finish!r}", json.dumps(calls)
        if not calls:
            return "no tool call", ""
        errors = [tool_call_error(call, tool if named else None) for call in calls]
        return "; ".join(e for e in errors if e), json.dumps(calls)

    return Task(category, mode.name, tool, check)


def tool_call_error(call: tuple[str, str], named: str | None) -> str:
    name, arguments = call
    if name not in TOOLS:
        return f"unknown function {name!r}"
    if named is not None and name != named:
        return f"called {name!r}, not the named {named!r}"
    return schema_error(arguments, TOOLS[name][1])


# -- the run ----------------------------------------------------------------------------------


def make_tasks(client: Any, args: argparse.Namespace) -> list[Task]:
    tasks = []
    for mode in MODES:
        if args.part == "tools":
            for i, (tool, prompt) in enumerate(TOOL_PROMPTS):
                for named in (False, True):
                    tasks.append(tool_task(client, args, tool, prompt, named, mode, seed=i))
            continue
        for i, (name, prompt) in enumerate(PROMPTS):
            tasks.append(schema_task(client, args, name, prompt, mode, seed=i))
        for i, (name, pattern, prompt) in enumerate(REGEXES):
            tasks.append(regex_task(client, args, name, pattern, prompt, mode, seed=i))
        for i, (name, choices, prompt) in enumerate(CHOICES):
            tasks.append(choice_task(client, args, name, choices, prompt, mode, seed=i))
        if not mode.streamed:
            for i, (model_class, prompt) in enumerate(pydantic_models()):
                tasks.append(parse_task(client, args, model_class, prompt, mode, seed=i))
    return tasks


async def run_all(base_url: str, args: argparse.Namespace) -> list[Answer]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(args.concurrency)

    async def one(task: Task) -> Answer:
        async with gate:
            return await task.run()

    try:
        return list(await asyncio.gather(*(one(t) for t in make_tasks(client, args))))
    finally:
        await client.close()


def report(answers: list[Answer], *, show: int) -> int:
    """Print valid/total per category (and per mode); returns the number of invalid answers."""
    total, valid = Counter[str](), Counter[str]()
    for a in answers:
        for key in (a.category, f"{a.category} ({a.mode})"):
            total[key] += 1
            valid[key] += not a.error
    print("\n## valid answers")
    for key in sorted(total, key=lambda k: (k.split(" (")[0], "(" in k, k)):
        print(f"{key:<36} {valid[key]:>4}/{total[key]:<4}")
    invalid = [a for a in answers if a.error]
    for a in invalid[:show]:
        print(f"INVALID {a.category} {a.mode} {a.name}: {a.error}\n    {a.text[:300]!r}")
    print(f"{len(answers) - len(invalid)}/{len(answers)} valid: "
          f"{'all answers valid' if not invalid else f'{len(invalid)} INVALID'}")  # fmt: skip
    return len(invalid)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("answers", "tools"), default="answers")
    parser.add_argument("--url", help="a running server's OpenAI base URL (default: start one)")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--max-tokens", type=int, default=200, help="for schemas and tools")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--show", type=int, default=10, help="invalid answers printed")
    args = parser.parse_args()
    if args.url:
        answers = asyncio.run(run_all(args.url, args))
    else:
        from serving import ServerProcess

        flags = ["--model", args.model, "--replicas", "1", "--max-model-len", "2048"]
        with ServerProcess(flags) as server:
            log(f"{args.part}: asking {server.http_url}")
            answers = asyncio.run(run_all(server.http_url, args))
    return 1 if report(answers, show=args.show) else 0


if __name__ == "__main__":
    sys.exit(main())
