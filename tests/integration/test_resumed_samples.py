"""A sample resumed on another engine (what a router does with `GenerateRequest.resume`, after
the client's first router died) continues exactly where the client stopped, with the tiny model
in fp32: greedy and seeded, tokens and text. No kill needed: the resume is built from a cut of
an uninterrupted run (tests/e2e/test_routers.py kills a router, with the fake model)."""

from __future__ import annotations

import pytest

from kvray import LLM, SamplingParams
from kvray.cluster.input_processor import Resumed
from tests.helpers import text_of, tokens_of

PROMPT = "Once upon a time"
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, seed=3, max_tokens=40, ignore_eos=True)
# bad_words read the output so far: this one bans " ho" right after "ain", which this sample
# says at tokens 16 and 17 without it; resumed at 17, the ban must see the resumed "ain".
CONSTRAINED = SamplingParams(
    temperature=0.9, seed=3, max_tokens=40, ignore_eos=True, logit_bias={5: 4.0},
    bad_words=["ain ho"],
)  # fmt: skip


@pytest.fixture(scope="module")
def first(model_cache_dir):
    return LLM("tiny", cache_dir=model_cache_dir, max_model_len=256)


@pytest.fixture(scope="module")
def second(model_cache_dir):
    return LLM("tiny", cache_dir=model_cache_dir, max_model_len=256)


@pytest.mark.parametrize(
    "params", [GREEDY, SEEDED, CONSTRAINED], ids=["greedy", "seeded", "constrained"]
)
@pytest.mark.parametrize("cut", [1, 17, 39])
def test_a_resumed_sample_continues_exactly_on_another_engine(first, second, params, cut):
    chunks = list(first.stream(PROMPT, params))
    received = chunks[:cut]  # what the client had when its router went away
    resume = {0: Resumed(tuple(tokens_of(received)), len(text_of(received)), finished=False)}
    second.engine.add(second.processor.process(PROMPT, params, f"resumed-{cut}", resume=resume))
    rest = []
    while second.engine.has_unfinished():
        rest += second.step()
    assert tokens_of(received) + tokens_of(rest) == tokens_of(chunks)  # no gap, no repeat
    assert text_of(received) + text_of(rest) == text_of(chunks)
    assert rest[-1].finish_reason is chunks[-1].finish_reason
