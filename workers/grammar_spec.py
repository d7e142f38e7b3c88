"""What a request constrains its output to: `GrammarSpec` (a kind and its spec text), checked
for shape when it is made. Standard library only: the sampling parameters carry it from the
front doors through the router to the workers, and the engine checks the rest when it compiles
(`structured_output.GrammarCompiler`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from kvray.workers.protocol import InvalidParameterError

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
    def json_schema(cls, schema: Mapping[str, Any] | str, *, param: str = "") -> GrammarSpec:
        """A spec for `schema` (a mapping or JSON text), written compactly so that schemas that
        differ only in whitespace share a compiled grammar. Key order is kept: it is the order
        in which the output's properties are generated."""
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
        return cls("choice", compact_json(list(choices)), param)

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
