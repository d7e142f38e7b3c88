"""Scheduler and block manager against a fake worker: budgets, FCFS, chunking, preemption, finish rules."""

from __future__ import annotations

import pytest

from kvray.cluster.sequence import FinishReason
from kvray.workers.config import SchedulerConfig
from kvray.workers.fake import FakeWorker
from kvray.workers.protocol import SamplingParams
from tests.helpers import EngineWithInput, drive, tokens_of

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def make(num_kv_blocks=256, block_size=4, eos=(), max_model_len=512, **scheduler):
    worker = FakeWorker(
        num_kv_blocks=num_kv_blocks,
        block_size=block_size,
        eos_token_ids=eos,
        max_model_len=max_model_len,
    )
    engine = EngineWithInput(worker.warmup(), SchedulerConfig(**scheduler))
    return engine, worker


def expected_tokens(prompt: list[int], n: int, vocab: int = 1000) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(FakeWorker.next_token(ids, vocab))
    return ids[len(prompt) :]


PROMPTS = [[7] * 3, list(range(1, 40)), [5, 6], list(range(100, 170)), [9] * 17]


@pytest.mark.parametrize("pipelined", [False, True])
def test_outputs_follow_each_sequence_alone(pipelined):
    engine, worker = make()
    for p in PROMPTS:
        engine.add_request(p, GREEDY)
    out = drive(engine, worker, pipelined=pipelined)
    for i, p in enumerate(PROMPTS):
        assert tokens_of(out[(f"req-{i}", 0)]) == expected_tokens(p, 12)


def test_step_respects_token_budget_and_seq_cap():
    engine, worker = make(max_num_batched_tokens=32, max_num_seqs=3)
    for p in PROMPTS:
        engine.add_request(p, GREEDY)
    drive(engine, worker)
    assert max(s.num_tokens for s in worker.steps) <= 32
    assert max(len(s.seq_ids) for s in worker.steps) <= 3


def test_admission_is_first_come_first_served():
    engine, worker = make(max_num_seqs=1)
    for p in PROMPTS:
        engine.add_request(p, GREEDY)
    added = [r.seq_id for r in engine.scheduler.waiting]
    drive(engine, worker)
    admitted = [r.seq_id for s in worker.steps for r in s.new_seqs]
    assert admitted == added


def test_a_request_moved_from_another_replica_queues_in_arrival_order():
    engine, worker = make(max_num_seqs=1)
    other, _ = make()
    older = other.processor.process([4, 5, 6], GREEDY, "older")  # arrived first, queued elsewhere
    for i, p in enumerate(PROMPTS[:3]):
        engine.add_request(p, GREEDY, request_id=f"new{i}")
    engine.add(older)
    assert [r.request_id for r in engine.scheduler.waiting] == ["older", "new0", "new1", "new2"]
    chunks = drive(engine, worker)
    assert tokens_of(chunks[("older", 0)]) == expected_tokens([4, 5, 6], GREEDY.max_tokens)


def test_long_prompt_is_prefilled_in_chunks():
    engine, worker = make(max_num_batched_tokens=64, prefill_chunk_size=16)
    engine.add_request(list(range(1, 71)), GREEDY)
    out = drive(engine, worker)
    first = [s.num_scheduled_tokens[0] for s in worker.steps[:5]]
    assert first == [16, 16, 16, 16, 6]
    assert tokens_of(out[("req-0", 0)]) == expected_tokens(list(range(1, 71)), 12)


@pytest.mark.parametrize("pipelined", [False, True])
def test_preemption_recomputes_exactly(pipelined):
    # 24 blocks of 4 tokens: the five prompts and their outputs need far more at once.
    engine, worker = make(num_kv_blocks=24, max_model_len=96)
    for p in PROMPTS:
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    out = drive(engine, worker, pipelined=pipelined)
    assert engine.scheduler.num_preemptions > 0
    for i, p in enumerate(PROMPTS):
        assert tokens_of(out[(f"req-{i}", 0)]) == expected_tokens(p, 20)
    assert engine.block_manager.num_free_blocks == 24


@pytest.mark.parametrize("pipelined", [False, True])
def test_queued_token_count_follows_the_queue_through_preemption_and_abort(pipelined):
    engine, worker = make(num_kv_blocks=24, max_model_len=96)
    for p in PROMPTS:
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    sched = engine.scheduler
    steps = []

    def check(chunks):
        # A token can come back for a sequence preempted meanwhile (pipelined).
        assert sched.num_queued_tokens == sum(s.num_known_tokens for s in sched.waiting)
        steps.append(chunks)
        if len(steps) == 5:
            engine.abort("req-4")

    drive(engine, worker, pipelined=pipelined, on_step=check)
    assert sched.num_preemptions > 0
    assert sched.num_queued_tokens == 0


def test_max_tokens_finishes_with_length():
    engine, worker = make()
    engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=5))
    chunks = drive(engine, worker)[("req-0", 0)]
    assert len(tokens_of(chunks)) == 5
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_stop_token_id_finishes_with_stop_and_names_it():
    want = expected_tokens([1, 2, 3], 10)
    engine, worker = make()
    engine.add_request(
        [1, 2, 3], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[want[3]])
    )
    chunks = drive(engine, worker)[("req-0", 0)]
    assert tokens_of(chunks) == want[:4]
    assert chunks[-1].finish_reason is FinishReason.STOP
    assert chunks[-1].stop_reason == want[3]


