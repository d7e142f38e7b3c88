"""One list of each fact: the proto's fields are the sampling parameters, the status the server
sends, and the client's types; these tests keep every reader of them in step."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from kvray.client import AsyncKvrayClient, KvrayClient
from kvray.client import types as client_types
from kvray.client.client import build_request
from kvray.cluster.grpc_server import sampling_params_from_proto, status_to_proto
from kvray.cluster.stats import ClusterStats, ReplicaState, ReplicaStats, ScalingEvent
from kvray.protos.kvray.v1 import generation_pb2 as pb
from kvray.wire import GRAMMAR_FIELDS, param_fields, params_from_request
from kvray.workers.grammar_spec import GRAMMAR_KINDS, GrammarSpec
from kvray.workers.protocol import ROUTER_SET_FIELDS, InvalidParameterError, SamplingParams


def test_every_wire_parameter_is_a_sampling_params_field_and_back():
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    wire = set(param_fields()) - set(GRAMMAR_FIELDS) | {"structured_output"}
    assert wire == fields - ROUTER_SET_FIELDS


def test_the_structured_output_oneof_holds_one_field_per_grammar_kind():
    assert set(GRAMMAR_FIELDS) == set(GRAMMAR_KINDS)


def test_a_request_with_nothing_set_carries_no_parameters():
    assert params_from_request(pb.GenerateRequest(text="x")) == {
        "min_tokens": 0,
        "stop": (),
        "stop_token_ids": (),
        "ignore_eos": False,
        "include_stop_str_in_output": False,
        "early_stopping": False,
        "logit_bias": {},
        "allowed_token_ids": (),
        "bad_words": (),
    }  # proto3 scalars without presence: their zero values are SamplingParams' defaults
    assert sampling_params_from_proto(pb.GenerateRequest(text="x")) == SamplingParams()


def test_floats_arrive_as_they_were_written():
    params = sampling_params_from_proto(build_request("x", top_p=0.9, temperature=0.7))
    assert (params.top_p, params.temperature) == (0.9, 0.7)


def test_a_single_stop_string_is_one_stop_string():
    assert sampling_params_from_proto(build_request("x", stop="END")).stop == ("END",)


def test_token_constraints_survive_the_wire():
    request = build_request(
        "x", logit_bias={"5": 0.9, 7: -100}, allowed_token_ids=[1, 2], bad_words="darn"
    )
    params = sampling_params_from_proto(request)
    assert params.logit_bias == ((5, 0.9), (7, -100.0))  # OpenAI's string keys are ids too
    assert (params.allowed_token_ids, params.bad_words) == ((1, 2), ("darn",))
    assert sampling_params_from_proto(build_request("x", logit_bias=[(3, 1)])).logit_bias == (
        (3, 1.0),
    )


SCHEMA = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}


@pytest.mark.parametrize(
    ("params", "spec"),
    [
        ({"json_schema": SCHEMA}, GrammarSpec.json_schema(SCHEMA)),
        ({"json_schema": '{ "type": "object" }'}, GrammarSpec.json_schema({"type": "object"})),
        ({"json_object": True}, GrammarSpec("json_object")),
        ({"regex": "[a-z]+"}, GrammarSpec("regex", "[a-z]+")),
        ({"choice": ["yes", "no"]}, GrammarSpec.choice(["yes", "no"])),
        ({"grammar": 'start: "a"'}, GrammarSpec("grammar", 'start: "a"')),
        ({"structured_output": GrammarSpec("regex", "x+")}, GrammarSpec("regex", "x+")),
        ({"structured_output": {"choice": ["a", "b"]}}, GrammarSpec.choice(["a", "b"])),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": SCHEMA},
                }
            },
            GrammarSpec.json_schema(SCHEMA),
        ),
        ({"response_format": {"type": "text"}, "json_object": False}, None),
    ],
)
def test_structured_output_survives_the_wire(params, spec):
    got = sampling_params_from_proto(build_request("x", **params)).structured_output
    assert got == spec
    if spec is not None:
        assert got.spec == spec.spec  # key order kept: it is the order properties are written
        assert got.param == spec.kind  # errors name the proto field


def test_two_structured_outputs_are_refused_before_sending():
    with pytest.raises(InvalidParameterError, match="set one"):
        build_request("x", regex="a", choice=["b"])


def test_json_object_false_on_the_wire_is_refused_naming_it():
    request = pb.GenerateRequest(text="x")
    request.sampling.json_object = False  # sets the oneof's member
    with pytest.raises(InvalidParameterError, match="json_object must be true") as err:
        sampling_params_from_proto(request)
    assert err.value.param == "json_object"


def test_unknown_parameter_names_the_valid_ones():
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) temprature; valid: temperature"):
        build_request("x", temprature=1.0)


def _proto_scalars(message_type) -> set[str]:
    return {f.name for f in message_type.DESCRIPTOR.fields if f.message_type is None}


@pytest.mark.parametrize(
    ("message", "source"),
    [
        (pb.ReplicaStatus, ReplicaStats),
        (pb.ClusterStatus, ClusterStats),
        (pb.ScalingDecision, ScalingEvent),
    ],
)
def test_the_server_side_stats_hold_every_status_field(message, source):
    assert _proto_scalars(message) <= {f.name for f in dataclasses.fields(source)}


@pytest.mark.parametrize(
    ("message", "mirror"),
    [
        (pb.ReplicaStatus, client_types.ReplicaStatus),
        (pb.ClusterStatus, client_types.ClusterStatus),
        (pb.ScalingDecision, client_types.ScalingDecision),
        (pb.ModelInfo, client_types.ModelInfo),
    ],
)
def test_the_client_types_mirror_the_proto_messages(message, mirror):
    assert {f.name for f in message.DESCRIPTOR.fields} == {
        f.name for f in dataclasses.fields(mirror)
    }


def test_cluster_status_survives_the_wire():
    replica = ReplicaStats(
        "replica-3", ReplicaState.DRAINING, device="cpu", num_waiting=2, num_running=5,
        num_queued_tokens=40, kv_blocks_used=7, kv_blocks_total=64, num_preemptions=1,
        num_finished_requests=9,
    )  # fmt: skip
    status = ClusterStats(
        replicas=[replica, ReplicaStats("replica-4", ReplicaState.STARTING)],
        queue_depth=3, num_running=5, num_moved_requests=2, num_rebalanced_requests=11,
        min_replicas=1, max_replicas=4, target_replicas=2,
        recent_decisions=[ScalingEvent(1700000000.5, 1, 2, "ongoing=40 (/16 -> 2.50)")],
    )  # fmt: skip
    got = client_types.status_from_proto(status_to_proto(status))
    assert [r.state for r in got.replicas] == ["DRAINING", "STARTING"]
    assert (got.replicas[0].num_running, got.replicas[0].kv_blocks_used) == (5, 7)
    assert (got.queue_depth, got.num_rebalanced_requests, got.target_replicas) == (3, 11, 2)
    assert got.recent_decisions[0].reason.startswith("ongoing=40")
    assert got.recent_decisions[0].time_unix == 1700000000.5


def test_the_async_client_has_every_method_of_the_sync_one():
    def public(cls):
        return {
            name: inspect.signature(fn)
            for name, fn in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_")
        }

    sync, asynchronous = public(KvrayClient), public(AsyncKvrayClient)
    assert set(sync) == set(asynchronous)
    for name, signature in sync.items():
        assert list(signature.parameters) == list(asynchronous[name].parameters), name
