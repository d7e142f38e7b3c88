"""Resuming a broken stream (GenerateRequest.resume): the engine recomputes what the client
had and streams only what follows, text included, with no gap and no repeat."""

from __future__ import annotations

import pytest

from kvray.cluster.input_processor import Resumed
from kvray.workers.config import SchedulerConfig
from kvray.workers.fake import FakeWorker
from kvray.workers.protocol import SamplingParams
from tests.helpers import EngineWithInput, drive, text_of, tokens_of

PARAMS = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, n=1)


def engine(tokenizer):
    worker = FakeWorker(vocab_size=len(tokenizer))
    return EngineWithInput(worker.warmup(), SchedulerConfig(), tokenizer=tokenizer), worker


@pytest.mark.parametrize("cut", [1, 7, 23, 39])
def test_a_resumed_sample_continues_where_the_client_stopped(tiny_tokenizer, cut):
    whole, worker = engine(tiny_tokenizer)
    whole.add_request("The quick brown fox", PARAMS)
    chunks = drive(whole, worker)[("req-0", 0)]
    received = chunks[:cut]  # the stream broke after these

    again, worker = engine(tiny_tokenizer)
    resume = {0: Resumed(tuple(tokens_of(received)), len(text_of(received)), finished=False)}
    again.add(again.processor.process("The quick brown fox", PARAMS, "r", resume=resume))
    rest = drive(again, worker)[("r", 0)]
    assert tokens_of(received) + tokens_of(rest) == tokens_of(chunks)  # no gap, no repeat
    assert text_of(received) + text_of(rest) == text_of(chunks)
    assert rest[-1].finish_reason is chunks[-1].finish_reason
    assert rest[-1].num_output_tokens == 40  # usage counts the whole sample


def test_a_finished_sample_sends_nothing_more(tiny_tokenizer):
    params = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, n=2, seed=3)
    again, worker = engine(tiny_tokenizer)
    resume = {1: Resumed((5, 6, 7, 8, 9, 10), 4, finished=True)}
    again.add(again.processor.process([4, 5, 6], params, "r", resume=resume))
    out = drive(again, worker)
    assert set(out) == {("r", 0)}
    assert len(tokens_of(out[("r", 0)])) == 6


@pytest.mark.parametrize(
    ("resume", "message"),
    [
        ({3: Resumed((), 0, False)}, r"index must be in \[0, n=1\)"),
        ({0: Resumed((99999,), 0, False)}, "token ids must be in"),
        ({0: Resumed(tuple(range(40)), 0, False)}, "it is finished"),
        ({0: Resumed((), -1, False)}, "num_text_chars must be >= 0"),
        ({0: Resumed(tuple(range(41)), 0, False)}, "more tokens than max_tokens"),
        ({0: Resumed(tuple(range(40)), 0, True)}, "every sample is finished"),
    ],
)
def test_a_resume_that_cannot_be_is_refused(tiny_tokenizer, resume, message):
    again, _ = engine(tiny_tokenizer)
    with pytest.raises(ValueError, match=message) as err:
        again.processor.process([4, 5, 6], PARAMS, "r", resume=resume)
    assert err.value.param == "resume"


def test_many_resumed_tokens_are_replayed_off_the_event_loop(tiny_tokenizer, monkeypatch):
    import asyncio
    import threading

    again, _ = engine(tiny_tokenizer)
    processor, threads = again.processor, []
    process = processor._process  # what process_async runs, inline or on the input pool
    monkeypatch.setattr(
        processor,
        "_process",
        lambda *a, **k: threads.append(threading.get_ident()) or process(*a, **k),
    )
    params = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
    few = {0: Resumed(tuple(range(4, 14)), 0, False)}
    many = {0: Resumed(tuple(range(4, 504)), 0, False)}

    async def run() -> None:
        await processor.process_async([4, 5, 6], params, "few", resume=few)
        await processor.process_async([4, 5, 6], params, "many", resume=many)

    asyncio.run(run())
    assert threads[0] == threading.get_ident()  # a short resume: inline
    assert threads[1] != threading.get_ident()  # 500 tokens: the input thread
