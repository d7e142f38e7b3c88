"""Beam search equal to Hugging Face's token for token (Llama, Qwen2 and GPT-2 tiny models, fp32
CPU), in a mixed batch and under a KV pool small enough to preempt beams; the KV blocks beams
and samples share; prompt logprobs equal to one HF forward; best_of."""

from __future__ import annotations

import itertools

import pytest
import torch

from kvray import LLM, SamplingParams
from tests.conftest import ARCH_NAMES
from tests.helpers import hf_beam_search, hf_greedy

CONFIGS = list(itertools.product([2, 4], ["1", "k"], [1.0, 0.6], [False, True]))
PROMPT_LENS = [1, 17, 60, 130, 200]
MAX_NEW, MIN_NEW = 12, 2


def beam_case(model, prompt, k, m, length_penalty, early_stopping):
    """(kvray params, HF's beams) for one prompt. Two tokens of the prompt's greedy continuation
    are stop ids, so that beams end early and the finishing rules are exercised."""
    model.generation_config.eos_token_id = None
    greedy = hf_greedy(model, prompt, 6)
    stop = [greedy[2], greedy[4]]
    num_return = 1 if m == "1" else k
    params = SamplingParams(
        num_beams=k,
        n=num_return,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        max_tokens=MAX_NEW,
        min_tokens=MIN_NEW,
        stop_token_ids=stop,
    )
    ref = hf_beam_search(
        model,
        prompt,
        num_beams=k,
        num_return=num_return,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        max_new_tokens=MAX_NEW,
        stop_token_ids={model.config.eos_token_id, *stop},
        min_new_tokens=MIN_NEW,
    )
    return params, ref


