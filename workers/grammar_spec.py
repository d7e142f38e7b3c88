"""What a request constrains its output to: `GrammarSpec` (a kind and its spec text), checked
for shape when it is made, and made from the front doors' forms of it (OpenAI's
`response_format`, vLLM's `structured_outputs`). Standard library only: the sampling parameters
carry it from the front doors through the router to the workers, and the engine checks the rest
when it compiles (`structured_output.GrammarCompiler`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from kvray.workers.sampling_params import InvalidParameterError

GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
# The request field each kind comes from in vLLM's `structured_outputs`: the field an error
# names unless the spec says where it came from (`GrammarSpec.param`).
_DEFAULT_PARAMS = {
    "json_schema": "structured_outputs.json",
    "json_object": "structured_outputs.json_object",
    "regex": "structured_outputs.regex",
    "choice": "structured_outputs.choice",
    "grammar": "structured_outputs.grammar",
}
MAX_SPEC_CHARS = 256 * 1024  # a schema, pattern, grammar or list of choices
MAX_CHOICES = 1024


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint on a request's output, validated for shape on construction (the engine
    checks the rest when it compiles: `GrammarCompiler.compile`).

    `spec` by kind: json_schema, the schema as JSON text (an object); json_object, "" (any JSON
    object); regex, the pattern (the whole output matches it); choice, a JSON array of the
    allowed strings; grammar, a Lark or GBNF grammar (llguidance's syntax).

    Raises:
        InvalidParameterError: an unknown kind, or a spec of the wrong shape; `param` names the
            request field (`param`, else vLLM's name for the kind).
    """

    kind: str
    spec: str = ""
    # The request field it came from (`response_format`, ...), named by errors. Not part of the
    # grammar: specs that differ only here are equal and share a compiled grammar.
    param: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise InvalidParameterError(
                self.param or "structured_outputs",
                f"unknown structured output kind {self.kind!r}; one of {', '.join(GRAMMAR_KINDS)}",
            )
        if not self.param:
            object.__setattr__(self, "param", _DEFAULT_PARAMS[self.kind])
        if not isinstance(self.spec, str):
            self.invalid(f"must be text, got {type(self.spec).__name__}")
        if len(self.spec) > MAX_SPEC_CHARS:
            self.invalid(f"is {len(self.spec)} characters long; at most {MAX_SPEC_CHARS}")
        _SHAPE_CHECKS[self.kind](self)

    @classmethod
    def json_schema(cls, schema: Any, *, param: str = "") -> GrammarSpec:
        """A spec for `schema` (a mapping, JSON text, or a pydantic model class: its
        `model_json_schema()`), written compactly so that schemas that differ only in
        whitespace share a compiled grammar. Key order is kept: it is the order in which the
        output's properties are generated."""
        if hasattr(schema, "model_json_schema"):
            schema = schema.model_json_schema()
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise InvalidParameterError(
                    param or _DEFAULT_PARAMS["json_schema"], f"the schema is not JSON: {exc}"
                ) from None
        return cls("json_schema", compact_json(schema), param)

    @classmethod
    def choice(cls, choices: Sequence[str], *, param: str = "") -> GrammarSpec:
        if isinstance(choices, str) or not isinstance(choices, Sequence):
            raise InvalidParameterError(
                param or _DEFAULT_PARAMS["choice"],
                f"{param or _DEFAULT_PARAMS['choice']} must be a list of strings",
            )
        return cls("choice", compact_json(list(choices)), param)

    @property
    def choices(self) -> list[str]:
        """A choice spec's strings."""
        assert self.kind == "choice"
        return list(json.loads(self.spec))

    def invalid(self, message: str) -> NoReturn:
        """Raise an InvalidParameterError naming this spec's field."""
        raise InvalidParameterError(self.param, f"{self.param} {message}")


