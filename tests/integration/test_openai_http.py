"""The OpenAI-compatible HTTP API with the official `openai` client, sync and async, against
a local cluster (tiny model; a fake-model cluster with slow steps where a request must outlast
the test's next move): the same tokens as gRPC, the parameters, every error status, and a
dropped stream freeing its KV blocks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from kvray.client import KvrayClient, MessageTooLargeError
from kvray.cluster.http_server import build_app
from kvray.cluster.input_processor import MAX_REQUEST_BYTES
from kvray.cluster.security import TokenAuth
from tests.helpers import free_port
from tests.integration.conftest import start_cluster, wait_for

pytestmark = pytest.mark.ray

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Hello there"}]
GREEDY = {"temperature": 0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}
GREEDY_EXTRA = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def cluster(ray_session, model_cache_dir):
    with start_cluster(model_cache_dir, replicas=1, http_port=free_port()) as running:
        yield running


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.http_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def grpc(cluster):
    with KvrayClient(cluster.target) as c:
        yield c


def kv_blocks_used(grpc) -> int:
    return sum(r.kv_blocks_used for r in grpc.status().replicas)


def test_models_lists_the_served_model(client):
    (model,) = client.models.list().data
    assert model.id == "tiny" and model.owned_by == "kvray"


def test_a_model_is_retrieved_by_its_name(client):
    (listed,) = client.models.list().data
    assert client.models.retrieve("tiny") == listed


def test_retrieving_another_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4")
    assert err.value.body["code"] == "model_not_found"
    assert err.value.body["param"] == "model" and "gpt-4" in err.value.body["message"]


def http_error(cluster, method: str, path: str) -> tuple[int, dict, str | None]:
    """The status, JSON body and Allow header of a request that fails."""
    url = cluster.http_url.removesuffix("/v1") + path
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(url, method=method))
    return err.value.code, json.load(err.value), err.value.headers.get("allow")


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/embeddings", 404),
        ("GET", "/nowhere", 404),
        ("GET", "/v1/chat/completions", 405),
        ("DELETE", "/v1/models", 405),
    ],
)
def test_unknown_paths_and_wrong_methods_get_openai_errors(cluster, method, path, status):
    got, body, allow = http_error(cluster, method, path)
    assert got == status
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == status and path in body["error"]["message"]
    assert (allow is not None) == (status == 405)


def test_with_tokens_on_unknown_paths_and_models_need_a_token_first(tmp_path):
    (tmp_path / "tokens").write_text("secret\n")
    router = SimpleNamespace(config=SimpleNamespace(model_name="org/tiny"), info=None)
    http = TestClient(build_app(router, auth=TokenAuth(tmp_path / "tokens")))
    token = {"authorization": "Bearer secret"}
    for method, path, status in [
        ("GET", "/v1/models/org/tiny", 200), ("GET", "/v1/models/gpt-4", 404),
        ("GET", "/v1/nowhere", 404), ("PUT", "/v1/completions", 405),
    ]:  # fmt: skip
        refused = http.request(method, path)
        assert refused.status_code == 401, (path, refused.json())
        assert refused.json()["error"]["type"] == "authentication_error"
        assert http.request(method, path, headers=token).status_code == status, path
    assert http.get("/v1/models/org/tiny", headers=token).json()["id"] == "org/tiny"


def test_completion_is_token_for_token_the_grpc_answer(client, grpc):
    want = grpc.generate(PROMPT, temperature=0, max_tokens=12, ignore_eos=True)
    got = client.completions.create(model="tiny", prompt=PROMPT, **GREEDY)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, 12)


def test_chat_is_token_for_token_the_grpc_answer(client, grpc):
    want = grpc.generate(MESSAGES, temperature=0, max_tokens=12, ignore_eos=True)
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, **GREEDY)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == want.prompt_tokens


def test_logit_bias_plus_100_forces_a_token_as_over_grpc(client, grpc):
    (forced,) = grpc.tokenize(" am")
    want = grpc.generate(
        PROMPT, temperature=0, max_tokens=12, ignore_eos=True, logit_bias={forced: 100}
    )
    assert want.token_ids == [forced] * 12
    got = client.completions.create(
        model="tiny", prompt=PROMPT, logit_bias={str(forced): 100}, **GREEDY
    )
    assert got.choices[0].text == want.text == " am" * 12


def test_logit_bias_minus_100_bans_tokens_in_chat_as_over_grpc(client, grpc):
    greedy = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}
    plain = grpc.generate(MESSAGES, **greedy).token_ids
    want = grpc.generate(MESSAGES, **greedy, logit_bias=dict.fromkeys(plain, -100))
    assert not set(want.token_ids) & set(plain)
    bias = {str(t): -100 for t in plain}
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, logit_bias=bias, **GREEDY)
    assert got.choices[0].message.content == want.text


def test_allowed_token_ids_and_bad_words_are_vllms_extras(client, grpc):
    greedy = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}
    (the,) = grpc.tokenize("The")
    allowed = grpc.tokenize(" am The")  # " am", " ", "The"
    assert the in grpc.generate(PROMPT, **greedy, allowed_token_ids=allowed).token_ids
    want = grpc.generate(PROMPT, **greedy, allowed_token_ids=allowed, bad_words=["The"])
    assert the not in want.token_ids and set(want.token_ids) <= set(allowed)
    extras = {"allowed_token_ids": allowed, "bad_words": ["The"], "ignore_eos": True}
    got = client.completions.create(
        model="tiny", prompt=PROMPT, temperature=0, max_tokens=12, extra_body=extras
    )
    assert got.choices[0].text == want.text


def test_streamed_text_joins_into_the_whole_answer(client):
    whole = client.completions.create(model="tiny", prompt=PROMPT, **GREEDY).choices[0].text
    events = list(
        client.completions.create(
            model="tiny",
            prompt=PROMPT,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert "".join(e.choices[0].text for e in events if e.choices) == whole
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "length"
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == 12
    assert all(e.usage is None for e in events[:-1])


def test_streamed_chat_says_who_speaks_once_and_reports_usage(client):
    events = list(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, stream=True, stream_options={"include_usage": True},
            n=2, temperature=0.8, seed=7, max_tokens=6, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    deltas = [e.choices[0] for e in events if e.choices]
    assert sorted(d.index for d in deltas if d.delta.role == "assistant") == [0, 1]
    assert sorted(d.index for d in deltas if d.finish_reason == "length") == [0, 1]
    assert events[-1].usage.completion_tokens == 12  # 2 samples x 6 tokens


CONTINUOUS = {"include_usage": True, "continuous_usage_stats": True}


def assert_running_usage(events, num_tokens, *, n: int, max_tokens: int) -> None:
    """Every chunk but the last (the whole usage) carries its choice's usage so far;
    `num_tokens(choice)` counts the tokens a chunk brings."""
    whole = events[-1].usage
    assert events[-1].choices == [] and whole.completion_tokens == n * max_tokens
    sent: dict[int, int] = {}
    for e in events[:-1]:
        (choice,) = e.choices
        sent[choice.index] = sent.get(choice.index, 0) + num_tokens(choice)
        assert e.usage.prompt_tokens == whole.prompt_tokens
        assert e.usage.completion_tokens == sent[choice.index], (choice.index, e.usage)
        assert e.usage.total_tokens == whole.prompt_tokens + sent[choice.index]
    assert sent == dict.fromkeys(range(n), max_tokens)


def test_continuous_usage_counts_the_tokens_of_every_completion_chunk(client):
    events = list(
        client.completions.create(
            model="tiny", prompt=PROMPT, stream=True, stream_options=CONTINUOUS, logprobs=0,
            n=2, temperature=0.8, seed=3, max_tokens=7, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert_running_usage(events, lambda c: len(c.logprobs.tokens), n=2, max_tokens=7)


def test_continuous_usage_counts_the_tokens_of_every_chat_chunk(client):
    events = list(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, stream=True, stream_options=CONTINUOUS,
            logprobs=True, n=2, temperature=0.8, seed=7, max_tokens=6,
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert_running_usage(events, lambda c: len(c.logprobs.content), n=2, max_tokens=6)


def test_async_client_streams_and_completes(cluster):
    async def run():
        client = openai.AsyncOpenAI(base_url=cluster.http_url, api_key="unused", max_retries=0)
        whole = await client.chat.completions.create(model="tiny", messages=MESSAGES, **GREEDY)
        stream = await client.chat.completions.create(
            model="tiny", messages=MESSAGES, stream=True, **GREEDY
        )
        text = "".join([e.choices[0].delta.content or "" async for e in stream])
        await client.close()
        return whole.choices[0].message.content, text

    whole, streamed = asyncio.run(run())
    assert whole == streamed and whole


def test_a_developer_message_is_a_system_message(client):
    def chat(role):
        messages = [{"role": role, "content": "Answer in French."}, *MESSAGES]
        return client.chat.completions.create(
            model="tiny", messages=messages, logprobs=True, **GREEDY
        )

    developer, system = chat("developer"), chat("system")
    assert developer.usage.prompt_tokens == system.usage.prompt_tokens
    assert developer.choices[0].message.content == system.choices[0].message.content
    logprobs = [[t.logprob for t in r.choices[0].logprobs.content] for r in (developer, system)]
    # NOTE: the same prompt; not to the last bit: the second request's prefill reuses the
    # first's cached blocks, so it multiplies other shapes (7e-7 apart on an AMX Xeon)
    assert logprobs[0] == pytest.approx(logprobs[1], rel=1e-5, abs=1e-5)


def test_response_format_text_is_no_constraint(client):
    free = client.chat.completions.create(model="tiny", messages=MESSAGES, **GREEDY)
    for text in ({"type": "text"}, None):
        extra_body = {"response_format": text, "ignore_eos": True}  # None: sent as null
        got = client.chat.completions.create(
            model="tiny", messages=MESSAGES, **{**GREEDY, "extra_body": extra_body}
        )
        assert got.choices[0].message.content == free.choices[0].message.content


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "structural_tag"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"uniqueItems": True}}},
    ],
)
def test_a_response_format_kvray_cannot_enforce_is_refused_by_name(client, response_format):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, response_format=response_format
        )
    assert err.value.body["param"] == "response_format"


def test_n_seed_stop_and_logprobs(client):
    params = dict(model="tiny", prompt=PROMPT, n=3, temperature=1.0, seed=11, max_tokens=8)
    first = client.completions.create(**params, logprobs=2)
    again = client.completions.create(**params)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded
    assert len({c.text for c in first.choices}) > 1  # each sample has its own seed
    lp = first.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 8
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    stop = first.choices[0].text[3:6]
    stopped = client.completions.create(model="tiny", prompt=PROMPT, temperature=1.0, seed=11,
                                        max_tokens=8, stop=[stop])  # fmt: skip
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == first.choices[0].text[: first.choices[0].text.index(stop)]


def test_chat_logprobs_give_top_alternatives(client):
    got = client.chat.completions.create(
        model="tiny", messages=MESSAGES, logprobs=True, top_logprobs=3, **GREEDY
    )
    content = got.choices[0].logprobs.content
    assert len(content) == 12
    assert all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    assert "".join(t.token for t in content) == got.choices[0].message.content


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"temperature": 500}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 2, "temperature": 0}, "n"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"logit_bias": {"five": 1.0}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"512": 1.0}}, "logit_bias"),  # past the tiny model's vocabulary
        ({"extra_body": {"allowed_token_ids": []}}, "allowed_token_ids"),
        ({"extra_body": {"bad_words": [""]}}, "bad_words"),
    ],
)
def test_bad_parameters_get_400_naming_them(client, params, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**{"model": "tiny", "prompt": PROMPT, **params})
    assert err.value.body["param"] == param, err.value.body
    assert err.value.body["type"] == "invalid_request_error"


def test_chat_parameter_names_are_the_callers(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=0)
    assert err.value.body["param"] == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, logprobs=True, top_logprobs=99
        )
    assert err.value.body["param"] == "top_logprobs"


def test_a_prompt_plus_max_tokens_past_the_context_is_400_not_a_shortened_answer(client, grpc):
    max_model_len = grpc.model_info().max_model_len  # 256
    num_prompt = len(grpc.tokenize(PROMPT))
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=max_model_len)
    assert err.value.body["param"] == "max_tokens"
    assert f"at most {max_model_len - num_prompt}" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_completion_tokens=max_model_len
        )
    assert err.value.body["param"] == "max_completion_tokens"
    fits = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=max_model_len - num_prompt, **GREEDY_EXTRA
    )
    assert fits.usage.completion_tokens == max_model_len - num_prompt
    assert fits.choices[0].finish_reason == "length"


def test_an_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt=PROMPT)
    assert err.value.body["param"] == "model"


def scrape(cluster) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on /metrics, parsed by prometheus_client's own parser."""
    url = cluster.http_url.removesuffix("/v1") + "/metrics"
    with urllib.request.urlopen(url) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted({"model_name": "tiny", **labels}.items())))]


