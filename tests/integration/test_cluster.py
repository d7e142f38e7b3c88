"""The serving cluster end to end: two Ray worker actors, the router, gRPC over loopback (tiny
model; a fake-model cluster with slow steps where a request must outlast the test's next move:
placement, cancellation, a full queue, a deadline)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kvray.client import (
    DeadlineExceededError,
    InvalidRequestError,
    KvrayClient,
    OverloadedError,
)
from tests.helpers import free_port, hf_greedy
from tests.integration.conftest import start_cluster, wait_for

pytestmark = pytest.mark.ray

PROMPT_LENS = [1, 9, 33, 120, 200]


@pytest.fixture(scope="module")
def cluster(ray_session, model_cache_dir):
    with start_cluster(
        model_cache_dir,
        replicas=2,
        max_num_seqs=4,
        max_queued_requests=6,
        http_port=free_port(),
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(cluster):
    with KvrayClient(cluster.target, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def slow(ray_session, model_cache_dir):
    """A client of a fake-model cluster: two replicas of one running sequence each, a queue of
    two, and steps of at least 100 ms, so a request of N tokens takes at least N/10 s on any
    machine."""
    settings = dict(
        model="fake", replicas=2, fake_step_ms=100, max_num_seqs=1, max_queued_requests=2,
        max_model_len=2048,
    )  # fmt: skip
    with (
        start_cluster(model_cache_dir, **settings) as running,
        KvrayClient(running.target, max_retries=0) as c,
    ):
        yield c


def long_stream(client, prompt="Hello"):
    """A running stream of 1,000 tokens (100 s at the least): it ends when the test closes it."""
    stream = client.stream(prompt, temperature=0, max_tokens=1000, ignore_eos=True)
    next(stream)
    return stream


@pytest.fixture(scope="module")
def hf_model(tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def test_health_reports_serving(client):
    assert client.is_serving()


def test_concurrent_greedy_matches_hf(client, hf_model):
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 500, (n,), generator=g).tolist() for n in PROMPT_LENS]
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [
            pool.submit(client.generate, p, temperature=0, max_tokens=32, ignore_eos=True)
            for p in prompts
        ]
        results = [f.result(timeout=120) for f in futures]
    for p, r in zip(prompts, results):
        ref = hf_greedy(hf_model, p, 32)
        assert r.token_ids == ref, f"{len(p)} tokens:\n kvray: {r.token_ids}\n    hf: {ref}"
        assert r.finish_reason == "length"


def test_a_request_goes_to_the_replica_with_less_work(slow):
    before = {r.replica_id: r.num_finished_requests for r in slow.status().replicas}
    stream = long_stream(slow)
    (busy,) = [r.replica_id for r in slow.status().replicas if r.num_running]
    assert slow.generate("Hello", max_tokens=3).finish_reason == "length"
    after = {r.replica_id: r.num_finished_requests for r in slow.status().replicas}
    stream.close()
    assert [rid for rid in after if after[rid] > before[rid]] == [
        rid for rid in after if rid != busy
    ]


def test_seeded_streams_reproduce_across_runs(client):
    params = [
        {"temperature": 0.7, "seed": 1, "max_tokens": 24},
        {"temperature": 1.2, "top_k": 20, "seed": 2, "max_tokens": 24},
        {"temperature": 0.9, "top_p": 0.8, "seed": 3, "max_tokens": 24, "repetition_penalty": 1.3},
        {"temperature": 1.0, "min_p": 0.1, "seed": 4, "max_tokens": 24, "presence_penalty": 0.5},
    ]

    def run_all():
        with ThreadPoolExecutor(len(params)) as pool:
            futures = [pool.submit(client.generate, "Once upon a time", **p) for p in params]
            return [f.result(timeout=120).token_ids for f in futures]

    first, second = run_all(), run_all()
    assert first == second
    assert len({tuple(t) for t in first}) == len(params)  # different params, different draws


def test_stream_text_deltas_join_to_full_decode(client, tiny_tokenizer):
    prompt = "日本語のテキスト 🚀 Café"
    chunks = list(client.stream(prompt, temperature=0.9, seed=5, max_tokens=40, ignore_eos=True))
    ids = [t for c in chunks for t in c.token_ids]
    assert "".join(c.text for c in chunks) == tiny_tokenizer.decode(ids)
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 40


def test_stop_string_is_cut_and_never_streamed(client):
    full = client.generate("The quick brown fox", temperature=0, max_tokens=30, ignore_eos=True)
    stop = full.text[10:14]
    chunks = list(
        client.stream(
            "The quick brown fox", temperature=0, max_tokens=30, stop=[stop], ignore_eos=True
        )
    )
    text = "".join(c.text for c in chunks)
    assert text == full.text[: full.text.index(stop)]
    assert chunks[-1].finish_reason == "stop" and chunks[-1].stop_reason == stop


def test_n_samples_stream_with_their_index(client):
    result = client.generate("Hello", n=3, temperature=1.0, seed=9, max_tokens=8, ignore_eos=True)
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in result.choices)


def test_cancel_mid_stream_frees_blocks(slow):
    stream = long_stream(slow)
    for _ in range(2):
        next(stream)
    assert sum(r.kv_blocks_used for r in slow.status().replicas) > 0
    stream.close()  # cancels the RPC
    wait_for(lambda: sum(r.kv_blocks_used for r in slow.status().replicas) == 0)
    wait_for(lambda: slow.status().num_running == 0)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 2, "temperature": 0.0}, "n > 1"),
        ({"logprobs": 50}, "logprobs"),
        ({"logit_bias": {5: 100.5}}, "logit_bias"),
        ({"logit_bias": {512: 1.0}}, "logit_bias"),  # past the tiny model's vocabulary
        ({"allowed_token_ids": [3, 600]}, "allowed_token_ids"),
        ({"bad_words": ["ok", ""]}, "bad_words"),
    ],
)
def test_bad_params_are_invalid_argument_naming_the_field(client, params, field):
    with pytest.raises(InvalidRequestError) as err:
        client.generate("Hello", **params)
    assert field in str(err.value)


def test_logit_bias_plus_100_forces_and_minus_100_bans_over_grpc(client):
    greedy = {"temperature": 0, "max_tokens": 16, "ignore_eos": True}
    plain = client.generate("Hello", **greedy).token_ids
    (forced,) = client.tokenize(" am")
    assert forced not in plain
    assert client.generate("Hello", **greedy, logit_bias={forced: 100}).token_ids == [forced] * 16
    banned = client.generate("Hello", **greedy, logit_bias=dict.fromkeys(plain, -100)).token_ids
    assert not set(banned) & set(plain)
    sampled = {"temperature": 1.0, "seed": 4, "max_tokens": 16, "ignore_eos": True}
    assert set(client.generate("Hello", **sampled, logit_bias={forced: 100}).token_ids) == {forced}


def test_bad_prompts_are_invalid_argument(client):
    with pytest.raises(InvalidRequestError, match="prompt token ids must be integers"):
        client.generate([1, 2, 10**6])
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        client.generate([1] * 400)
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        client.generate("")


def test_a_full_queue_is_resource_exhausted_and_fails_fast(slow):
    # Both replicas' one slot taken by a stream that cannot end on its own, two requests queued
    # behind them (max_queued_requests=2): the next one is refused at once.
    streams = [long_stream(slow) for _ in range(2)]
    assert slow.status().num_running == 2
    with ThreadPoolExecutor(2) as pool:
        queued = [pool.submit(slow.generate, "Hello", max_tokens=3) for _ in range(2)]
        wait_for(lambda: sum(r.num_waiting for r in slow.status().replicas) == 2)
        with pytest.raises(OverloadedError, match=r"max_queued_requests=2"):
            slow.generate("Hello", max_tokens=3)
        for stream in streams:
            stream.close()
        done = [f.result(timeout=60) for f in queued]
    assert [(r.finish_reason, len(r.token_ids)) for r in done] == [("length", 3)] * 2
    assert slow.generate("Hello", max_tokens=4).finish_reason == "length"


def test_deadline_is_deadline_exceeded_and_request_is_aborted(slow):
    # 100 tokens take 10 s at the least: the 3 s deadline comes first on any machine.
    stream = slow.stream("Hello", temperature=0, max_tokens=100, ignore_eos=True, timeout=3.0)
    first = next(stream)  # admitted and running: it holds KV blocks
    with pytest.raises(DeadlineExceededError):
        for _ in stream:
            pass
    assert first.token_ids and first.finish_reason is None
    wait_for(lambda: slow.status().num_running == 0)
    wait_for(lambda: sum(r.kv_blocks_used for r in slow.status().replicas) == 0)
    assert slow.generate("Hello", max_tokens=4).choices


def test_a_prompt_plus_max_tokens_past_the_context_is_invalid_argument(client):
    prompt = list(range(10, 50))  # 40 tokens of the 256-token context
    with pytest.raises(InvalidRequestError, match="max_tokens") as err:
        client.generate(prompt, max_tokens=217)
    assert "at most 216" in str(err.value)
    assert len(client.generate(prompt, max_tokens=216, ignore_eos=True).token_ids) == 216


def test_tokenize_and_model_info(client, tiny_tokenizer):
    assert client.tokenize("Hello, world!") == tiny_tokenizer("Hello, world!")["input_ids"]
    info = client.model_info()
    assert info.model == "tiny" and info.max_model_len == 256 and info.has_tokenizer
    assert info.vocab_size == len(tiny_tokenizer)
    # fp32 on CPU: not quantized, decode steps eager (no paged kernel to replay around)
    assert info.dtype == "torch.float32" and info.quantization == ""
    assert info.decode_graph_batch_sizes == []


def test_a_chat_prompt_is_rendered_with_the_models_template(client, tiny_tokenizer):
    messages = [{"role": "user", "content": "Hello there"}]
    result = client.generate(messages, temperature=0, max_tokens=6, ignore_eos=True)
    rendered = tiny_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    as_text = client.generate(
        tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"],
        temperature=0, max_tokens=6, ignore_eos=True,
    )  # fmt: skip
    assert result.token_ids == as_text.token_ids
    assert result.prompt_tokens == len(
        tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    )
    assert client.model_info().has_chat_template


def test_a_repeated_prompt_reports_its_cached_tokens(client):
    prompt = list(range(10, 10 + 70))  # 4 full blocks of 16, plus a partial one
    session = {"session_id": "cached-tokens", "temperature": 0, "max_tokens": 2}
    first = client.generate(prompt, **session)
    again = client.generate(prompt, **session)  # the same replica (session), its cache warm
    assert again.prompt_tokens == first.prompt_tokens == 70
    assert again.cached_tokens == 64 and again.cached_tokens > first.cached_tokens


def test_beam_searches_through_grpc_return_the_offline_beams(cluster, client, model_cache_dir):
    from kvray import LLM, SamplingParams

    g = torch.Generator().manual_seed(12)
    prompts = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (5, 40, 90, 150)]
    params = dict(num_beams=4, n=2, max_tokens=16, length_penalty=0.6, min_tokens=3)
    with ThreadPoolExecutor(len(prompts)) as pool:
        served = list(pool.map(lambda p: client.generate(p, **params), prompts))
    offline = LLM("tiny", cache_dir=model_cache_dir, max_model_len=256).generate(
        prompts, SamplingParams(**params)
    )
    for got, want in zip(served, offline):
        assert [c.token_ids for c in got.choices] == [o.token_ids for o in want.choices]
        assert [c.text for c in got.choices] == [o.text for o in want.choices]
        assert [c.finish_reason for c in got.choices] == [o.finish_reason for o in want.choices]
        for c, o in zip(got.choices, want.choices):
            assert c.cumulative_logprob == pytest.approx(o.cumulative_logprob, abs=1e-4)


def test_prompt_logprobs_and_best_of_through_grpc(client):
    prompt = [3, 14, 15, 92, 65, 35]
    out = client.generate(prompt, max_tokens=4, n=2, best_of=3, seed=2, prompt_logprobs=2)
    assert out.prompt_logprobs[0] is None  # the first prompt token has no context
    assert [lp.token_id for lp in out.prompt_logprobs[1:]] == prompt[1:]
    assert all(len(lp.top_token_ids) == 2 for lp in out.prompt_logprobs[1:])
    scores = [c.cumulative_logprob for c in out.choices]
    assert len(scores) == 2 and scores[0] >= scores[1]


def test_best_of_and_beam_search_over_the_openai_api(cluster, client):
    openai = pytest.importorskip("openai")
    http = openai.OpenAI(base_url=cluster.http_url, api_key="unused", max_retries=0)
    prompt = [3, 14, 15, 92, 65, 35]
    beams = http.completions.create(
        model="tiny", prompt=prompt, max_tokens=8, n=2, extra_body={"use_beam_search": True}
    )
    served = client.generate(prompt, max_tokens=8, n=2, num_beams=2)
    assert [c.text for c in beams.choices] == [c.text for c in served.choices]
    best = http.completions.create(model="tiny", prompt=prompt, max_tokens=8, n=1, best_of=3)
    assert len(best.choices) == 1 and best.usage.completion_tokens == 8
    with pytest.raises(openai.BadRequestError, match="temperature"):
        http.completions.create(
            model="tiny", prompt=prompt, n=2, temperature=0.5, extra_body={"use_beam_search": True}
        )
    with pytest.raises(openai.BadRequestError, match="use_beam_search needs n or best_of > 1"):
        http.completions.create(model="tiny", prompt=prompt, extra_body={"use_beam_search": True})


def test_each_chat_turn_over_http_is_served_from_its_historys_prefix_cache(cluster, client):
    """A conversation's next turn, sent through the OpenAI API and rendered with the chat
    template, reaches the placement rule with its prompt blocks and takes its history's blocks
    from the prefix cache (which replica wins when they differ in load is
    tests/unit/test_prefix_routing.py's)."""
    import openai

    api = openai.OpenAI(base_url=cluster.http_url, api_key="unused", max_retries=0)
    before = client.status().replicas
    for conversation in range(4):
        messages = [{"role": "system", "content": f"Assistant {conversation}."}]
        previous_prompt = 0
        for turn in range(3):
            messages.append({"role": "user", "content": f"Q{turn}?"})
            reply = api.chat.completions.create(
                model="tiny", messages=messages, max_tokens=6, temperature=0,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            # The last turn's prompt starts this one's: its full blocks are served from the
            # cache (the answer, re-tokenized from text, may not match the generated ids).
            cached = reply.usage.prompt_tokens_details.cached_tokens
            assert cached >= previous_prompt // 16 * 16, (conversation, turn, cached)
            previous_prompt = reply.usage.prompt_tokens
            messages.append({"role": "assistant", "content": reply.choices[0].message.content})
    after = client.status().replicas
    hits = sum(a.num_prefix_hits - b.num_prefix_hits for a, b in zip(after, before))
    assert hits > 0
