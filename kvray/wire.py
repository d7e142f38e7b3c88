"""Sampling parameters on the wire: which `GenerateRequest` field carries each one.

The proto is the one list. `kvray.v1.SamplingParams` and `StoppingCriteria` name their fields
as `SamplingParams` does; `GenerateRequest.logprobs` and `prompt_logprobs` are the last two.
`SamplingParams.structured_output` is a oneof on the wire: its members (json_schema,
json_object, regex, choice, grammar) are parameters of their own here, each a `GrammarSpec` kind.
The gRPC server (proto -> `SamplingParams` keywords), the client (keywords -> proto) and the `kvray generate`
flags all read this module, so a new parameter needs a proto field and a `SamplingParams`
field, nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from kvray.protos.kvray.v1 import generation_pb2 as pb
from kvray.workers.grammar_spec import (
    GrammarSpec,
    from_response_format,
    from_structured_outputs,
    make_spec,
)
from kvray.workers.sampling_params import InvalidParameterError

# GenerateRequest fields holding parameters, and their message types
_MESSAGES = {
    "sampling": pb.SamplingParams.DESCRIPTOR,
    "stopping": pb.StoppingCriteria.DESCRIPTOR,
}
_TOP_LEVEL = ("logprobs", "prompt_logprobs")  # parameters that are GenerateRequest fields
_FLOAT_DIGITS = 6  # float32 on the wire: 0.9 arrives as 0.8999999761581421 unless rounded
_GRAMMAR_ONEOF = "structured_output"
# The oneof's members: each is a GrammarSpec kind, named as the kind.
GRAMMAR_FIELDS = tuple(
    f.name for f in pb.SamplingParams.DESCRIPTOR.oneofs_by_name[_GRAMMAR_ONEOF].fields
)
# Keywords `set_request_params` takes beside the wire parameters: a GrammarSpec (or vLLM's
# structured_outputs mapping), or OpenAI's response_format.
_GRAMMAR_KEYWORDS = ("structured_output", "response_format")


def param_fields() -> dict[str, FieldDescriptor]:
    """Every sampling parameter on the wire, by name (its proto field's descriptor)."""
    fields: dict[str, FieldDescriptor] = {}
    for descriptor in _MESSAGES.values():
        for f in descriptor.fields:
            fields[f.name] = cast(FieldDescriptor, f)
    for name in _TOP_LEVEL:
        fields[name] = cast(FieldDescriptor, pb.GenerateRequest.DESCRIPTOR.fields_by_name[name])
    return fields


def _is_map(f: FieldDescriptor) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry


def _holder(req: pb.GenerateRequest, name: str) -> Message:
    """The message of `req` that carries parameter `name`."""
    for message in _MESSAGES:
        holder: Message = getattr(req, message)
        if name in holder.DESCRIPTOR.fields_by_name:
            return holder
    return req


def params_from_request(req: pb.GenerateRequest) -> dict[str, Any]:
    """The parameters a request sets, as `SamplingParams` keyword arguments; unset optional
    fields are left out (they take `SamplingParams`' defaults)."""
    kwargs: dict[str, Any] = {}
    for name, f in param_fields().items():
        if name in GRAMMAR_FIELDS:
            continue
        holder = _holder(req, name)
        if f.has_presence and not holder.HasField(name):
            continue
        value = getattr(holder, name)
        if _is_map(f):  # logit_bias: token id -> float32 bias
            value = {key: round(v, _FLOAT_DIGITS) for key, v in value.items()}
        elif f.is_repeated:
            value = tuple(value)
        elif f.type == FieldDescriptor.TYPE_FLOAT:
            value = round(value, _FLOAT_DIGITS)
        kwargs[name] = value
    kind = req.sampling.WhichOneof(_GRAMMAR_ONEOF)
    if kind is not None:
        value = getattr(req.sampling, kind)
        kwargs["structured_output"] = make_spec(
            kind, list(value.choices) if kind == "choice" else value, param=kind
        )
    return kwargs


def set_request_params(req: pb.GenerateRequest, params: Mapping[str, Any]) -> None:
    """Set `SamplingParams`-style keyword arguments on a request (None values are skipped).

    Structured output is one of `structured_output` (a `GrammarSpec`, or a mapping in vLLM's
    `structured_outputs` form: {"json": schema}, ...), `response_format` (OpenAI's), or one of
    the oneof's members: `json_schema` (a mapping, JSON text or a pydantic model class),
    `json_object` (true), `regex`, `choice` (a list of strings), `grammar`.

    Raises:
        TypeError: a name that is not a parameter (the message lists the valid ones).
        InvalidParameterError: a structured output of the wrong shape, or more than one.
    """
    fields = param_fields()
    unknown = set(params) - set(fields) - set(_GRAMMAR_KEYWORDS)
    if unknown:
        raise TypeError(
            f"unknown parameter(s) {', '.join(sorted(unknown))}; valid: "
            f"{', '.join([*fields, *_GRAMMAR_KEYWORDS])}"
        )
    _set_structured_output(req, params)
    for name, value in params.items():
        if value is None or name in GRAMMAR_FIELDS or name in _GRAMMAR_KEYWORDS:
            continue
        holder = _holder(req, name)
        if _is_map(fields[name]):  # a mapping, or (key, value) pairs
            pairs = value.items() if isinstance(value, Mapping) else value
            getattr(holder, name).update({int(key): v for key, v in pairs})
        elif fields[name].is_repeated:
            getattr(holder, name).extend([value] if isinstance(value, str) else value)
        else:
            setattr(holder, name, value)


def _set_structured_output(req: pb.GenerateRequest, params: Mapping[str, Any]) -> None:
    """The one structured output `params` set (see `set_request_params`), on the request."""
    specs: list[GrammarSpec] = []
    for name, value in params.items():
        if value is None or value is False:
            continue
        if name == "structured_output":
            spec = value if isinstance(value, GrammarSpec) else from_structured_outputs(value)
        elif name == "response_format":
            spec = from_response_format(value)
        elif name in GRAMMAR_FIELDS:
            spec = make_spec(name, value, param=name)
        else:
            continue
        if spec is not None:
            specs.append(spec)
    if len(specs) > 1:
        raise InvalidParameterError(
            _GRAMMAR_ONEOF,
            f"{' and '.join(s.param for s in specs)} are each a structured output: set one",
        )
    if not specs:
        return
    spec, sampling = specs[0], req.sampling
    if spec.kind == "choice":
        sampling.choice.choices[:] = spec.choices
    elif spec.kind == "json_object":
        sampling.json_object = True
    else:
        setattr(sampling, spec.kind, spec.spec)
