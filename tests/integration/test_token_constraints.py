"""logit_bias, allowed_token_ids and bad_words through the offline API on the tiny model: each
changes the tokens as documented, and a constrained request is exact through a preemption."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from kvray import LLM, SamplingParams

PROMPT = "Hello"
GREEDY = {"temperature": 0, "max_tokens": 24, "ignore_eos": True}


@pytest.fixture(scope="module")
def llm(model_cache_dir):
    return LLM("tiny", cache_dir=model_cache_dir, max_model_len=256)


def generate(llm, **params) -> list[int]:
    return llm.generate(PROMPT, SamplingParams(**params))[0].token_ids


def pairs(token_ids: list[int]) -> set[tuple[int, int]]:
    return set(itertools.pairwise(token_ids))


def test_plus_100_forces_a_token_greedy_and_sampled(llm):
    forced = llm.tokenizer(" am", add_special_tokens=False)["input_ids"][0]
    assert forced not in generate(llm, **GREEDY)
    assert set(generate(llm, **GREEDY, logit_bias={forced: 100})) == {forced}
    sampled = generate(
        llm, temperature=1.0, max_tokens=24, ignore_eos=True, logit_bias={forced: 100}
    )
    assert set(sampled) == {forced}


def test_minus_100_bans_every_token_it_names(llm):
    unbiased = generate(llm, **GREEDY)
    banned = generate(llm, **GREEDY, logit_bias=dict.fromkeys(unbiased, -100))
    assert not set(banned) & set(unbiased)


def test_allowed_token_ids_are_the_only_tokens_sampled(llm):
    allowed = [5, 77, 300]
    out = generate(
        llm, temperature=1.0, seed=2, max_tokens=40, ignore_eos=True, allowed_token_ids=allowed
    )
    assert set(out) <= set(allowed) and len(set(out)) > 1


def test_a_bad_word_is_cut_only_where_its_beginning_was_generated(llm):
    word = llm.tokenizer(" thanOn", add_special_tokens=False)["input_ids"]
    assert len(word) == 2
    unbiased = generate(llm, **GREEDY)
    assert tuple(word) in pairs(unbiased), unbiased  # the tiny model says " thanOn"
    out = generate(llm, **GREEDY, bad_words=["thanOn"])
    assert tuple(word) not in pairs(out)
    first = unbiased.index(word[0])
    assert out[: first + 1] == unbiased[: first + 1]  # " than" itself is still said


def test_beams_never_take_a_banned_token(llm):
    beams = SamplingParams(num_beams=3, n=3, max_tokens=12, ignore_eos=True)
    used = {t for choice in llm.generate(PROMPT, beams)[0].choices for t in choice.token_ids}
    banned = llm.generate(PROMPT, replace(beams, logit_bias=dict.fromkeys(used, -100)))[0]
    assert all(not set(choice.token_ids) & used for choice in banned.choices)
    allowed = llm.generate(PROMPT, replace(beams, allowed_token_ids=(9, 10)))[0]
    assert all(set(choice.token_ids) <= {9, 10} for choice in allowed.choices)


def test_a_constrained_request_survives_preemption(model_cache_dir):
    roomy = LLM("tiny", cache_dir=model_cache_dir, max_model_len=128)
    am, spaced_am = (
        roomy.tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("am", " am")
    )
    constrained = SamplingParams(
        temperature=1.0, seed=7, max_tokens=40, ignore_eos=True,
        logit_bias={spaced_am[0]: 3.0, am[0]: -100}, bad_words=["thanOn", "Eacster"],
    )  # fmt: skip
    tight = LLM(
        "tiny", cache_dir=model_cache_dir, max_model_len=128, num_kv_blocks=12, block_size=16
    )
    prompts = ["Hello " * 20, "The quick brown fox " * 6, "Once upon a time " * 8]
    expected = [o.token_ids for o in roomy.generate(prompts, constrained)]
    got = [o.token_ids for o in tight.generate(prompts, constrained)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert got == expected
    plain = SamplingParams(temperature=1.0, seed=7, max_tokens=40, ignore_eos=True)
    assert [o.token_ids for o in roomy.generate(prompts, plain)] != expected