def test_metric_counters_equal_what_was_sent(cluster, client, grpc):
    before = scrape(cluster)
    greedy = grpc.generate(PROMPT, temperature=0, max_tokens=6, ignore_eos=True)
    stop_id = greedy.token_ids[2]
    results = [
        client.completions.create(model="tiny", prompt=PROMPT, **GREEDY),
        client.chat.completions.create(model="tiny", messages=MESSAGES, n=2, temperature=0.9,
                                       max_tokens=5, extra_body={"ignore_eos": True}),
        client.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=6,
                                  extra_body={"stop_token_ids": [stop_id]}),
    ]  # fmt: skip
    after = scrape(cluster)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    prompt_tokens = greedy.prompt_tokens + sum(r.usage.prompt_tokens for r in results)
    generated = len(greedy.token_ids) + sum(r.usage.completion_tokens for r in results)
    assert delta("vllm:prompt_tokens_total") == prompt_tokens
    assert delta("vllm:generation_tokens_total") == generated == 6 + 12 + 10 + 3
    assert delta("vllm:request_success_total", finished_reason="length") == 4  # 1 + 1 + 2
    assert delta("vllm:request_success_total", finished_reason="stop") == 1
    assert delta("vllm:time_to_first_token_seconds_count") == 4  # one per request
    assert delta("vllm:e2e_request_latency_seconds_count") == 5  # one per sample
    assert delta("vllm:inter_token_latency_seconds_count") == generated - 5
    assert delta("vllm:request_queue_time_seconds_count") == 5


