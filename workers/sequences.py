"""The worker's copy of every sequence the router has scheduled, kept in step by StepInput diffs.

Standard library only: `ModelWorker` and `FakeWorker` share it, so both apply a step's diffs
and check it against their state the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from kvray.workers.grammar_spec import GrammarSpec
from kvray.workers.protocol import SamplingParams, StepInput
from kvray.workers.structured_output import SequenceGrammar

# Makes a sequence's grammar from its spec and output tokens (`WorkerGrammars.sequence_grammar`)
MakeGrammar = Callable[[GrammarSpec, Sequence[int]], SequenceGrammar]


@dataclass
class WorkerSequence:
    token_ids: list[int]  # prompt + every token sampled so far (including unseen by the router)
    num_prompt_tokens: int
    block_ids: list[int]
    sampling_params: SamplingParams
    num_computed_tokens: int = 0
    grammar: SequenceGrammar | None = None  # structured output's state; None: unconstrained


class SequenceTable:
    def __init__(self, make_grammar: MakeGrammar | None = None) -> None:
        """`make_grammar`: a constrained sequence's grammar (None: a worker that masks nothing,
        whose constrained sequences can only end; the router sends it none)."""
        self.seqs: dict[int, WorkerSequence] = {}
        self.make_grammar = make_grammar

    def __len__(self) -> int:
        return len(self.seqs)

    def apply(self, step: StepInput) -> list[WorkerSequence]:
        """Apply a step's diffs and return its scheduled sequences, in `step.seq_ids` order.

        Drops `finished_seq_ids`, adds `new_seqs`, makes `forks`, appends `beam_token_ids`,
        swaps in `block_copies`' blocks and appends `new_block_ids` (StepInput's order). The
        caller copies the KV of `block_copies` itself.

        Raises:
            KeyError / AssertionError: the step disagrees with this table (a router bug).
        """
        for seq_id in step.finished_seq_ids:
            self.seqs.pop(seq_id, None)
        for new in step.new_seqs:
            self.seqs[new.seq_id] = WorkerSequence(
                token_ids=list(new.token_ids),
                num_prompt_tokens=new.num_prompt_tokens,
                block_ids=list(new.block_ids),
                sampling_params=new.sampling_params,
                num_computed_tokens=new.num_computed_tokens,
                grammar=self._grammar(new.sampling_params, new.token_ids[new.num_prompt_tokens :]),
            )
        # NOTE: every fork copies its parent before any beam token is appended.
        children = [(fork, self._copy(self.seqs[fork.parent_id])) for fork in step.forks]
        for fork, child in children:
            child.sampling_params = fork.sampling_params
            self.seqs[fork.child_id] = child
        for seq_id, token_id in step.beam_token_ids.items():
            self.seqs[seq_id].token_ids.append(token_id)
        for copy in step.block_copies:
            block_ids = self.seqs[copy.seq_id].block_ids
            assert block_ids[copy.index] == copy.src, "router and worker disagree"
            block_ids[copy.index] = copy.dst
        for seq_id, block_ids in step.new_block_ids.items():
            self.seqs[seq_id].block_ids.extend(block_ids)
        scheduled = [self.seqs[seq_id] for seq_id in step.seq_ids]
        for seq, num_tokens, computed in zip(
            scheduled, step.num_scheduled_tokens, step.num_computed_tokens
        ):
            assert seq.num_computed_tokens == computed, "router and worker disagree"
            assert computed + num_tokens <= len(seq.token_ids), "computing an unknown token"
        return scheduled

    def _grammar(
        self, sampling_params: SamplingParams, output_token_ids: Sequence[int]
    ) -> SequenceGrammar | None:
        """A new sequence's grammar, rebuilt from its output (a recompute has some)."""
        spec = sampling_params.structured_output
        if spec is None:
            return None
        if self.make_grammar is None:
            return SequenceGrammar(None)
        return self.make_grammar(spec, output_token_ids)

    @staticmethod
    def _copy(seq: WorkerSequence) -> WorkerSequence:
        return replace(
            seq,
            token_ids=list(seq.token_ids),
            block_ids=list(seq.block_ids),
            grammar=None if seq.grammar is None else seq.grammar.fork(),
        )

    @staticmethod
    def advance(scheduled: list[WorkerSequence], step: StepInput) -> None:
        """After the forward: the scheduled tokens are computed."""
        for seq, num_tokens in zip(scheduled, step.num_scheduled_tokens):
            seq.num_computed_tokens += num_tokens
