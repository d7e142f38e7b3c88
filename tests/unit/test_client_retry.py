"""Client retries: UNAVAILABLE / RESOURCE_EXHAUSTED are retried before the first token, never after,
and other errors are not retried. Against a scripted in-process gRPC server (no Ray, no model)."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from kvray.client import InvalidRequestError, KvrayClient, OverloadedError, UnavailableError
from kvray.protos.kvray.v1 import generation_pb2 as pb
from kvray.protos.kvray.v1 import generation_pb2_grpc as pb_grpc


class ScriptedServicer(pb_grpc.GenerationServicer):
    """Fails the first calls as scripted, then streams three chunks (or fails mid-stream)."""

    def __init__(self, failures, mid_stream_failure=None):
        self.failures = list(failures)
        self.mid_stream_failure = mid_stream_failure
        self.calls = 0

    def Generate(self, request, context):
        self.calls += 1
        if self.failures:
            context.abort(self.failures.pop(0), "scripted failure")
        yield pb.GenerateResponse(request_id="r", token_ids=[1], text="a")
        if self.mid_stream_failure is not None:
            context.abort(self.mid_stream_failure, "failed mid-stream")
        yield pb.GenerateResponse(request_id="r", token_ids=[2], text="b")
        last = pb.GenerateResponse(request_id="r", token_ids=[3], text="c")
        last.finish_reason = pb.GenerateResponse.LENGTH
        last.usage.completion_tokens = 3
        yield last


@pytest.fixture
def serve():
    servers = []

    def start(servicer):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_GenerationServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)


def test_transient_failures_before_the_first_token_are_retried(serve):
    servicer = ScriptedServicer([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
    with KvrayClient(serve(servicer), max_retries=3, backoff_s=0.01) as client:
        result = client.generate("hi")
    assert result.text == "abc" and result.finish_reason == "length"
    assert servicer.calls == 3


def test_retries_give_up_with_a_typed_error(serve):
    servicer = ScriptedServicer([grpc.StatusCode.RESOURCE_EXHAUSTED] * 5)
    with (
        KvrayClient(serve(servicer), max_retries=2, backoff_s=0.01) as client,
        pytest.raises(OverloadedError),
    ):
        client.generate("hi")
    assert servicer.calls == 3


def test_invalid_argument_is_not_retried(serve):
    servicer = ScriptedServicer([grpc.StatusCode.INVALID_ARGUMENT])
    with (
        KvrayClient(serve(servicer), max_retries=3, backoff_s=0.01) as client,
        pytest.raises(InvalidRequestError),
    ):
        client.generate("hi")
    assert servicer.calls == 1


def test_failure_after_the_first_token_is_not_retried(serve):
    servicer = ScriptedServicer([], mid_stream_failure=grpc.StatusCode.UNAVAILABLE)
    with KvrayClient(serve(servicer), max_retries=3, backoff_s=0.01) as client:
        chunks = client.stream("hi")
        assert next(chunks).text == "a"
        with pytest.raises(UnavailableError):
            next(chunks)
    assert servicer.calls == 1