def test_responses_are_not_held_back_by_nagle(cluster):
    # A body written after its headers would otherwise wait ~40 ms for a delayed ACK on every
    # request of a kept-alive connection (asyncio only sets TCP_NODELAY on TCP-typed sockets).
    sock = cluster.cluster.http.socket
    assert sock.proto == socket.IPPROTO_TCP
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_health_says_ok(cluster):
    url = cluster.http_url.removesuffix("/v1") + "/health"
    with urllib.request.urlopen(url) as resp:
        assert resp.status == 200 and json.load(resp) == {"status": "ok"}


def _post_raw(cluster, head: bytes, body_chunks: list[bytes]) -> tuple[int, dict]:
    """POST /v1/completions over a bare socket; returns the status and the JSON body."""
    host, port = cluster.http_url.removeprefix("http://").removesuffix("/v1").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
        with contextlib.suppress(OSError):  # the server may answer and close before the rest
            for chunk in body_chunks:
                sock.sendall(chunk)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    status = int(reply.split(b" ", 2)[1])
    return status, json.loads(reply.split(b"\r\n\r\n", 1)[1])


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_is_413_and_the_server_goes_on(cluster, client, chunked):
    text = json.dumps({"model": "tiny", "prompt": "a" * MAX_REQUEST_BYTES}).encode()
    if chunked:  # no Content-Length to trust: the server counts what arrives
        head = b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        parts = [text[i : i + 65536] for i in range(0, len(text), 65536)]
        chunks = [b"%x\r\n%s\r\n" % (len(part), part) for part in parts] + [b"0\r\n\r\n"]
    else:
        head = b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(text)
        chunks = [text]
    status, body = _post_raw(cluster, head, chunks)
    assert status == 413
    assert str(MAX_REQUEST_BYTES) in body["error"]["message"]
    reply = client.completions.create(model="tiny", prompt=PROMPT, **GREEDY)
    assert reply.usage.completion_tokens == 12


