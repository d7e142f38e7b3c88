"""Client-side request building and error typing (no server)."""

from __future__ import annotations

import grpc
import pytest

from kvray.client import errors
from kvray.client.client import build_request
from kvray.client.types import chunk_from_proto
from kvray.cluster.chunks import CompletionChunk
from kvray.cluster.grpc_server import chunk_to_proto, prompt_from_proto, sampling_params_from_proto
from kvray.cluster.sequence import FinishReason
from kvray.protos.kvray.v1 import generation_pb2 as pb
from kvray.workers.protocol import Logprobs, SamplingParams


def test_unset_fields_take_sampling_params_defaults():
    req = build_request("hi")
    assert sampling_params_from_proto(req) == SamplingParams()
    assert prompt_from_proto(req) == "hi"


def test_every_parameter_survives_the_wire():
    kwargs = dict(
        temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
        presence_penalty=0.2, frequency_penalty=-0.3, seed=42, n=2, max_tokens=33,
        min_tokens=3, stop=["a", "bc"], stop_token_ids=[7], ignore_eos=True,
        include_stop_str_in_output=True, logprobs=4, skip_special_tokens=False,
    )  # fmt: skip
    params = sampling_params_from_proto(build_request([1, 2, 3], **kwargs))
    assert params == SamplingParams(**kwargs)
    assert prompt_from_proto(build_request([1, 2, 3])) == [1, 2, 3]


def test_zero_values_that_are_settings_are_kept():
    params = sampling_params_from_proto(build_request("x", temperature=0.0, top_k=0, seed=0))
    assert params.temperature == 0.0 and params.seed == 0


def test_missing_prompt_is_a_value_error():
    with pytest.raises(ValueError, match="prompt is missing"):
        prompt_from_proto(pb.GenerateRequest())


def test_unknown_client_parameter_is_a_type_error():
    with pytest.raises(TypeError, match="unknown parameter"):
        build_request("x", temprature=1.0)


def test_final_chunk_round_trip():
    chunk = CompletionChunk(
        "r1", 1, [5, 6], "ab", [Logprobs(5, -0.1, [5, 9], [-0.1, -2.0]), Logprobs(6, -0.2, [6], [-0.2])],
        finish_reason=FinishReason.STOP, stop_reason="END", num_prompt_tokens=4, num_output_tokens=9,
    )  # fmt: skip
    out = chunk_from_proto(chunk_to_proto(chunk))
    assert (out.request_id, out.index, out.token_ids, out.text) == ("r1", 1, [5, 6], "ab")
    assert out.finish_reason == "stop" and out.stop_reason == "END"
    assert (out.prompt_tokens, out.completion_tokens) == (4, 9)
    assert [lp.top_token_ids for lp in out.logprobs] == [[5, 9], [6]]
    assert out.logprobs[0].logprob == pytest.approx(-0.1)


def test_intermediate_chunk_has_no_finish_reason():
    out = chunk_from_proto(chunk_to_proto(CompletionChunk("r", 0, [1], "x")))
    assert out.finish_reason is None and out.completion_tokens is None


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize(
    ("code", "cls", "retryable"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidRequestError, False),
        (grpc.StatusCode.UNAUTHENTICATED, errors.AuthenticationError, False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.OverloadedError, True),
        (grpc.StatusCode.UNAVAILABLE, errors.UnavailableError, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceededError, False),
        (grpc.StatusCode.CANCELLED, errors.RequestCancelledError, False),
        (grpc.StatusCode.INTERNAL, errors.InternalServerError, False),
        (grpc.StatusCode.UNKNOWN, errors.InternalServerError, False),
    ],
)
def test_status_codes_become_typed_errors(code, cls, retryable):
    err = errors.from_rpc_error(_FakeRpcError(code, "details here"))
    assert type(err) is cls and str(err) == "details here" and err.retryable is retryable


def test_a_message_over_the_limit_is_not_retried():
    details = "Received message larger than max (4194400 vs. 4194304)"
    err = errors.from_rpc_error(_FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, details))
    assert type(err) is errors.MessageTooLargeError and not err.retryable
