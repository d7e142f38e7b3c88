"""Structured output through the front doors of a local cluster (tiny model): gRPC with the
kvray client and HTTP with the official `openai` client (`response_format`, `.parse()` with a
pydantic model, vLLM's `structured_outputs` and `guided_*`); answers validate whole and
streamed, both doors give the same answer, a bad schema is refused naming its field, and a
constrained stream is exact when its worker is killed mid-stream."""

from __future__ import annotations

import json
import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pydantic
import pytest

from kvray.client import InvalidRequestError, KvrayClient
from tests.helpers import free_port
from tests.integration.conftest import act_mid_stream, start_cluster, wait_for
from tests.integration.test_openai_http import metric, scrape
from tests.integration.test_structured_output import SCHEMAS

pytestmark = pytest.mark.ray

PROMPT = "Hello"
MESSAGES = [{"role": "user", "content": "Describe a pet."}]
SCHEMA = SCHEMAS["nested"]


class Pet(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    name: str = pydantic.Field(max_length=8)
    kind: str = pydantic.Field(pattern="^(cat|dog)$")
    age: int = pydantic.Field(ge=0, le=30)


@pytest.fixture(scope="module")
def cluster(ray_session, model_cache_dir):
    settings = {"replicas": 1, "http_port": free_port(), "max_model_len": 512}
    with start_cluster(model_cache_dir, **settings) as running:
        yield running


@pytest.fixture(scope="module")
def grpc(cluster):
    with KvrayClient(cluster.target) as c:
        yield c


@pytest.fixture(scope="module")
def http(cluster):
    return openai.OpenAI(base_url=cluster.http_url, api_key="unused", max_retries=0)


def assert_valid(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


# ------------------------------------------------------------------ gRPC


def test_grpc_answers_validate_whole_and_streamed(grpc):
    params = {"json_schema": SCHEMA, "temperature": 1.0, "seed": 4, "max_tokens": 200}
    whole = grpc.generate(PROMPT, **params)
    assert whole.finish_reason == "stop"
    assert_valid(whole.text, SCHEMA)
    chunks = list(grpc.stream(PROMPT, **params))
    assert "".join(c.text for c in chunks) == whole.text and len(chunks) > 10


def test_grpc_takes_each_kind_of_constraint(grpc):
    greedy = {"temperature": 0, "max_tokens": 60}
    assert re.fullmatch(
        "[a-z]{2,5}-[0-9]{1,3}", grpc.generate(PROMPT, regex="[a-z]{2,5}-[0-9]{1,3}", **greedy).text
    )
    assert grpc.generate(PROMPT, choice=["up", "down"], **greedy).text in ("up", "down")
    assert grpc.generate(PROMPT, grammar='start: "a" "b"+', **greedy).text.startswith("ab")
    answer = grpc.generate(PROMPT, structured_output={"json": Pet}, **greedy)
    Pet.model_validate_json(answer.text)


def test_grpc_n_samples_all_validate(grpc):
    completion = grpc.generate(
        PROMPT, json_schema=SCHEMA, n=4, temperature=1.0, seed=9, max_tokens=200
    )
    assert len(completion.choices) == 4
    for choice in completion.choices:
        assert_valid(choice.text, SCHEMA)


def test_grpc_refuses_a_schema_it_cannot_enforce_naming_the_field(grpc):
    with pytest.raises(InvalidRequestError, match="json_schema") as err:
        grpc.generate(PROMPT, json_schema={"type": "array", "uniqueItems": True})
    assert "uniqueItems" in str(err.value)
    with pytest.raises(InvalidRequestError, match="ignore_eos"):
        grpc.generate(PROMPT, regex="a+", ignore_eos=True)


# ------------------------------------------------------------------ HTTP


def test_chat_response_format_json_schema_validates(http):
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "household", "schema": SCHEMA, "strict": True},
    }
    answer = http.chat.completions.create(
        model="tiny", messages=MESSAGES, response_format=response_format, temperature=0,
        max_tokens=200,
    )  # fmt: skip
    assert answer.choices[0].finish_reason == "stop"
    assert_valid(answer.choices[0].message.content, SCHEMA)


def test_chat_parse_gives_a_pydantic_object(http):
    completion = http.chat.completions.parse(
        model="tiny", messages=MESSAGES, response_format=Pet, temperature=0, max_tokens=100
    )
    pet = completion.choices[0].message.parsed
    assert isinstance(pet, Pet) and pet.kind in ("cat", "dog") and 0 <= pet.age <= 30


