"""Fuzzing the front doors: field values at and past every bound, raw garbage bytes and invalid
UTF-8, conversations of odd shapes (roles, names, tool fields, content parts of the wrong type,
too many messages), header counts and sizes past their bounds, over gRPC and HTTP, against a
cluster with the fake model (the real tokenizer with the tiny models' chat template, scripted
tokens). Only documented statuses come back; afterwards the server serves, holds no KV block
and has not grown. The default run sends 400 requests and 200 conversations; `-m slow` sends
5,000."""

from __future__ import annotations

import json
import math
import random
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import pytest

from kvray.client import KvrayClient
from kvray.protos.kvray.v1 import generation_pb2 as pb
from kvray.workers.tiny_model import CHAT_TEMPLATE
from tests.helpers import free_port
from tests.integration.conftest import start_cluster, wait_for

pytestmark = pytest.mark.ray

GRPC_OK = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}
HTTP_OK = {200, 400, 404, 413, 429, 503, 504}
MAX_MODEL_LEN = 512
INT32, INT64 = 2**31 - 1, 2**63 - 1


def edge_floats(low: float, high: float) -> list[float]:
    return [low, high, low - 1e-3, high + 1e-3, (low + high) / 2, -1.0, 0.0, math.inf, math.nan]


def random_text(rng: random.Random, n: int) -> str:
    alphabet = "abc xyz\n\t日本語🚀€\u0000\ufffd"
    return "".join(rng.choice(alphabet) for _ in range(n))


def valid_at_the_bounds(rng: random.Random) -> bytes:
    """A request that is valid, with fields at their limits."""
    req = pb.GenerateRequest(text=random_text(rng, rng.choice([1, 100, 16 * MAX_MODEL_LEN])))
    req.sampling.temperature = rng.choice([0.0, 1e-6, 100.0])
    req.sampling.top_k = rng.choice([0, 1, INT32])
    req.sampling.top_p = rng.choice([1e-6, 1.0])
    req.sampling.seed = rng.choice([-INT64 - 1, INT64])
    req.sampling.n = 16 if req.sampling.temperature > 0 and req.sampling.top_k != 1 else 1
    req.stopping.max_tokens = rng.choice([1, 8])
    req.stopping.stop.extend("x" * 256 for _ in range(rng.choice([0, 64])))
    req.stopping.stop_token_ids.extend(range(256))
    for token_id in rng.sample(range(MAX_MODEL_LEN), rng.choice([0, 300])):
        req.sampling.logit_bias[token_id] = rng.choice([-100.0, 100.0])
    req.sampling.allowed_token_ids.extend(range(rng.choice([0, 1, 512])))
    req.sampling.bad_words.extend(rng.choice([[], ["x" * 256], ["ab", "c d"]]))
    req.logprobs = rng.choice([0, 20])
    req.request_id = "r" * 256
    req.session_id = "s" * 256
    return req.SerializeToString()


ROLES = ["user", "system", "assistant", "tool", "developer", "", "User", "narrator", "日本語"]
HUGE = 2**20  # a 1 MiB field: under the 4 MiB message, over the prompt's characters


def odd_role(rng: random.Random) -> str:
    return rng.choice([*ROLES, "x" * 300, "x" * HUGE, "\u0000"])


def num_messages(rng: random.Random) -> int:
    return rng.choice([0, 1, 2, 3, 1024, 1025, 2047])


def add_random_messages(rng: random.Random, req: pb.GenerateRequest) -> None:
    """A conversation of odd shape: roles, message counts and contents at and past the bounds
    (one field may be huge; the many messages of a long one are small)."""
    count = num_messages(rng)
    for i in range(count):
        if i == 0 or count < 4:
            req.messages.messages.add(
                role=odd_role(rng), content=random_text(rng, rng.choice([0, 5, 200, 600]))
            )
        else:
            req.messages.messages.add(role=rng.choice(ROLES[:3]), content="hi")
    if rng.random() < 0.3:
        req.messages.add_generation_prompt = rng.random() < 0.5


