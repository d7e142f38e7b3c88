"""The clients against a scripted in-process gRPC server (no Ray, no model): UNAVAILABLE /
RESOURCE_EXHAUSTED are retried before the first token, never after, other errors are not
retried, and the async client's unary calls and health checks work as the sync client's do."""

from __future__ import annotations

import asyncio
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvray.client import (
    AsyncKvrayClient,
    InvalidRequestError,
    KvrayClient,
    OverloadedError,
    UnavailableError,
)
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

    def Tokenize(self, request, context):
        return pb.TokenizeResponse(token_ids=[ord(c) for c in request.text])

    def GetModelInfo(self, request, context):
        return pb.ModelInfo(model="scripted", max_model_len=64, eos_token_ids=[2])

    def GetClusterStatus(self, request, context):
        status = pb.ClusterStatus(queue_depth=4, min_replicas=1, max_replicas=2)
        status.replicas.add(replica_id="replica-0", state="READY", kv_blocks_total=8)
        return status


@pytest.fixture
def serve():
    servers = []

    def start(servicer):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_GenerationServicer_to_server(servicer, server)
        health_servicer = health.HealthServicer()
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
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


def test_the_async_client_answers_as_the_sync_one(serve):
    target = serve(ScriptedServicer([grpc.StatusCode.UNAVAILABLE]))

    async def calls(client):
        await client.wait_until_serving(timeout=10)
        return (
            await client.is_serving(),
            await client.tokenize("hi"),
            await client.model_info(),
            await client.status(),
            (await client.generate("hi")).text,
        )

    async def run_async():
        async with AsyncKvrayClient(target, backoff_s=0.01) as client:
            return await calls(client)

    got = asyncio.run(run_async())
    with KvrayClient(target, backoff_s=0.01) as client:
        client.wait_until_serving(timeout=10)
        want = (
            client.is_serving(),
            client.tokenize("hi"),
            client.model_info(),
            client.status(),
            client.generate("hi").text,
        )
    assert got == want
    serving, token_ids, info, status, text = got
    assert serving and token_ids == [104, 105] and text == "abc"
    assert info.model == "scripted" and info.eos_token_ids == [2]
    assert status.queue_depth == 4 and status.replicas[0].state == "READY"


def test_an_unreachable_server_is_not_serving():
    async def check():
        async with AsyncKvrayClient("127.0.0.1:9") as client:
            return await client.is_serving(timeout=0.5)

    assert asyncio.run(check()) is False


class ResumingServicer(pb_grpc.GenerationServicer):
    """Streams tokens 1, 2, 3 ("a", "b", "c"), resuming after what a request says it has; the
    first call fails with `failure` after `fail_after` chunks."""

    def __init__(self, failure, fail_after):
        self.failure, self.fail_after = failure, fail_after
        self.requests = []

    def Generate(self, request, context):
        self.requests.append(request)
        had = list(request.resume[0].token_ids) if request.resume else []
        for sent, token in enumerate(t for t in (1, 2, 3) if t not in had):
            if len(self.requests) == 1 and sent == self.fail_after:
                context.abort(self.failure, "the router went away")
            chunk = pb.GenerateResponse(request_id="r", token_ids=[token], text="_abc"[token])
            if token == 3:
                chunk.finish_reason = pb.GenerateResponse.LENGTH
            yield chunk
        if len(self.requests) == 1 and self.fail_after == 3:
            context.abort(self.failure, "the router went away after the last chunk")


@pytest.mark.parametrize(
    "failure", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED]
)
def test_a_resumed_stream_sends_what_it_has_and_gets_the_rest(serve, failure):
    servicer = ResumingServicer(failure, fail_after=1)
    with KvrayClient(serve(servicer), backoff_s=0.01) as client:
        chunks = list(client.stream("hi", resume=True))
    assert [t for c in chunks for t in c.token_ids] == [1, 2, 3]
    assert "".join(c.text for c in chunks) == "abc"
    (resumed,) = servicer.requests[1].resume
    assert (resumed.index, list(resumed.token_ids), resumed.num_text_chars) == (0, [1], 1)
    assert not resumed.finished


def test_a_stream_broken_after_its_last_chunk_is_not_resumed(serve):
    servicer = ResumingServicer(grpc.StatusCode.UNAVAILABLE, fail_after=3)
    with KvrayClient(serve(servicer), backoff_s=0.01) as client:
        text = "".join(c.text for c in client.stream("hi", resume=True))
    assert text == "abc" and len(servicer.requests) == 1


class RankedServicer(pb_grpc.GenerationServicer):
    """A beam search's two final chunks; the first call breaks between them."""

    def __init__(self):
        self.requests = []

    def Generate(self, request, context):
        self.requests.append(request)
        for index in (0, 1):
            if len(self.requests) == 1 and index == 1:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the router went away")
            chunk = pb.GenerateResponse(request_id="r", index=index, token_ids=[index + 5])
            chunk.finish_reason = pb.GenerateResponse.LENGTH
            yield chunk


def test_a_broken_beam_search_is_sent_again_whole_and_no_beam_comes_twice(serve):
    servicer = RankedServicer()
    with KvrayClient(serve(servicer), backoff_s=0.01) as client:
        chunks = list(client.stream("hi", resume=True, num_beams=2, n=2))
    assert [(c.index, c.token_ids) for c in chunks] == [(0, [5]), (1, [6])]
    assert len(servicer.requests) == 2 and not servicer.requests[1].resume