@pytest.fixture(scope="module", params=ARCH_NAMES)
def case(request, model_cache_dir):
    """(arch, prompts, kvray params, HF's beams): every config, prompts of 1 to 200 tokens."""
    from transformers import AutoModelForCausalLM

    from kvray.workers.checkpoints import resolve_model

    path = resolve_model(request.param, cache_dir=model_cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(7)
    prompts, params, refs = [], [], []
    for i, config in enumerate(CONFIGS):
        n = PROMPT_LENS[i % len(PROMPT_LENS)]
        prompt = torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()
        p, ref = beam_case(model, prompt, *config)
        prompts.append(prompt)
        params.append(p)
        refs.append(ref)
    return request.param, model, prompts, params, refs


def assert_beams_equal(outputs, refs, params):
    ended = 0
    for out, ref, p in zip(outputs, refs, params):
        got = [o.token_ids for o in out.choices]
        assert got == ref, f"{p}:\n kvray: {got}\n    hf: {ref}"
        ended += sum(o.finish_reason == "stop" for o in out.choices)
        scores = [o.cumulative_logprob / len(o.token_ids) ** p.length_penalty for o in out.choices]
        assert scores == sorted(scores, reverse=True)
    assert ended > 0  # some beams ended on a stop id, not only on max_tokens


def test_beams_match_hf_in_a_batch_with_greedy_and_sampled_requests(case, model_cache_dir):
    arch, model, prompts, params, refs = case
    llm = LLM(arch, cache_dir=model_cache_dir, max_model_len=256)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    sampled = SamplingParams(n=2, seed=3, max_tokens=20, ignore_eos=True)
    outputs = llm.generate([*prompts, prompts[3], prompts[4]], [*params, greedy, sampled])
    assert_beams_equal(outputs[: len(prompts)], refs, params)
    model.generation_config.eos_token_id = None
    assert outputs[-2].token_ids == hf_greedy(model, prompts[3], 20)
    assert [len(o.token_ids) for o in outputs[-1].choices] == [20, 20]
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_beams_match_hf_when_a_small_kv_pool_preempts_them(case, model_cache_dir):
    arch, _, prompts, params, refs = case
    short = [i for i, p in enumerate(prompts) if len(p) <= 60]
    llm = LLM(arch, cache_dir=model_cache_dir, max_model_len=128, num_kv_blocks=24, block_size=8)
    outputs = llm.generate([prompts[i] for i in short], [params[i] for i in short])
    assert llm.engine.scheduler.num_preemptions > 0
    assert_beams_equal(outputs, [refs[i] for i in short], [params[i] for i in short])
    assert llm.engine.block_manager.num_free_blocks == 24


def peak_blocks_used(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[int, list]:
    """Run one request step by step; returns the most KV blocks in use at once, and its output."""
    manager = llm.engine.block_manager
    llm.add_request(prompt, params, request_id="peak")
    peak, chunks = 0, []
    while llm.engine.has_unfinished():
        chunks += llm.step()
        peak = max(peak, manager.num_blocks - manager.num_free_blocks)
    assert manager.num_free_blocks == manager.num_blocks  # every block back at the end
    return peak, chunks


def test_four_beams_hold_one_prompt_and_four_tails(model_cache_dir):
    llm = LLM("tiny", cache_dir=model_cache_dir, max_model_len=1024, enable_prefix_caching=False)
    prompt = torch.randint(0, 500, (512,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(num_beams=4, n=4, max_tokens=32, ignore_eos=True)
    peak, chunks = peak_blocks_used(llm, prompt, params)
    bs = llm.engine.block_manager.block_size
    prompt_blocks, tail_blocks = 512 // bs, -(-32 // bs) + 1
    print(f"\n4 beams over 512 tokens: peak {peak} blocks; one prompt {prompt_blocks}, 4 prompts "
          f"{4 * prompt_blocks}")  # fmt: skip
    assert peak <= prompt_blocks + 4 * tail_blocks < 4 * prompt_blocks
    assert sorted(c.index for c in chunks) == [0, 1, 2, 3]


def test_n_samples_compute_the_prompt_once_and_sample_as_alone(model_cache_dir):
    llm = LLM("tiny", cache_dir=model_cache_dir, max_model_len=1024, enable_prefix_caching=False)
    computed: list[int] = []
    step = llm.worker.step
    llm.worker.step = lambda s: (computed.append(s.num_tokens), step(s))[1]  # type: ignore[method-assign]
    prompt = torch.randint(0, 500, (512,), generator=torch.Generator().manual_seed(2)).tolist()
    params = SamplingParams(n=4, seed=9, max_tokens=8, ignore_eos=True)
    peak, chunks = peak_blocks_used(llm, prompt, params)
    # 511 prompt tokens once, the last one per sample, then 7 decodes per sample
    assert sum(computed) == 511 + 4 + 4 * 7
    assert peak <= 512 // 16 + 4 * 2
    llm.worker.step = step  # type: ignore[method-assign]
    for i in range(4):
        alone = llm.generate(prompt, SamplingParams(seed=9 + i, max_tokens=8, ignore_eos=True))
        assert [t for c in chunks if c.index == i for t in c.token_ids] == alone[0].token_ids


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_prompt_logprobs_equal_one_hf_forward(arch, model_cache_dir):
    from transformers import AutoModelForCausalLM

    from kvray.workers.checkpoints import resolve_model

    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(arch, cache_dir=model_cache_dir), dtype=torch.float32
    ).eval()
    llm = LLM(arch, cache_dir=model_cache_dir, max_model_len=256, prefill_chunk_size=32)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (1, 40, 130)]
    requests = [SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)] * 3
    requests[1] = SamplingParams(n=2, seed=1, max_tokens=2, prompt_logprobs=3)  # forked samples
    requests[2] = SamplingParams(num_beams=2, max_tokens=2, prompt_logprobs=3)
    # The same prompt again: a prefix-cache hit must not skip its logprobs.
    outputs = llm.generate([*prompts, prompts[2]], [*requests, requests[0]])
    for prompt, out in zip([*prompts, prompts[2]], outputs):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
        got = out.prompt_logprobs
        assert got is not None and len(got) == len(prompt) and got[0] is None
        for position, entry in enumerate(got[1:], start=1):
            row = ref[position - 1]
            assert entry.token_id == prompt[position]
            assert entry.logprob == pytest.approx(row[prompt[position]].item(), abs=1e-4)
            top = row.topk(3)
            assert entry.top_token_ids == top.indices.tolist()
            assert entry.top_logprobs == pytest.approx(top.values.tolist(), abs=1e-4)


def test_best_of_returns_the_samples_with_the_highest_cumulative_logprob(model_cache_dir):
    llm = LLM("tiny", cache_dir=model_cache_dir, max_model_len=256)
    prompt = [11, 12, 13, 14, 15]
    every = llm.generate(prompt, SamplingParams(n=4, seed=5, max_tokens=10, logprobs=0))[0]
    sums = {tuple(o.token_ids): sum(lp.logprob for lp in o.logprobs) for o in every.choices}
    best = llm.generate(prompt, SamplingParams(n=2, best_of=4, seed=5, max_tokens=10))[0]
    expected = sorted(sums, key=lambda t: -sums[t])[:2]
    assert [tuple(o.token_ids) for o in best.choices] == expected
    for o in best.choices:
        assert o.cumulative_logprob == pytest.approx(sums[tuple(o.token_ids)], abs=1e-4)
        assert o.logprobs == []  # not asked for


def test_beams_match_hf_when_more_candidates_end_than_there_are_beams(case, model_cache_dir):
    """Four of the six likeliest first tokens are stop ids: Hugging Face then keeps more than
    2 * num_beams candidates per step (one more per stop id), and so must kvray (with only
    2 * num_beams, some of these prompts end with other beams)."""
    arch, model, _, _, _ = case
    llm = LLM(arch, cache_dir=model_cache_dir, max_model_len=256)
    g = torch.Generator().manual_seed(3)
    for _ in range(12):
        prompt = torch.randint(0, model.config.vocab_size, (7,), generator=g).tolist()
        with torch.no_grad():
            top = model(torch.tensor([prompt])).logits[0, -1].topk(6).indices.tolist()
        stop = [top[0], top[3], top[4], top[5]]
        params = SamplingParams(num_beams=3, n=3, max_tokens=6, stop_token_ids=stop)
        ref = hf_beam_search(
            model,
            prompt,
            num_beams=3,
            num_return=3,
            length_penalty=1.0,
            early_stopping=False,
            max_new_tokens=6,
            stop_token_ids={model.config.eos_token_id, *stop},
        )
        assert [o.token_ids for o in llm.generate(prompt, params)[0].choices] == ref
