"""Structured output in the worker, on hand-built logits and the built-in tiny tokenizer: the
sampler and beams take only tokens the grammar allows, unconstrained rows and logprobs stay as
they were, the grammar wins over token constraints that would leave it nothing, and the
sequence table makes, rebuilds and forks each sequence's grammar."""

from __future__ import annotations

import logging

import pytest
import torch

from kvray.workers.grammar_engine import make_engine
from kvray.workers.grammar_spec import GrammarSpec
from kvray.workers.protocol import Fork, NewSequence, SamplingParams, StepInput
from kvray.workers.sampler import Sampler, SamplingRow, beam_candidates, prepare_sampling_batch
from kvray.workers.sequences import SequenceTable
from kvray.workers.structured_output import SequenceGrammar, WorkerGrammars
from kvray.workers.tiny_model import make_tokenizer
from kvray.workers.token_bitmask import prepare_grammar_masks

CPU = torch.device("cpu")
CHOICE = GrammarSpec.choice(["yes", "no"])
PROMPT = [5, 6, 7]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def grammars(tokenizer) -> WorkerGrammars:
    engine = make_engine(
        tokenizer, vocab_size=len(tokenizer), eos_token_ids=[tokenizer.eos_token_id]
    )
    return WorkerGrammars(engine)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def row(grammars, tokenizer, output: str = "", **params) -> SamplingRow:
    """A sampling row of CHOICE whose output so far is `output`."""
    params.setdefault("temperature", 0)
    sampling = SamplingParams(structured_output=CHOICE, **params)
    token_ids = PROMPT + encode(tokenizer, output)
    grammar = grammars.sequence_grammar(CHOICE, token_ids[len(PROMPT) :])
    return SamplingRow(sampling, token_ids, len(PROMPT), (tokenizer.eos_token_id,), grammar)


def first_tokens(tokenizer) -> set[int]:
    return {encode(tokenizer, word)[0] for word in ("yes", "no")}


def logits_favouring(token_id: int, vocab: int, rows: int = 1) -> torch.Tensor:
    logits = torch.zeros(rows, vocab)
    logits[:, token_id] = 10.0
    return logits


def sample(rows: list[SamplingRow], logits: torch.Tensor):
    batch = prepare_sampling_batch(rows, vocab_size=logits.shape[-1], device=CPU)
    return Sampler().sample(logits, batch), batch


def test_greedy_takes_the_best_token_the_grammar_allows(grammars, tokenizer):
    vocab = len(tokenizer)
    off = encode(tokenizer, "x")[0]  # the model's favourite: not a way to start yes or no
    logits = logits_favouring(off, vocab)
    allowed = sorted(first_tokens(tokenizer))
    logits[0, allowed[1]] = 5.0
    (token_ids, _), batch = sample([row(grammars, tokenizer)], logits)
    assert token_ids == [allowed[1]]
    assert batch.grammar is not None and batch.grammar.seconds > 0


def test_sampled_tokens_follow_the_grammar(grammars, tokenizer):
    rows = [row(grammars, tokenizer, temperature=1.0, seed=i) for i in range(40)]
    logits = torch.randn(40, len(tokenizer), generator=torch.Generator().manual_seed(0))
    (token_ids, _), _ = sample(rows, logits)
    assert set(token_ids) <= first_tokens(tokenizer) and len(set(token_ids)) == 2


def test_an_unconstrained_row_beside_a_constrained_one_is_untouched(grammars, tokenizer):
    off = encode(tokenizer, "x")[0]
    free = SamplingRow(SamplingParams(temperature=0), list(PROMPT), len(PROMPT))
    logits = logits_favouring(off, len(tokenizer), rows=2)
    (token_ids, _), batch = sample([free, row(grammars, tokenizer)], logits)
    assert token_ids[0] == off and token_ids[1] in first_tokens(tokenizer)
    assert batch.grammar is not None and batch.grammar.rows is not None
    assert batch.grammar.rows.tolist() == [1]


def test_logprobs_stay_the_models_own(grammars, tokenizer):
    logits = torch.randn(1, len(tokenizer), generator=torch.Generator().manual_seed(1))
    raw = torch.log_softmax(logits, dim=-1)
    (token_ids, logprobs), _ = sample([row(grammars, tokenizer, logprobs=2)], logits.clone())
    assert logprobs is not None and logprobs[0] is not None
    assert logprobs[0].logprob == pytest.approx(raw[0, token_ids[0]].item())
    assert logprobs[0].top_token_ids == raw[0].topk(2).indices.tolist()


def test_a_finished_answer_can_only_end(grammars, tokenizer):
    (token_ids, _), _ = sample([row(grammars, tokenizer, "yes")], torch.zeros(1, len(tokenizer)))
    assert token_ids == [tokenizer.eos_token_id]


def test_the_grammar_wins_where_token_constraints_leave_it_nothing(grammars, tokenizer):
    off = encode(tokenizer, "x")[0]
    constrained = row(grammars, tokenizer, allowed_token_ids=[off])
    (token_ids, _), _ = sample([constrained], logits_favouring(off, len(tokenizer)))
    assert token_ids[0] in first_tokens(tokenizer)
    # where they leave it something, both hold
    yes, no = (encode(tokenizer, w)[0] for w in ("yes", "no"))
    both = row(grammars, tokenizer, allowed_token_ids=[off, no])
    (token_ids, _), _ = sample([both], logits_favouring(yes, len(tokenizer)))
    assert token_ids == [no]


