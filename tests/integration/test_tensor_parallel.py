"""Replicas split over two ranks (tensor_parallel_size 2, gloo, fp32 on CPU): HF's greedy tokens
and log-probabilities offline (one process a rank) and over gRPC (Ray actors in a placement
group, greedy, seeded, beam and n requests at once); each rank reports its share of the weights
and of every KV block; a rank killed mid-stream fails its replica, which is replaced, and every
stream finishes as it would have; what two ranks cannot run is refused at start, by name."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from kvray import LLM, SamplingParams
from kvray.client import KvrayClient
from tests.integration.conftest import (
    check_a_killed_rank_fails_its_replica,
    start_cluster,
)

PROMPT_LENS = (5, 23, 40)  # the longest past the Mistral model's window
NEW = 24
NEAR_TIE = 1e-3  # a reference step whose top two log-probabilities are closer may go either way
GREEDY = dict(temperature=0, max_tokens=NEW, ignore_eos=True, logprobs=0)
SEEDED = dict(temperature=0.9, seed=3, max_tokens=NEW, ignore_eos=True)
SAMPLES = dict(n=2, temperature=0.8, seed=5, max_tokens=NEW, ignore_eos=True)
BEAMS = dict(num_beams=2, n=2, max_tokens=12)
TWO_RANKS = dict(tensor_parallel_size=2, dtype="float32", max_model_len=256)


def build_model(folder: Any, config: Any) -> str:
    """A random tiny model of `config` with the built-in tokenizer, saved in HF format."""
    from transformers import AutoModelForCausalLM

    from kvray.workers.tiny_model import make_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return str(folder)


def mistral_config(**changes: Any) -> Any:
    """One key/value head (replicated on both ranks), a window shorter than the longest prompt."""
    import transformers

    shape = dict(
        vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=2048,
        sliding_window=16, initializer_range=0.2, eos_token_id=None,
    )  # fmt: skip
    return transformers.MistralConfig(**{**shape, **changes})


@pytest.fixture(scope="module")
def models(tmp_path_factory, model_cache_dir) -> dict[str, str]:
    from kvray.workers.checkpoints import resolve_model

    root = tmp_path_factory.mktemp("tp-models")
    return {
        "llama": resolve_model("tiny", cache_dir=model_cache_dir),
        "mistral": build_model(root / "mistral", mistral_config()),
    }


def prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 512, (n,), generator=g).tolist() for n in PROMPT_LENS]


def hf_reference(path: str, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    """HF's greedy tokens and each step's log-probabilities (one full forward a token)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(NEW):
            row = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
            logprobs.append(row)
            ids.append(int(row.argmax()))
    return ids[len(prompt) :], logprobs


def assert_follows_hf(token_ids: list[int], logprobs: list[Any], ref: tuple) -> None:
    """HF's tokens up to its first near-tie, each token's log-probability within 1e-4."""
    ref_tokens, ref_logprobs = ref
    compared = 0
    for j, (token, row) in enumerate(zip(ref_tokens, ref_logprobs)):
        top2 = row.topk(2).values
        if top2[0] - top2[1] < NEAR_TIE:
            break
        assert token_ids[j] == token, f"step {j}:\n kvray: {token_ids}\n    hf: {ref_tokens}"
        assert logprobs[j].logprob == pytest.approx(float(row[token]), abs=1e-4)
        compared += 1
    assert compared >= NEW // 2, f"near-tie at step {compared}: the test checks too little"


def one_rank_info(path: str, cache_dir: str) -> Any:
    llm = LLM(path, dtype="float32", max_model_len=256, cache_dir=cache_dir)
    return llm.worker.warmup()


# ----------------------------------------------------------------------------- offline


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_two_ranks_offline_generate_hf_greedy_tokens_and_logprobs(arch, models, model_cache_dir):
    path, batch = models[arch], prompts(len(arch))
    llm = LLM(path, cache_dir=model_cache_dir, **TWO_RANKS)
    try:
        outputs = llm.generate(batch, SamplingParams(**GREEDY))
        info = llm.worker.warmup()
    finally:
        llm.close()
    for prompt, out in zip(batch, outputs):
        assert_follows_hf(out.token_ids, out.choices[0].logprobs, hf_reference(path, prompt))
    alone = one_rank_info(path, model_cache_dir)
    assert info.implementation == "kvray LlamaForCausalLM"
    assert (info.tensor_parallel_size, [r.rank for r in info.ranks]) == (2, [0, 1])
    assert alone.ranks[0].weights_bytes == alone.weights_bytes
    assert info.num_kv_blocks == alone.num_kv_blocks
    shares = 2 if arch == "llama" else 1  # Llama's two KV heads: one a rank; Mistral's one: both
    for rank in info.ranks:  # the split layers halve; norms and a lone KV head stay whole
        assert alone.weights_bytes / 2 <= rank.weights_bytes < alone.weights_bytes * 0.6
        assert rank.kv_cache_bytes * shares == alone.kv_cache_bytes


