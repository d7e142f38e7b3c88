"""A generic gRPC client that knows only the .proto file, or only server reflection, can stream."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.conftest import start_cluster

pytestmark = pytest.mark.ray

PROTO_ROOT = Path(__file__).resolve().parents[2] / "protos"


@pytest.fixture(scope="module")
def target(ray_session, model_cache_dir):
    with start_cluster(model_cache_dir, replicas=1) as running:
        yield running.target


def pool_from_proto_file(tmp_path: Path) -> descriptor_pool.DescriptorPool:
    out = tmp_path / "generation.pb"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--descriptor_set_out={out}",
         "kvray/v1/generation.proto"],
        check=True,
    )  # fmt: skip
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for f in files.file:
        pool.Add(f)
    return pool


def generate_generically(channel: grpc.Channel, pool: descriptor_pool.DescriptorPool) -> list:
    service = pool.FindServiceByName("kvray.v1.Generation")
    method = service.methods_by_name["Generate"]
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_stream(
        f"/{service.full_name}/{method.name}",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    request = request_cls(text="Hello, world!")
    request.stopping.max_tokens = 6
    request.stopping.ignore_eos = True
    return list(call(request, timeout=60))


def test_client_from_proto_file_alone_streams(target, tmp_path):
    with grpc.insecure_channel(target) as channel:
        responses = generate_generically(channel, pool_from_proto_file(tmp_path))
    assert sum(len(r.token_ids) for r in responses) == 6
    assert responses[-1].HasField("finish_reason") and responses[-1].usage.completion_tokens == 6


def test_client_from_reflection_alone_streams(target):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "kvray.v1.Generation" in database.get_services()
        responses = generate_generically(channel, descriptor_pool.DescriptorPool(database))
    assert sum(len(r.token_ids) for r in responses) == 6


def test_standard_health_service_reports_serving(target):
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "kvray.v1.Generation"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