def test_beam_candidates_follow_the_grammar(grammars, tokenizer):
    rows = [row(grammars, tokenizer, num_beams=2, n=2, temperature=None)]
    logits = torch.randn(1, len(tokenizer), generator=torch.Generator().manual_seed(2))
    masks = prepare_grammar_masks(rows, vocab_size=len(tokenizer), device=CPU)
    ids, scores = beam_candidates(logits, rows, grammar=masks)
    assert set(ids[0]) == first_tokens(tokenizer)  # only two tokens start an answer
    assert all(s > float("-inf") for s in scores[0])


# ---------------------------------------------------------------- the worker's sequences


def new_seq(seq_id: int, token_ids: list[int], spec: GrammarSpec | None = CHOICE) -> NewSequence:
    params = SamplingParams(temperature=1.0, structured_output=spec)
    return NewSequence(seq_id, token_ids, len(PROMPT), params, block_ids=[0])


def test_a_sequence_that_arrives_with_output_rebuilds_its_grammar(grammars, tokenizer):
    table = SequenceTable(grammars.sequence_grammar)
    y = encode(tokenizer, "yes")
    (seq,) = table.apply(StepInput(1, new_seqs=[new_seq(1, PROMPT + y[:1])], seq_ids=[1],
                                   num_scheduled_tokens=[4], num_computed_tokens=[0]))  # fmt: skip
    assert seq.grammar is not None and seq.grammar.matcher is not None
    assert seq.grammar.matcher.num_tokens == 1  # a recompute: its output is consumed
    unconstrained = table.apply(StepInput(2, new_seqs=[new_seq(2, PROMPT, None)]))
    assert unconstrained == [] and table.seqs[2].grammar is None


def test_a_fork_gets_its_own_grammar(grammars, tokenizer):
    table = SequenceTable(grammars.sequence_grammar)
    table.apply(StepInput(1, new_seqs=[new_seq(1, list(PROMPT))]))
    table.apply(StepInput(2, forks=[Fork(2, 1, SamplingParams(temperature=1.0, seed=1))]))
    parent, child = table.seqs[1], table.seqs[2]
    assert parent.grammar is not None and child.grammar is not None
    assert child.grammar is not parent.grammar
    child.token_ids += encode(tokenizer, "no")
    assert child.grammar.follow(child.token_ids, len(PROMPT)) is not None
    assert parent.grammar.matcher is not None and parent.grammar.matcher.num_tokens == 0


def test_a_worker_without_grammars_lets_a_constrained_sequence_only_end(tokenizer):
    table = SequenceTable()  # no engine: the router sends such a worker no constrained request
    table.apply(StepInput(1, new_seqs=[new_seq(1, list(PROMPT))]))
    seq = table.seqs[1]
    assert seq.grammar is not None and seq.grammar.matcher is None
    sampling_row = SamplingRow(seq.sampling_params, seq.token_ids, 3, (0,), seq.grammar)
    (token_ids, _), _ = sample([sampling_row], torch.randn(1, len(tokenizer)))
    assert token_ids == [0]


def test_tokens_past_a_finished_answer_keep_its_end_only_mask(grammars, tokenizer):
    eos = tokenizer.eos_token_id
    answer = encode(tokenizer, "no")
    grammar = grammars.sequence_grammar(CHOICE, answer)
    # a pipelined step sampled past the end before the router saw it
    token_ids = PROMPT + answer + [eos, encode(tokenizer, "x")[0]]
    assert grammar.follow(token_ids, len(PROMPT)) is grammar.matcher
    assert grammar.matcher is not None and grammar.matcher.is_finished


def test_an_output_off_its_grammar_can_only_end_and_is_logged(grammars, tokenizer, caplog):
    grammar = grammars.sequence_grammar(CHOICE, [])
    with caplog.at_level(logging.ERROR):
        assert grammar.follow(PROMPT + encode(tokenizer, "x"), len(PROMPT)) is None
    assert "left its grammar" in caplog.text and grammar.matcher is None
    assert grammar.fork().matcher is None


def test_a_spec_this_worker_cannot_compile_can_only_end(grammars, caplog):
    with caplog.at_level(logging.ERROR):
        grammar = grammars.sequence_grammar(GrammarSpec("regex", "(a)\\1"), [])
    assert grammar.matcher is None and "failed on this worker" in caplog.text


def test_a_sequence_grammar_with_no_matcher_masks_to_end_of_sequence(tokenizer):
    params = SamplingParams(temperature=0, structured_output=CHOICE)
    rows = [SamplingRow(params, list(PROMPT), 3, (7, 31, 40), SequenceGrammar(None))]
    masks = prepare_grammar_masks(rows, vocab_size=len(tokenizer), device=CPU)
    assert masks is not None
    bits = [w & 0xFFFFFFFF for w in masks.bitmask[0].tolist()]
    allowed = [t for t in range(len(tokenizer)) if bits[t // 32] >> (t % 32) & 1]
    assert allowed == [7, 31, 40]  # 31: the sign bit of an int32 word