def test_a_model_two_ranks_cannot_split_is_refused_before_any_rank_starts(
    tmp_path, model_cache_dir
):
    odd = build_model(tmp_path / "odd", mistral_config(num_attention_heads=3, hidden_size=48))
    with pytest.raises(ValueError, match=r"num_attention_heads \(3\) is not divisible by "):
        LLM(odd, cache_dir=model_cache_dir, **TWO_RANKS)
    with pytest.raises(ValueError, match="model_type 'gpt2' runs on transformers' modules"):
        LLM("tiny-gpt2", cache_dir=model_cache_dir, **TWO_RANKS)


# ----------------------------------------------------------------------------- over gRPC


@pytest.fixture(scope="module")
def cluster(ray_session, models, model_cache_dir):
    """The Mistral model (one KV head) on one replica of two ranks, half a Ray CPU each."""
    with start_cluster(
        model_cache_dir, model=models["mistral"], cpus_per_replica=0.5, **TWO_RANKS
    ) as cluster:
        yield cluster


def run_mixed(client: KvrayClient, batch: list[list[int]]) -> list[Any]:
    """Greedy requests for `batch`, a seeded one, n samples and a beam search, all at once."""
    with ThreadPoolExecutor(len(batch) + 3) as pool:
        futures = [pool.submit(client.generate, p, **GREEDY) for p in batch]
        futures.append(pool.submit(client.generate, batch[0], request_id="seeded", **SEEDED))
        futures.append(pool.submit(client.generate, batch[1], **SAMPLES))
        futures.append(pool.submit(client.generate, batch[2], **BEAMS))
        return [f.result(timeout=300) for f in futures]


def tokens(completion: Any) -> list[list[int]]:
    return [choice.token_ids for choice in completion.choices]


@pytest.mark.ray
def test_two_ranks_over_grpc_serve_mixed_requests_as_one_rank_does(
    cluster, models, model_cache_dir
):
    path, batch = models["mistral"], prompts(7)
    with KvrayClient(cluster.target) as client:
        results = run_mixed(client, batch)
    for prompt, out in zip(batch, results):
        assert_follows_hf(out.token_ids, out.choices[0].logprobs, hf_reference(path, prompt))
    one = LLM(path, dtype="float32", max_model_len=256, cache_dir=model_cache_dir)
    expected = [
        one.generate(batch[0], SamplingParams(**SEEDED))[0],
        one.generate(batch[1], SamplingParams(**SAMPLES))[0],
        one.generate(batch[2], SamplingParams(**BEAMS))[0],
    ]
    assert [tokens(r) for r in results[len(batch) :]] == [tokens(e) for e in expected]


@pytest.mark.ray
def test_model_info_and_status_show_each_rank(cluster, models, model_cache_dir):
    alone = one_rank_info(models["mistral"], model_cache_dir)
    with KvrayClient(cluster.target) as client:
        info, status = client.model_info(), client.status()
    assert (info.implementation, info.tensor_parallel_size) == ("kvray LlamaForCausalLM", 2)
    assert [r.rank for r in info.ranks] == [0, 1]
    for rank in info.ranks:
        assert alone.weights_bytes / 2 <= rank.weights_bytes < alone.weights_bytes * 0.6
        assert rank.kv_cache_bytes > 0 and rank.device == "cpu"
    assert [[r.rank for r in replica.ranks] for replica in status.replicas] == [[0, 1]]


@pytest.mark.ray
def test_a_rank_killed_mid_stream_fails_its_replica_and_every_stream_finishes(cluster, ray_session):
    # NOTE: rank 1, not rank 0: rank 0 is left waiting in a collective
    batch = prompts(11)
    check_a_killed_rank_fails_its_replica(
        cluster,
        ray_session,
        rank=1,
        run=lambda client: [tokens(r) for r in run_mixed(client, batch)],
    )


@pytest.mark.ray
def test_an_architecture_two_ranks_cannot_split_fails_the_start_by_name(
    ray_session, model_cache_dir
):
    with (
        pytest.raises(Exception, match="tensor_parallel_size 2 needs one of kvray's own models"),
        start_cluster(model_cache_dir, model="tiny-gpt2", cpus_per_replica=0.5, **TWO_RANKS),
    ):
        pass


@pytest.mark.ray
def test_a_group_bigger_than_the_local_ray_cluster_is_refused_at_start(
    ray_session, model_cache_dir
):
    with (
        pytest.raises(ValueError, match=r"ranks of \{'CPU': 3.0\} each need \{'CPU': 6.0\}"),
        start_cluster(model_cache_dir, cpus_per_replica=3, **TWO_RANKS),
    ):
        pass
