"""The offline API: prompt forms, outputs, streaming, stop strings, n, seeds and clear errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from kvray import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(model_cache_dir):
    return LLM("tiny", cache_dir=model_cache_dir, max_model_len=256)


def test_outputs_come_back_in_prompt_order_without_the_prompt(llm):
    prompts = ["The quick brown fox", "Hello", "Once upon a time there was"]
    outputs = llm.generate(prompts, GREEDY)
    alone = [llm.generate(p, GREEDY)[0] for p in prompts]
    assert [o.token_ids for o in outputs] == [a.token_ids for a in alone]
    for prompt, out in zip(prompts, outputs):
        assert len(out.token_ids) == 24 and out.finish_reason == "length"
        assert out.text == llm.tokenizer.decode(out.token_ids)
        assert not out.text.startswith(prompt)


def test_text_and_token_id_prompts_agree(llm):
    ids = llm.tokenizer("Hello, world!")["input_ids"]
    by_text = llm.generate("Hello, world!", GREEDY)[0]
    by_ids = llm.generate(ids, GREEDY)[0]
    assert by_text.token_ids == by_ids.token_ids
    assert by_text.prompt_token_ids == ids


def test_one_params_per_prompt(llm):
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 7)]
    outputs = llm.generate(["a", "b"], params)
    assert [len(o.token_ids) for o in outputs] == [3, 7]
    with pytest.raises(ValueError, match="sampling_params has 2 entries for 3 prompts"):
        llm.generate(["a", "b", "c"], params)


def test_stream_deltas_join_to_the_final_text(llm):
    prompts = ["日本語のテキスト", "Café naïve"]
    params = SamplingParams(temperature=0.9, seed=3, max_tokens=30, ignore_eos=True)
    final = llm.generate(prompts, params)
    texts = {}
    tokens = {}
    for chunk in llm.stream(prompts, params):
        texts[chunk.request_id] = texts.get(chunk.request_id, "") + chunk.text
        tokens.setdefault(chunk.request_id, []).extend(chunk.token_ids)
    assert sorted(texts.values()) == sorted(o.text for o in final)
    assert sorted(map(tuple, tokens.values())) == sorted(tuple(o.token_ids) for o in final)


def test_stop_string_cuts_the_text_and_finishes_with_stop(llm):
    full = llm.generate("The quick brown fox", GREEDY)[0]
    stop = full.text[8:12]
    assert stop and stop not in full.text[:8]
    out = llm.generate(
        "The quick brown fox",
        SamplingParams(temperature=0, max_tokens=24, stop=[stop], ignore_eos=True),
    )[0]
    assert out.text == full.text[: full.text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_seeded_request_is_reproducible_across_batch_compositions(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=20, ignore_eos=True)
    alone = llm.generate("Hello", seeded)[0].token_ids
    others = SamplingParams(temperature=0.7, max_tokens=30, ignore_eos=True)
    batch = llm.generate(
        ["The quick", "Hello", "def f(x):"], [others, seeded, SamplingParams(temperature=0)]
    )
    assert batch[1].token_ids == alone
    unseeded = {tuple(llm.generate("Hello", others)[0].token_ids) for _ in range(3)}
    assert len(unseeded) > 1  # without a seed, draws differ


def test_seeded_request_survives_preemption(model_cache_dir):
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=40, ignore_eos=True)
    roomy = LLM("tiny", cache_dir=model_cache_dir, max_model_len=128)
    tight = LLM(
        "tiny", cache_dir=model_cache_dir, max_model_len=128, num_kv_blocks=12, block_size=16
    )
    prompts = ["Hello " * 20, "The quick brown fox " * 6, "Once upon a time " * 8]
    expected = [o.token_ids for o in roomy.generate(prompts, seeded)]
    got = [o.token_ids for o in tight.generate(prompts, seeded)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert got == expected


def test_n_samples_are_distinct_and_complete(llm):
    out = llm.generate(
        "Hello", SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=12, ignore_eos=True)
    )[0]
    assert [o.index for o in out.choices] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.choices}) == 3
    assert all(o.finish_reason == "length" for o in out.choices)


def test_logprobs_come_with_every_token(llm):
    out = llm.generate(
        "Hello", SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True)
    )[0]
    lps = out.choices[0].logprobs
    assert [lp.token_id for lp in lps] == out.token_ids
    for lp in lps:
        assert len(lp.top_token_ids) == 3
        assert lp.top_token_ids[0] == lp.token_id  # greedy picks the most likely token
        assert lp.logprob == pytest.approx(lp.top_logprobs[0])


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "prompts is empty"),
        ("", "prompt is empty"),
        ([1, 2, 100_000], "prompt token ids must be integers in [0, 512)"),
        ([1] * 300, "prompt has 300 tokens but the model's context (max_model_len) is 256"),
    ],
)
def test_bad_prompt_raises_and_queues_nothing(llm, prompt, message):
    with pytest.raises(ValueError) as err:
        llm.generate(["fine", prompt] if prompt else prompt, GREEDY)
    assert message in str(err.value)
    assert not llm.engine.has_unfinished()


def test_stopping_a_stream_early_frees_everything(llm):
    stream = llm.stream(
        ["Hello", "World"], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    )
    next(stream)
    stream.close()
    assert not llm.engine.has_unfinished()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_unknown_option_is_a_type_error(model_cache_dir):
    with pytest.raises(TypeError, match="unknown engine option"):
        LLM("tiny", cache_dir=model_cache_dir, max_batch=3)


def test_model_without_tokenizer_takes_token_ids(tmp_path, tiny_model_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(f"{tiny_model_path}/{name}", bare / name)
    llm = LLM(str(bare), max_model_len=128)
    out = llm.generate([1, 2, 3], GREEDY)[0]
    assert len(out.token_ids) == 24 and out.text == ""
    with pytest.raises(ValueError, match="no tokenizer: pass the prompt as token ids"):
        llm.generate("hello", GREEDY)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        llm.generate([1, 2], SamplingParams(stop=["x"]))


def test_chat_renders_the_template_and_a_model_without_one_says_so(llm, model_cache_dir):
    messages = [{"role": "user", "content": "Hello"}]
    answer = llm.chat(messages, GREEDY)
    rendered = llm.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert rendered.endswith("<|im_start|>assistant\n")
    ids = llm.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert answer.token_ids == llm.generate(ids, GREEDY)[0].token_ids
    gpt2 = LLM("tiny-gpt2", cache_dir=model_cache_dir, max_model_len=128)
    with pytest.raises(ValueError, match="this model has no chat template") as err:
        gpt2.chat(messages, GREEDY)
    assert err.value.param == "messages"
    assert not gpt2.engine.has_unfinished()


def test_a_bf16_checkpoint_runs_in_bf16_on_a_cpu_with_native_bf16(model_cache_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvray.workers.checkpoints import resolve_model
    from kvray.workers.device import cpu_has_native_bf16

    path = resolve_model("tiny", cache_dir=model_cache_dir)
    AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(path).save_pretrained(tmp_path)
    expected = "torch.bfloat16" if cpu_has_native_bf16() else "torch.float32"
    llm = LLM(str(tmp_path), max_model_len=128)
    assert llm.engine.info.dtype == expected
    assert LLM("tiny", cache_dir=model_cache_dir, max_model_len=128).engine.info.dtype == (
        "torch.float32"  # an fp32 checkpoint stays fp32
    )
    out = llm.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids) == 4


def test_unset_sampling_knobs_take_the_models_generation_config(tmp_path, tiny_model_path):
    import json

    path = tmp_path / "greedy-by-default"
    shutil.copytree(tiny_model_path, path)
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.0}))
    unset = SamplingParams(max_tokens=12, ignore_eos=True, seed=5)
    greedy = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0)

    llm = LLM(str(path), max_model_len=128)
    assert llm.engine.info.sampling_defaults == {"temperature": 0.0}
    expected = llm.generate("Hello", greedy)[0].token_ids
    assert llm.generate("Hello", unset)[0].token_ids == expected

    neutral = LLM(str(path), max_model_len=128, generation_config="none")
    assert neutral.engine.info.sampling_defaults == {}
    assert neutral.generate("Hello", unset)[0].token_ids != expected  # sampled at 1.0