def random_chat_request(rng: random.Random) -> bytes:
    """A GenerateRequest holding a conversation: a short valid one now and then, otherwise an
    odd one."""
    req = pb.GenerateRequest()
    req.stopping.max_tokens = rng.choice([1, 4])
    if rng.random() < 0.3:
        for role in ("system", "user", "assistant", "user")[: rng.randint(1, 4)]:
            req.messages.messages.add(role=role, content=random_text(rng, 20))
    else:
        add_random_messages(rng, req)
    return req.SerializeToString()


def random_message(rng: random.Random, *, huge: bool) -> dict:
    """An OpenAI chat message of odd shape; with `huge`, one of its fields may be 1 MiB."""
    big = "n" * HUGE if huge else "n" * 300
    message: dict = {"role": rng.choice([*ROLES, 7, None, ["user"], big])}
    fields = {
        "content": [
            "hi", "", None, 7, {"text": "x"}, [[["deep"]]], [{"type": "text", "text": "hi"}],
            [{"type": "text", "text": {"a": [1]}}], [{"type": "image_url", "image_url": {"url": "x"}}],
            [{"type": "text"}], [{"type": "text", "text": big}],
        ],
        "name": ["ann", "", 7, None, big],
        "tool_call_id": ["c1", 5, big],
        "tool_calls": [
            [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            [{"id": 7}], "call", [], [{"id": "c", "function": {"name": big, "arguments": big}}],
        ],
    }  # fmt: skip
    for name, values in fields.items():
        if rng.random() < (0.9 if name == "content" else 0.3):
            message[name] = rng.choice(values)
    return message


def random_chat_body(rng: random.Random) -> dict:
    """A /chat/completions body: a short valid conversation now and then, otherwise an odd one."""
    if rng.random() < 0.3:
        turns = [{"role": "user", "content": random_text(rng, 20)}]
        return {"model": "fake", "messages": turns, "max_tokens": 4}
    count = num_messages(rng)
    messages = [
        random_message(rng, huge=i == 0)
        if i == 0 or count < 4
        else {"role": "user", "content": "hi"}
        for i in range(count)
    ]
    return {"model": "fake", "messages": messages, "max_tokens": rng.choice([1, 4])}


def random_request(rng: random.Random) -> bytes:
    """A GenerateRequest with random fields at and past their bounds, serialized; sometimes
    with its text's bytes replaced by invalid UTF-8, sometimes truncated."""
    if rng.random() < 0.25:
        return valid_at_the_bounds(rng)
    req = pb.GenerateRequest()
    kind = rng.random()
    if kind < 0.45:
        req.text = random_text(rng, rng.choice([0, 1, 5, 200, 32 * MAX_MODEL_LEN + 1]))
    elif kind < 0.8:
        n = rng.choice([0, 1, 3, MAX_MODEL_LEN - 1, MAX_MODEL_LEN])
        req.token_ids.ids.extend(rng.choice([-1, 0, 5, 511, 512, INT32]) for _ in range(n))
    elif kind < 0.95:
        add_random_messages(rng, req)
    s, st = req.sampling, req.stopping
    pick = rng.choice
    if rng.random() < 0.5:
        s.temperature = pick(edge_floats(0.0, 100.0))
    if rng.random() < 0.3:
        s.top_p = pick(edge_floats(0.0, 1.0))
    if rng.random() < 0.3:
        s.top_k = pick([-2, -1, 0, 1, INT32])
    if rng.random() < 0.3:
        s.min_p = pick(edge_floats(0.0, 1.0))
    for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
        if rng.random() < 0.15:
            setattr(s, name, pick(edge_floats(-2.0, 2.0)))
    if rng.random() < 0.3:
        s.seed = pick([-INT64 - 1, -1, 0, INT64])
    if rng.random() < 0.3:
        s.n = pick([-1, 0, 1, 2, 16, 17])
    if rng.random() < 0.5:
        st.max_tokens = pick([-1, 0, 1, 8, INT32])
    if rng.random() < 0.2:
        st.min_tokens = pick([-1, 0, 4, INT32])
    if rng.random() < 0.3:
        st.stop.extend(
            random_text(rng, pick([0, 1, 256, 257])) for _ in range(pick([1, 2, 64, 65]))
        )
    if rng.random() < 0.2:
        st.stop_token_ids.extend(pick([-1, 0, 7, 511, 512]) for _ in range(pick([1, 256, 257])))
    if rng.random() < 0.2:
        for _ in range(pick([1, 300, 301])):
            s.logit_bias[pick([-1, 0, 7, 511, 512, INT32])] = pick(edge_floats(-100.0, 100.0))
    if rng.random() < 0.2:
        s.allowed_token_ids.extend(pick([-1, 0, 7, 511, 512]) for _ in range(pick([1, 600])))
    if rng.random() < 0.2:
        s.bad_words.extend(
            random_text(rng, pick([0, 1, 256, 257])) for _ in range(pick([1, 2, 128, 129]))
        )
    if rng.random() < 0.2:  # structured output (the fake model refuses every one)
        kind = pick(["json_schema", "regex", "grammar", "choice", "json_object"])
        if kind == "choice":
            s.choice.choices.extend(
                random_text(rng, pick([0, 1, 5])) for _ in range(pick([0, 1, 1025]))
            )
        elif kind == "json_object":
            s.json_object = pick([True, False])
        else:
            setattr(
                s,
                kind,
                pick(['{"type": "object"}', "{", "", random_text(rng, pick([5, 2**18 + 1]))]),
            )
    if rng.random() < 0.2:
        st.ignore_eos = True
    if rng.random() < 0.2:
        req.logprobs = pick([-1, 0, 20, 21])
    if rng.random() < 0.2:
        req.request_id = "r" * pick([1, 256, 257])
    if rng.random() < 0.2:
        req.session_id = "s" * pick([1, 256, 257, 10_000])
    data = req.SerializeToString()
    if rng.random() < 0.1:  # invalid UTF-8 in a string field
        marker = "MARK"
        req.text = marker
        data = req.SerializeToString().replace(marker.encode(), b"\xff\xfe\xc3\x28")
    if rng.random() < 0.05:  # truncated
        data = data[: rng.randrange(len(data) + 1)]
    if rng.random() < 0.05:  # garbage
        data = rng.randbytes(rng.randrange(64))
    return data


def random_http_body(rng: random.Random) -> bytes:
    """An OpenAI-style body with random fields, wrong types, invalid JSON or invalid UTF-8."""
    if rng.random() < 0.3:  # a well-formed one, now and then
        return json.dumps(
            {"model": "fake", "prompt": random_text(rng, 30), "max_tokens": 4}
        ).encode()
    body: dict = {
        "model": rng.choice(["fake", "other", 7]),
        "max_tokens": rng.choice([-1, 1, 8, "x"]),
    }
    if rng.random() < 0.5:
        body["prompt"] = rng.choice(
            ["hi", "", [1, 2, 3], [[1], [2]], [], None, random_text(rng, 50)]
        )
    else:
        body["messages"] = rng.choice(
            [[], [{"role": "user", "content": "hi"}], [{"content": 1}], "x"]
        )
        if rng.random() < 0.5:
            body["messages"] = random_chat_body(rng)["messages"]
    for name, values in (
        ("temperature", [-1, 0, 100, 101, "hot"]), ("top_p", [0, 1, 2]), ("n", [0, 1, 17]),
        ("logprobs", [-1, 5, 21, True]), ("stop", ["x", [""], ["a"] * 65]), ("stream", [True, False]),
        ("seed", [-1, 2**70]),
        ("logit_bias", [{"1": 1}, {"x": 1}, {"-1": 1}, {"1": 101}, {"512": 1}, {"1": "x"}, ["1"]]),
        ("allowed_token_ids", [[], [1], [-1], [512], "x"]), ("bad_words", [[""], ["a"], ["a"] * 129]),
        ("response_format", [{"type": "json_object"}, {"type": "json_schema"}, {"type": 1}, "x", {}]),
        ("structured_outputs", [{"regex": "a+"}, {"choice": []}, {"json": "{"}, {"x": 1}, []]),
        ("guided_json", ["{", {"type": "object"}, 5]), ("guided_choice", [[], ["a"] * 1025, "a"]),
    ):  # fmt: skip
        if rng.random() < 0.3:
            body[name] = rng.choice(values)
    data = json.dumps(body).encode()
    if rng.random() < 0.1:
        data = data[: rng.randrange(len(data) + 1)]  # broken JSON
    if rng.random() < 0.1:
        data = data.replace(b"hi", b"\xff\xfe")  # invalid UTF-8
    return data


@pytest.fixture(scope="module")
def cluster(ray_session, model_cache_dir):
    settings = dict(
        model="fake", replicas=1, fake_step_ms=2, max_model_len=MAX_MODEL_LEN, max_num_seqs=32,
        max_queued_requests=64, http_port=free_port(),
    )  # fmt: skip
    with start_cluster(model_cache_dir, **settings) as running:
        # The fake model's tokenizer has no template: give it the tiny models' one.
        running.run(lambda: setattr(running.router.tokenizer, "chat_template", CHAT_TEMPLATE))
        yield running


def send_grpc(channel: grpc.Channel, data: bytes) -> grpc.StatusCode:
    call = channel.unary_stream(
        "/kvray.v1.Generation/Generate",
        request_serializer=lambda b: b,
        response_deserializer=pb.GenerateResponse.FromString,
    )
    try:
        for _ in call(data, timeout=10):
            pass
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def send_http(base: str, path: str, data: bytes) -> int:
    request = urllib.request.Request(
        base + path, data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def fuzz(
    cluster,
    num_requests: int,
    seed: int = 0,
    *,
    grpc_request: Callable[[random.Random], bytes] = random_request,
    http_body: Callable[[random.Random], bytes] = random_http_body,
    http_paths: tuple[str, ...] = ("/completions", "/chat/completions"),
) -> None:
    rng = random.Random(seed)
    process = psutil.Process()
    with KvrayClient(cluster.target) as client:
        client.generate("warm up", max_tokens=4)
    grpc_bodies = [grpc_request(rng) for _ in range(num_requests * 3 // 4)]
    http_bodies = [http_body(rng) for _ in range(num_requests - len(grpc_bodies))]
    rss_before = process.memory_info().rss  # the server's growth (the bodies are made)
    base = cluster.http_url
    with grpc.insecure_channel(cluster.target) as channel, ThreadPoolExecutor(8) as pool:
        grpc_codes = list(pool.map(lambda d: send_grpc(channel, d), grpc_bodies))
        http_codes = list(
            pool.map(lambda d: send_http(base, rng.choice(http_paths), d), http_bodies)
        )
    unexpected = {c for c in grpc_codes if c not in GRPC_OK} | {
        c for c in http_codes if c not in HTTP_OK
    }
    assert not unexpected, unexpected
    assert grpc.StatusCode.INVALID_ARGUMENT in grpc_codes and grpc.StatusCode.OK in grpc_codes
    assert 400 in http_codes and 200 in http_codes
    with KvrayClient(cluster.target) as client:
        assert client.is_serving()
        wait_for(lambda: sum(r.kv_blocks_used for r in client.status().replicas) == 0, timeout=60)
        assert client.status().num_running == 0
        assert client.generate("still fine", max_tokens=4).finish_reason == "length"
        chat = [{"role": "user", "content": "still fine"}]
        assert client.generate(chat, max_tokens=4).finish_reason == "length"
    grown = (process.memory_info().rss - rss_before) / 2**20
    print(
        f"{num_requests} requests; grpc {_counts(grpc_codes)}; http {_counts(http_codes)}; RSS {grown:+.0f} MiB"
    )
    assert grown < 100


def _counts(codes: list) -> dict:
    out: dict = {}
    for c in codes:
        key = c.name if isinstance(c, grpc.StatusCode) else c
        out[key] = out.get(key, 0) + 1
    return out


def test_fuzzed_requests_get_only_documented_statuses(cluster):
    fuzz(cluster, 400)


def test_fuzzed_conversations_get_only_documented_statuses(cluster):
    fuzz(
        cluster,
        200,
        seed=2,
        grpc_request=random_chat_request,
        http_body=lambda rng: json.dumps(random_chat_body(rng)).encode(),
        http_paths=("/chat/completions",),
    )


def random_headers(rng: random.Random) -> dict[str, str]:
    """0-150 extra headers (the bound is 100), together from a few bytes to ~1 MiB (the bound is
    64 KiB); names and values of header-legal characters."""
    sizes = rng.choice([8, 256, 4096, 40_000, 70_000, 1 << 20])
    count = rng.choice([0, 1, 10, 99, 101, 150])
    names = "abcdefghijklmnopqrstuvwxyz0123456789-"
    return {
        f"x-{''.join(rng.choice(names) for _ in range(rng.randint(1, 32)))}-{i}": "v"
        * max(1, sizes // max(1, count))
        for i in range(count)
    }


def send_http_with_headers(base: str, headers: dict[str, str]) -> int | str:
    """A valid completion with `headers`; "reset" when the server closed before answering (a
    refusal that arrives while the client is still sending its headers)."""
    body = json.dumps({"model": "fake", "prompt": "hi", "max_tokens": 2}).encode()
    request = urllib.request.Request(
        base + "/completions", data=body, headers={"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        assert isinstance(reason, ConnectionError | TimeoutError) or "reset" in str(reason), err
        return "reset"


def test_fuzzed_headers_and_metadata_get_only_documented_statuses(cluster):
    """Header counts and sizes at and past the bounds (HTTP: 64 KiB, 100 headers; gRPC: 16 KiB
    of metadata): 200, or 431 / RESOURCE_EXHAUSTED, or a connection the server closed."""
    rng = random.Random(3)
    headers = [random_headers(rng) for _ in range(60)]
    with ThreadPoolExecutor(8) as pool:
        http_codes = list(pool.map(lambda h: send_http_with_headers(cluster.http_url, h), headers))
    within = [
        code
        for h, code in zip(headers, http_codes)
        if len(h) <= 90 and sum(len(k) + len(v) for k, v in h.items()) < 60_000
    ]
    assert set(http_codes) <= {200, 431, "reset"}, _counts(http_codes)
    assert within and set(within) == {200}, _counts(within)
    assert 431 in http_codes or "reset" in http_codes
    request = pb.GenerateRequest(text="hi")
    request.stopping.max_tokens = 2
    codes = []
    with grpc.insecure_channel(cluster.target) as channel:
        for size in (0, 100, 8_000, 15_000, 17_000, 64_000, 1 << 20):
            metadata = (("x-fuzz", "v" * size),) if size else ()
            call = channel.unary_stream("/kvray.v1.Generation/Generate")
            try:
                for _ in call(request.SerializeToString(), metadata=metadata, timeout=30):
                    pass
                codes.append((size, grpc.StatusCode.OK))
            except grpc.RpcError as err:
                codes.append((size, err.code()))
    assert all(code in GRPC_OK for _, code in codes), codes
    assert all(code is grpc.StatusCode.OK for size, code in codes if size <= 15_000), codes
    assert all(code is not grpc.StatusCode.OK for size, code in codes if size > 16 * 1024), codes
    with KvrayClient(cluster.target) as client:
        assert client.generate("still fine", max_tokens=4).finish_reason == "length"


@pytest.mark.slow
def test_five_thousand_fuzzed_requests(cluster):
    fuzz(cluster, 5000, seed=1)
