"""Forked sequences against a fake worker: `n` samples and beams share KV blocks (copy-on-write),
and beam searches survive pipelined steps, preemption, moves and aborts with the same result."""

from __future__ import annotations

import pytest

from kvray.cluster.input_processor import Resumed
from kvray.cluster.sequence import FinishReason
from kvray.workers.protocol import InvalidParameterError, SamplingParams
from tests.helpers import drive, tokens_of
from tests.unit.test_scheduler import expected_tokens, make

BEAMS = SamplingParams(num_beams=3, n=2, max_tokens=10, ignore_eos=True)
PROMPT = list(range(1, 23))  # 22 tokens: with blocks of 4, the fork point (21) is mid-block


def beam_results(out, request_id="req-0"):
    return [
        (tokens_of(out[(request_id, i)]), out[(request_id, i)][-1].finish_reason) for i in (0, 1)
    ]


def reference():
    engine, worker = make()
    engine.add_request(PROMPT, BEAMS)
    return beam_results(drive(engine, worker))


def test_a_beam_search_sends_its_n_beams_once_at_the_end_ranked():
    engine, worker = make()
    engine.add_request(PROMPT, BEAMS)
    out = drive(engine, worker)
    assert sorted(out) == [("req-0", 0), ("req-0", 1)]
    assert all(len(chunks) == 1 for chunks in out.values())  # nothing streamed before the end
    first, second = out[("req-0", 0)][0], out[("req-0", 1)][0]
    assert first.cumulative_logprob >= second.cumulative_logprob
    assert first.token_ids == expected_tokens(PROMPT, 10)  # the fake's best token every step
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_beam_search_gives_the_same_beams_with_a_step_in_flight():
    engine, worker = make()
    engine.add_request(PROMPT, BEAMS)
    assert beam_results(drive(engine, worker, pipelined=True)) == reference()


def test_a_preempted_beam_search_starts_over_and_ends_the_same():
    engine, worker = make(num_kv_blocks=16)
    engine.add_request(list(range(30, 50)), SamplingParams(temperature=0, max_tokens=30))
    engine.add_request(PROMPT, BEAMS)
    out = drive(engine, worker)
    assert engine.scheduler.num_preemptions > 0
    assert beam_results(out, "req-1") == reference()
    assert engine.block_manager.num_free_blocks == 16


def test_a_beam_search_moved_to_another_engine_ends_the_same():
    engine, worker = make()
    engine.add_request(PROMPT, BEAMS)
    for _ in range(4):
        engine.step(worker.step)
    other, other_worker = make()
    for request in engine.take_unfinished():
        other.add(request)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert beam_results(drive(other, other_worker)) == reference()


def test_an_aborted_beam_search_ends_each_returned_beam_and_frees_its_blocks():
    engine, worker = make()
    engine.add_request(PROMPT, BEAMS)
    for _ in range(4):
        assert engine.step(worker.step) == []
    chunks = engine.abort("req-0")
    assert [(c.index, c.finish_reason) for c in chunks] == [
        (0, FinishReason.ABORT),
        (1, FinishReason.ABORT),
    ]
    assert not engine.has_unfinished()
    engine.step(worker.step)  # the worker drops the beams
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert worker.table.seqs == {}


@pytest.mark.parametrize("pipelined", [False, True])
def test_n_samples_fork_after_one_prefill_and_copy_only_the_shared_last_block(pipelined):
    engine, worker = make()
    engine.add_request(PROMPT, SamplingParams(n=3, seed=1, max_tokens=5, ignore_eos=True))
    out = drive(engine, worker, pipelined=pipelined)
    forks = [f for step in worker.steps for f in step.forks]
    copies = [c for step in worker.steps for c in step.block_copies]
    assert len(forks) == 2 and len(copies) == 2  # the 6th block holds 1 token: shared
    assert sum(step.num_tokens for step in worker.steps) == 21 + 3 + 3 * 4
    for i in range(3):  # the fake's tokens depend only on the sequence's own tokens
        assert tokens_of(out[("req-0", i)]) == expected_tokens(PROMPT, 5)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_samples_fork_without_copies_when_the_fork_point_ends_a_block():
    engine, worker = make()
    engine.add_request(list(range(1, 18)), SamplingParams(n=2, seed=1, max_tokens=3))
    drive(engine, worker)  # 17 tokens: the 16 before the fork fill 4 blocks
    assert [len(step.forks) for step in worker.steps if step.forks] == [1]
    assert not any(step.block_copies for step in worker.steps)


def test_samples_of_a_preempted_parent_fork_once_it_is_recomputed():
    engine, worker = make(num_kv_blocks=14, max_num_batched_tokens=8)
    engine.add_request(list(range(60, 80)), SamplingParams(temperature=0, max_tokens=30))
    engine.add_request(PROMPT, SamplingParams(n=2, seed=1, max_tokens=6, ignore_eos=True))
    out = drive(engine, worker)
    assert engine.scheduler.num_preemptions > 0
    for i in range(2):
        assert tokens_of(out[("req-1", i)]) == expected_tokens(PROMPT, 6)
    assert engine.block_manager.num_free_blocks == 14


def test_a_one_token_prompt_runs_its_samples_side_by_side():
    engine, worker = make()
    engine.add_request([5], SamplingParams(n=2, seed=1, max_tokens=3))
    out = drive(engine, worker)
    assert not any(step.forks for step in worker.steps)
    assert tokens_of(out[("req-0", 1)]) == expected_tokens([5], 3)


def test_a_beam_search_waits_until_all_its_beams_fit_under_max_num_seqs():
    engine, worker = make(max_num_seqs=4)
    engine.add_request([1, 2, 3], SamplingParams(n=2, seed=1, max_tokens=20))
    engine.add_request(PROMPT, BEAMS)
    engine.step(worker.step)
    assert {s.request_id for s in engine.scheduler.running} == {"req-0"}  # 2 samples + 3 beams > 4
    drive(engine, worker)
    assert max(len(step.seq_ids) for step in worker.steps) <= 4


def test_a_beam_search_that_could_outgrow_the_kv_cache_is_refused():
    engine, _ = make(num_kv_blocks=20, max_model_len=64)
    with pytest.raises(InvalidParameterError, match="may need 46 KV blocks; a replica has 20"):
        engine.add_request(list(range(10)), SamplingParams(num_beams=4, max_tokens=40))


@pytest.mark.parametrize("params", [BEAMS, SamplingParams(n=1, best_of=2)])
def test_a_ranked_request_cannot_be_resumed(params):
    engine, _ = make()
    with pytest.raises(InvalidParameterError, match="nothing to resume; send it again"):
        engine.processor.process([1, 2], params, "r", resume={0: Resumed((3,), 1, False)})
