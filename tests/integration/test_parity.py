"""Greedy parity with Hugging Face `generate`, alone and under batching, staggered arrival,
preemption and chunked prefill, for the Llama, Qwen2 and GPT-2 tiny models (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

from kvray import LLM, SamplingParams
from tests.conftest import ARCH_NAMES
from tests.helpers import hf_greedy

PROMPT_LENS = [1, 9, 33, 120, 200]
MAX_NEW = 32
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.fixture(scope="module", params=ARCH_NAMES)
def case(request, model_cache_dir):
    """(arch, prompts, reference outputs from HF generate, one prompt at a time)."""
    from transformers import AutoModelForCausalLM

    from kvray.workers.checkpoints import resolve_model

    path = resolve_model(request.param, cache_dir=model_cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # the engine runs with ignore_eos
    g = torch.Generator().manual_seed(len(request.param))
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]
    refs = [hf_greedy(model, p, MAX_NEW) for p in prompts]
    return request.param, prompts, refs


def assert_same(outputs, refs, prompts):
    for p, out, ref in zip(prompts, outputs, refs):
        assert out == ref, f"prompt of {len(p)} tokens:\n kvray: {out}\n    hf: {ref}"


def make_llm(arch, cache_dir, **options):
    options.setdefault("max_model_len", 256)
    return LLM(arch, cache_dir=cache_dir, **options)


@pytest.fixture(scope="module")
def llm(case, model_cache_dir):
    """One default engine per architecture, shared by the tests that need no special options
    (each runs its requests to completion, so the next starts from an idle engine)."""
    return make_llm(case[0], model_cache_dir)


def test_batch_matches_hf_generate(case, llm):
    _, prompts, refs = case
    outputs = llm.generate(prompts, GREEDY)
    assert_same([o.token_ids for o in outputs], refs, prompts)
    assert all(o.finish_reason == "length" for o in outputs)


def test_each_prompt_alone_matches_hf_generate(case, llm):
    _, prompts, refs = case
    outputs = [llm.generate(p, GREEDY)[0].token_ids for p in prompts]
    assert_same(outputs, refs, prompts)


def test_staggered_arrivals_match(case, llm):
    """Requests join a running batch at different steps (continuous batching)."""
    _, prompts, refs = case
    tokens: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))[::-1]
    while pending or llm.engine.has_unfinished():
        if pending:
            i, p = pending.pop()
            llm.add_request(p, GREEDY, request_id=str(i))
        for _ in range(3):  # three steps between arrivals
            for chunk in llm.step():
                tokens.setdefault(chunk.request_id, []).extend(chunk.token_ids)
    assert_same([tokens[str(i)] for i in range(len(prompts))], refs, prompts)


def test_preemption_and_recompute_match(case, model_cache_dir):
    arch, prompts, refs = case
    # 62 blocks of 4 tokens hold 248 tokens; the batch needs ~520 at its peak.
    llm = make_llm(arch, model_cache_dir, num_kv_blocks=62, block_size=4, max_model_len=240)
    outputs = llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert_same([o.token_ids for o in outputs], refs, prompts)
    assert llm.engine.block_manager.num_free_blocks == 62


def test_chunked_prefill_matches(case, model_cache_dir):
    arch, prompts, refs = case
    llm = make_llm(arch, model_cache_dir, max_num_batched_tokens=64, prefill_chunk_size=24)
    outputs = llm.generate(prompts, GREEDY)
    assert_same([o.token_ids for o in outputs], refs, prompts)


def test_prefix_cache_hit_matches(case, llm):
    _, prompts, refs = case
    llm.generate(prompts[-1], GREEDY)
    hits = llm.engine.block_manager.num_prefix_hits
    again = llm.generate(prompts[-1], GREEDY)[0].token_ids
    assert llm.engine.block_manager.num_prefix_hits > hits  # this run reused cached blocks
    assert_same([again], refs[-1:], prompts[-1:])