def test_a_streamed_chat_answer_validates(http):
    stream = http.chat.completions.create(
        model="tiny", messages=MESSAGES, stream=True, temperature=1.0, seed=2, max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
    )  # fmt: skip
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert_valid(text, SCHEMA)


def test_completions_take_response_format_and_vllms_extras(http):
    def complete(**extra) -> str:
        return (
            http.completions.create(
                model="tiny", prompt=PROMPT, temperature=0, max_tokens=100, extra_body=extra
            )
            .choices[0]
            .text
        )

    assert isinstance(json.loads(complete(response_format={"type": "json_object"})), dict)
    assert complete(structured_outputs={"choice": ["left", "right"]}) in ("left", "right")
    assert re.fullmatch("[0-9]{3}", complete(guided_regex="[0-9]{3}"))
    assert_valid(complete(guided_json=SCHEMA), SCHEMA)


def test_both_doors_give_the_same_answer(grpc, http):
    grpc_text = grpc.generate(PROMPT, json_schema=SCHEMA, temperature=0, max_tokens=200).text
    http_text = http.completions.create(
        model="tiny", prompt=PROMPT, temperature=0, max_tokens=200,
        extra_body={"structured_outputs": {"json": SCHEMA}},
    ).choices[0].text  # fmt: skip
    assert grpc_text == http_text


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "strin"}},
                }
            },
            "response_format",
        ),
        ({"structured_outputs": {"regex": "(a)\\1"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"json": SCHEMA}, "guided_regex": "a"}, "guided_regex"),
        ({"guided_choice": []}, "guided_choice"),
    ],
)
def test_a_bad_constraint_is_400_naming_its_field(http, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        http.completions.create(model="tiny", prompt=PROMPT, extra_body=extra)
    assert err.value.body["param"] == param


# ------------------------------------------------------------------ metrics


def test_metrics_count_constrained_requests_compiles_and_mask_time(cluster, grpc):
    before = scrape(cluster)
    schema = {"type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"]}
    for _ in range(2):  # the second finds the schema compiled
        grpc.generate(PROMPT, json_schema=schema, temperature=0, max_tokens=20)
    grpc.generate(PROMPT, regex="[a-z]{2}", temperature=0, max_tokens=20)
    after = scrape(cluster)

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("kvray:constrained_requests_total", kind="json_schema") == 2
    assert grew("kvray:constrained_requests_total", kind="regex") == 1
    assert grew("kvray:grammar_compiles_total") == 2 and grew("kvray:grammar_cache_hits_total") == 1
    (replica,) = {
        dict(labels)["replica_id"]
        for name, labels in after
        if name == "kvray:replica_grammar_mask_seconds_total"
    }
    mask = grew("kvray:replica_grammar_mask_seconds_total", replica_id=replica)
    assert 0 < mask < grew("kvray:replica_step_seconds_total", replica_id=replica)


# ------------------------------------------------------------------ a killed worker


def test_a_constrained_stream_is_exact_when_its_worker_is_killed(ray_session, model_cache_dir):
    seeded = {"json_schema": SCHEMA, "temperature": 0.9, "seed": 3, "max_tokens": 200}
    with (
        start_cluster(model_cache_dir, replicas=2, max_model_len=512) as cluster,
        KvrayClient(cluster.target) as client,
    ):
        expected = client.generate(PROMPT, **seeded).text
        pids = {
            r.replica_id: ray_session.get(r.actor.__ray_call__.remote(lambda _: os.getpid()))
            for r in cluster.run(lambda: cluster.router.pool.ready())
        }

        def kill(replica) -> str:
            os.kill(pids[replica.replica_id], signal.SIGKILL)
            return replica.replica_id

        killed = act_mid_stream(cluster, kill, request_id="constrained")
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(client.generate, PROMPT, request_id="constrained", **seeded)
            got = future.result(timeout=300)
        killed.result(timeout=60)
        assert cluster.run(lambda: cluster.router.dispatcher.num_moved_requests) > 0
        assert got.text == expected and got.finish_reason == "stop"
        assert_valid(got.text, SCHEMA)
        wait_for(lambda: sum(r.state == "READY" for r in client.status().replicas) == 2, 120)