def compact_json(value: object) -> str:
    """JSON without spaces, key order and non-ASCII characters kept."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _check_schema(spec: GrammarSpec) -> None:
    try:
        schema = json.loads(spec.spec)
    except ValueError as exc:
        spec.invalid(f"is not JSON: {exc}")
    if not isinstance(schema, dict):
        spec.invalid(f"must be a JSON object (a JSON schema), got {type(schema).__name__}")


def _check_json_object(spec: GrammarSpec) -> None:
    if spec.spec:
        spec.invalid("takes no spec (any JSON object); use json_schema to give a schema")


def _check_choice(spec: GrammarSpec) -> None:
    try:
        choices = json.loads(spec.spec)
    except ValueError as exc:
        spec.invalid(f"is not a JSON array: {exc}")
    if not isinstance(choices, list) or not choices or len(choices) > MAX_CHOICES:
        spec.invalid(f"must be a list of 1 to {MAX_CHOICES} strings")
    if not all(isinstance(c, str) and c for c in choices):
        spec.invalid("must hold non-empty strings only")


def _check_text(spec: GrammarSpec) -> None:
    if not spec.spec:
        spec.invalid("is empty")


_SHAPE_CHECKS: dict[str, Callable[[GrammarSpec], None]] = {
    "json_schema": _check_schema,
    "json_object": _check_json_object,
    "regex": _check_text,
    "choice": _check_choice,
    "grammar": _check_text,
}


# vLLM's `structured_outputs` keys that name a kind, and the options kvray takes as they are
# (its JSON has no whitespace between tokens and its engine no fallback): others are refused.
_VLLM_KINDS = {
    "json": "json_schema",
    "json_object": "json_object",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
}
_VLLM_OPTIONS_TAKEN = ("disable_any_whitespace", "disable_fallback")


def from_structured_outputs(
    value: Mapping[str, Any], *, param: str = "structured_outputs"
) -> GrammarSpec | None:
    """A spec from vLLM's `structured_outputs`: one of {"json": schema}, {"regex": pattern},
    {"choice": [strings]}, {"grammar": Lark or GBNF}, {"json_object": true}. None when it sets
    none. Errors name `param.<key>`.

    Raises:
        InvalidParameterError: two kinds set, an option kvray does not take, or a bad spec.
    """
    if not isinstance(value, Mapping):
        raise InvalidParameterError(param, f"{param} must be an object, got {value!r:.60}")
    given = {k: v for k, v in value.items() if v is not None and v is not False}
    for key in given:
        if key not in _VLLM_KINDS and key not in _VLLM_OPTIONS_TAKEN:
            raise InvalidParameterError(
                f"{param}.{key}",
                f"{param}.{key} is not supported; set one of {', '.join(_VLLM_KINDS)}",
            )
    kinds = [k for k in given if k in _VLLM_KINDS]
    if len(kinds) > 1:
        raise InvalidParameterError(param, f"{param} sets {' and '.join(kinds)}: set one")
    if not kinds:
        return None
    key, spec = kinds[0], given[kinds[0]]
    return make_spec(_VLLM_KINDS[key], spec, param=f"{param}.{key}")


def make_spec(kind: str, value: Any, *, param: str) -> GrammarSpec:
    """A spec of `kind` from a front door's value: a schema (a mapping, JSON text or a pydantic
    model class) for json_schema, true for json_object, a list of strings for choice, text for
    regex and grammar.

    Raises:
        InvalidParameterError: a value of the wrong type or shape, naming `param`.
    """
    if kind == "json_schema":
        return GrammarSpec.json_schema(value, param=param)
    if kind == "choice":
        return GrammarSpec.choice(value, param=param)
    if kind == "json_object":
        if value is not True:
            raise InvalidParameterError(param, f"{param} must be true, got {value!r:.60}")
        return GrammarSpec("json_object", "", param)
    if not isinstance(value, str):
        raise InvalidParameterError(param, f"{param} must be text, got {type(value).__name__}")
    return GrammarSpec(kind, value, param)


def from_response_format(
    value: Mapping[str, Any], *, param: str = "response_format"
) -> GrammarSpec | None:
    """A spec from OpenAI's `response_format`: {"type": "json_schema", "json_schema": {"name",
    "schema", "strict"}} (the schema is always enforced, strict or not; no schema: any JSON
    value), {"type": "json_object"}, or {"type": "text"} (None: no constraint).

    Raises:
        InvalidParameterError: naming `param`: another type, or a bad schema.
    """
    if not isinstance(value, Mapping):
        raise InvalidParameterError(param, f"{param} must be an object, got {value!r:.60}")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object", "", param)
    if kind != "json_schema":
        raise InvalidParameterError(
            param,
            f"{param} type {kind!r:.40} is not supported; one of text, json_object, json_schema",
        )
    body = value.get("json_schema")
    if not isinstance(body, Mapping) or not isinstance(body.get("name", ""), str):
        raise InvalidParameterError(
            param, f"{param}.json_schema must be an object with a name and a schema"
        )
    schema = body.get("schema")
    return GrammarSpec.json_schema({} if schema is None else schema, param=param)