def test_eos_stops_unless_ignored_or_below_min_tokens():
    want = expected_tokens([1, 2, 3], 10)
    eos = (want[2],)
    for params, n in [
        (SamplingParams(temperature=0, max_tokens=10), 3),
        (SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), 10),
        (SamplingParams(temperature=0, max_tokens=10, min_tokens=4), 10),
    ]:
        engine, worker = make(eos=eos)
        engine.add_request([1, 2, 3], params)
        chunks = drive(engine, worker)[("req-0", 0)]
        assert tokens_of(chunks) == want[:n], params


def test_context_length_finishes_with_length():
    engine, worker = make(max_model_len=10)
    engine.add_request([1, 2, 3, 4, 5, 6, 7], SamplingParams(temperature=0, max_tokens=None))
    chunks = drive(engine, worker)[("req-0", 0)]
    assert len(tokens_of(chunks)) == 3
    assert chunks[-1].finish_reason is FinishReason.LENGTH


def test_abort_frees_all_blocks_at_once():
    engine, worker = make(num_kv_blocks=64)
    engine.add_request(list(range(1, 30)), SamplingParams(temperature=0, max_tokens=100))
    engine.add_request([1, 2], SamplingParams(temperature=0, max_tokens=100))
    for _ in range(3):
        engine.process(worker.step(engine.schedule()))
    assert engine.block_manager.num_free_blocks < 64
    final = engine.abort("req-0") + engine.abort("req-1")
    assert [c.finish_reason for c in final] == [FinishReason.ABORT] * 2
    assert engine.block_manager.num_free_blocks == 64
    assert not engine.has_unfinished()
    step = engine.schedule()
    assert len(step.finished_seq_ids) == 2 and not step.seq_ids


def test_abort_of_waiting_request_never_reaches_worker():
    engine, worker = make(max_num_seqs=1)
    engine.add_request([1, 2, 3], GREEDY)
    engine.add_request([4, 5, 6], GREEDY)
    engine.process(worker.step(engine.schedule()))
    aborted = engine.scheduler.waiting[0].seq_id
    engine.abort("req-1")
    drive(engine, worker)
    assert all(r.seq_id != aborted for s in worker.steps for r in s.new_seqs)


def test_prefix_cache_reuses_blocks_and_keeps_outputs():
    prompt = list(range(1, 42))  # 10 full blocks of 4, plus one token
    engine, worker = make()
    engine.add_request(prompt, GREEDY)
    first = drive(engine, worker)[("req-0", 0)]
    engine.add_request(prompt, GREEDY)
    second = drive(engine, worker)[("req-1", 0)]
    assert tokens_of(second) == tokens_of(first)
    new = [r for s in worker.steps for r in s.new_seqs][-1]
    assert new.num_computed_tokens == 40  # only the last prompt token is computed again
    assert engine.block_manager.num_prefix_hits == 40
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_n_samples_share_a_request_and_all_finish():
    engine, worker = make()
    engine.add_request([1, 2, 3], SamplingParams(n=3, temperature=1.0, max_tokens=4, seed=5))
    out = drive(engine, worker)
    assert sorted(out) == [("req-0", 0), ("req-0", 1), ("req-0", 2)]
    assert all(chunks[-1].finish_reason is FinishReason.LENGTH for chunks in out.values())


class ScriptedWorker(FakeWorker):
    """Samples the given token ids, in order, whatever the sequence."""

    def __init__(self, token_ids: list[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.script = list(token_ids)

    def next_token(self, token_ids: list[int], vocab_size: int) -> int:  # type: ignore[override]
        return self.script.pop(0)


def test_text_decoded_only_at_the_end_still_meets_the_stop_strings(tiny_tokenizer):
    # A lone byte of a multi-byte character decodes to U+FFFD only when the sample ends.
    partial = next(i for i in range(len(tiny_tokenizer)) if tiny_tokenizer.decode([i]) == "\ufffd")
    worker = ScriptedWorker([partial], vocab_size=len(tiny_tokenizer))
    engine = EngineWithInput(worker.warmup(), SchedulerConfig(), tokenizer=tiny_tokenizer)
    params = SamplingParams(temperature=0, max_tokens=1, stop=["\ufffd"])
    engine.add_request([5, 6], params)
    (last,) = drive(engine, worker)[("req-0", 0)]
    assert last.text == ""  # the stop string is never streamed
    assert last.finish_reason is FinishReason.STOP and last.stop_reason == "\ufffd"


def test_prompt_logprobs_score_at_most_max_prompt_logits_tokens_per_step():
    from kvray.cluster.scheduler import MAX_PROMPT_LOGITS

    engine, worker = make(max_num_batched_tokens=2048, max_model_len=4096, num_kv_blocks=2048)
    for n in (1200, 700):
        prompt = [i % 997 + 1 for i in range(n)]
        engine.add_request(prompt, SamplingParams(max_tokens=2, prompt_logprobs=1))
    engine.add_request([7] * 900, GREEDY)  # no prompt logprobs: not limited
    drive(engine, worker)
    scored = {
        n.seq_id for s in worker.steps for n in s.new_seqs if n.sampling_params.prompt_logprobs
    }
    rows = [
        sum(k for i, k in zip(s.seq_ids, s.num_scheduled_tokens) if i in scored and k > 1)
        for s in worker.steps
    ]
    assert max(rows) == MAX_PROMPT_LOGITS and sum(rows) == 1200 + 700
    assert worker.steps[0].num_tokens == MAX_PROMPT_LOGITS + 900  # the rest of the budget is used