def test_a_grpc_message_over_the_limit_is_resource_exhausted(grpc):
    with pytest.raises(MessageTooLargeError, match="larger than max"):
        grpc.generate("a" * MAX_REQUEST_BYTES, max_tokens=1)
    assert len(grpc.generate(PROMPT, temperature=0, max_tokens=3, ignore_eos=True).token_ids) == 3


# ------------------------------------------- a fake model with slow steps: error statuses, aborts


@pytest.fixture(scope="module")
def slow(ray_session, model_cache_dir):
    """A fake-model cluster with steps of at least 300 ms (a request of N tokens takes at least
    0.3 N s on any machine), one running sequence and a queue of two."""
    settings = dict(
        model="fake", replicas=1, http_port=free_port(), fake_step_ms=300, max_num_seqs=1,
        max_queued_requests=2, max_model_len=2048,
    )  # fmt: skip
    with start_cluster(model_cache_dir, **settings) as running:
        yield running, openai.OpenAI(base_url=running.http_url, api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def slow_grpc(slow):
    cluster, _ = slow
    with KvrayClient(cluster.target, max_retries=0) as c:
        yield c


def long_stream(client):
    """A running stream of 1,000 tokens (300 s at the least): it ends when the test closes it."""
    stream = client.completions.create(model="fake", prompt=PROMPT, stream=True, max_tokens=1000)
    next(iter(stream))  # a token came: it runs, and holds the one running slot
    return stream


def num_waiting(status) -> int:
    """Sequences queued on replicas plus requests waiting for one (what max_queued_requests caps)."""
    return sum(r.num_waiting for r in status.replicas) + status.queue_depth


@contextlib.contextmanager
def slot_held_and_two_queued(client, grpc, *, max_tokens: int):
    """The slow cluster's one running slot held by a stream that cannot end during the test,
    and two requests queued behind it (max_queued_requests=2): yields their futures. The
    stream is closed on the way out, and the queued requests have run once the block ends."""
    stream = long_stream(client)
    with ThreadPoolExecutor(2) as pool:
        try:
            queued = [
                pool.submit(
                    client.completions.create, model="fake", prompt=PROMPT, max_tokens=max_tokens
                )
                for _ in range(2)
            ]
            wait_for(lambda: num_waiting(grpc.status()) == 2)
            yield queued
        finally:
            stream.close()


def test_a_dropped_stream_frees_its_kv_blocks(slow, slow_grpc):
    _, client = slow
    stream = long_stream(client)
    assert kv_blocks_used(slow_grpc) > 0
    stream.close()  # the client goes away mid-stream
    wait_for(lambda: kv_blocks_used(slow_grpc) == 0 and slow_grpc.status().num_running == 0)


def test_an_aborted_stream_is_counted_as_abort(slow, slow_grpc):
    cluster, client = slow
    before = scrape(cluster)
    long_stream(client).close()
    wait_for(lambda: kv_blocks_used(slow_grpc) == 0 and slow_grpc.status().num_running == 0)
    after = scrape(cluster)

    def delta(reason):
        name, labels = "vllm:request_success_total", dict(model_name="fake", finished_reason=reason)
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert (delta("abort"), delta("length")) == (1, 0)


def test_metric_gauges_equal_the_cluster_status(slow, slow_grpc):
    cluster, client = slow
    snapshot: list = []

    def read_consistent() -> bool:  # the status did not change while /metrics was read
        snapshot[:] = [slow_grpc.status(), scrape(cluster)]
        return snapshot[0] == slow_grpc.status()

    with slot_held_and_two_queued(client, slow_grpc, max_tokens=4) as queued:
        wait_for(read_consistent)
    assert [f.result(timeout=60).usage.completion_tokens for f in queued] == [4, 4]
    status, samples = snapshot

    def gauge(name, **labels):
        return samples[(name, tuple(sorted({"model_name": "fake", **labels}.items())))]

    (replica,) = status.replicas
    assert gauge("vllm:num_requests_running") == status.num_running == 1
    assert gauge("vllm:num_requests_waiting") == num_waiting(status) == 2
    kv = replica.kv_blocks_used / replica.kv_blocks_total
    assert gauge("vllm:kv_cache_usage_perc") == pytest.approx(kv) and kv > 0
    assert gauge("kvray:replicas", state="READY") == 1
    assert gauge("kvray:target_replicas") == status.target_replicas == 1
    running = gauge("kvray:replica_num_requests_running", replica_id=replica.replica_id)
    assert running == replica.num_running


def test_a_request_past_its_deadline_is_504(slow):
    _, client = slow
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(
            model="fake", prompt=PROMPT, max_tokens=50, extra_headers={"X-Request-Timeout": "0.1"}
        )
    assert err.value.status_code == 504 and err.value.body["type"] == "timeout_error"


def test_a_full_queue_is_429(slow, slow_grpc):
    _, client = slow
    with (
        slot_held_and_two_queued(client, slow_grpc, max_tokens=3) as queued,
        pytest.raises(openai.RateLimitError) as err,  # not queued: no wait
    ):
        client.with_options(timeout=30).completions.create(
            model="fake", prompt=PROMPT, max_tokens=3
        )
    done = [f.result(timeout=60) for f in queued]
    assert "max_queued_requests=2" in err.value.body["message"]
    assert [(r.choices[0].finish_reason, r.usage.completion_tokens) for r in done] == [
        ("length", 3)
    ] * 2


def test_no_ready_replica_is_503_and_health_says_so(slow):
    cluster, client = slow
    (replica,) = cluster.run(lambda: cluster.router.pool.ready())
    cluster.call(cluster.router.pool.drain(replica, 0.0))  # the last replica goes away
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model="fake", prompt=PROMPT, max_tokens=3)
    assert err.value.status_code == 503
    health = cluster.http_url.removesuffix("/v1") + "/health"
    with pytest.raises(urllib.error.HTTPError) as err_health:
        urllib.request.urlopen(health)
    assert err_health.value.code == 503
