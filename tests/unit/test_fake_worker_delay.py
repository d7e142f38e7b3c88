"""The fake worker's step time: `step_delay_s` per step plus `token_delay_s` per token computed,
read from the sleeps it asks for (no wall clock), so prefix-cache hits cost nothing."""

from __future__ import annotations

import pytest

from kvray.cluster.config import load
from kvray.cluster.worker_actor import worker_factory
from kvray.workers.config import SchedulerConfig
from kvray.workers.fake import FakeWorker
from kvray.workers.protocol import SamplingParams
from tests.helpers import EngineWithInput

STEP_S, TOKEN_S = 0.02, 0.001
PROMPT = list(range(1, 42))  # 10 full blocks of 4 tokens, then the last token


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """Every sleep the fake worker asks for, instead of sleeping."""
    asked: list[float] = []
    monkeypatch.setattr("kvray.workers.fake.time.sleep", asked.append)
    return asked


def first_step_sleep(engine: EngineWithInput, worker: FakeWorker, sleeps: list[float]) -> float:
    """Run the engine dry; the sleep of the step that admitted the last request."""
    num_steps = len(worker.steps)
    while engine.has_unfinished():
        engine.process(worker.step(engine.schedule()))
    admitted = next(i for i, s in enumerate(worker.steps) if i >= num_steps and s.new_seqs)
    return sleeps[admitted]


def test_a_step_sleeps_its_delay_plus_one_token_delay_per_computed_token(sleeps):
    worker = FakeWorker(block_size=4, step_delay_s=STEP_S, token_delay_s=TOKEN_S)
    engine = EngineWithInput(worker.warmup(), SchedulerConfig())
    engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert first_step_sleep(engine, worker, sleeps) == pytest.approx(STEP_S + 41 * TOKEN_S)
    assert sleeps[1:] == pytest.approx([STEP_S + TOKEN_S] * 2)  # decodes: one token each
    assert len(sleeps) == len(worker.steps) == 3


def test_prompt_tokens_served_from_the_prefix_cache_cost_no_token_delay(sleeps):
    worker = FakeWorker(block_size=4, step_delay_s=STEP_S, token_delay_s=TOKEN_S)
    engine = EngineWithInput(worker.warmup(), SchedulerConfig())
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    engine.add_request(PROMPT, params)
    first_step_sleep(engine, worker, sleeps)
    engine.add_request([*PROMPT[:40], 99, 98, 97], params)  # 40 tokens cached, 3 computed
    assert engine.block_manager.num_prefix_hits == 0
    assert first_step_sleep(engine, worker, sleeps) == pytest.approx(STEP_S + 3 * TOKEN_S)
    assert engine.block_manager.num_prefix_hits == 40


def test_fake_token_ms_reaches_the_fake_worker():
    config = load({"model": "fake", "fake_step_ms": 20, "fake_token_ms": 0.1}, environ={})
    factory = worker_factory(config)
    assert factory.keywords == {"step_delay_s": 0.02, "token_delay_s": 0.0001}


def test_fake_token_ms_is_not_negative():
    with pytest.raises(ValueError, match="fake_token_ms"):
        load({"model": "fake", "fake_token_ms": -1}, environ={})
