"""Sampling parameters on the wire: which `GenerateRequest` field carries each one.

The proto is the one list. `kvray.v1.SamplingParams` and `StoppingCriteria` name their fields
as `SamplingParams` does; `GenerateRequest.logprobs` and `prompt_logprobs` are the last two.
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

# GenerateRequest fields holding parameters, and their message types
_MESSAGES = {
    "sampling": pb.SamplingParams.DESCRIPTOR,
    "stopping": pb.StoppingCriteria.DESCRIPTOR,
}
_TOP_LEVEL = ("logprobs", "prompt_logprobs")  # parameters that are GenerateRequest fields
_FLOAT_DIGITS = 6  # float32 on the wire: 0.9 arrives as 0.8999999761581421 unless rounded


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
    return kwargs


def set_request_params(req: pb.GenerateRequest, params: Mapping[str, Any]) -> None:
    """Set `SamplingParams`-style keyword arguments on a request (None values are skipped).

    Raises:
        TypeError: a name that is not a parameter (the message lists the valid ones).
    """
    fields = param_fields()
    unknown = set(params) - set(fields)
    if unknown:
        raise TypeError(
            f"unknown parameter(s) {', '.join(sorted(unknown))}; valid: {', '.join(fields)}"
        )
    for name, value in params.items():
        if value is None:
            continue
        holder = _holder(req, name)
        if _is_map(fields[name]):  # a mapping, or (key, value) pairs
            pairs = value.items() if isinstance(value, Mapping) else value
            getattr(holder, name).update({int(key): v for key, v in pairs})
        elif fields[name].is_repeated:
            getattr(holder, name).extend([value] if isinstance(value, str) else value)
        else:
            setattr(holder, name, value)
