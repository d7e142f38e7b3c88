"""Beam search for one request: which beams live on, which end, and when the search is done.

Pure Python, no torch. The worker returns each live beam's best next tokens with their
log-probabilities (`SamplingParams.num_beam_candidates` of them); `BeamSearch.step` turns them
into the next live beams and finished hypotheses by Hugging Face's rules
(`GenerationMixin._beam_search`), scores in float32 as there, so that kvray returns the beams
`generate(num_beams=k, do_sample=False)` returns. The scheduler forks and drops the sequences;
this module only decides.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from kvray.cluster.sequence import Sequence, next_seq_id

if TYPE_CHECKING:
    from kvray.cluster.detokenizer import Detokenizer


def f32(x: float) -> float:
    """`x` rounded to float32, the precision Hugging Face keeps beam scores in."""
    return float(struct.unpack("f", struct.pack("f", x))[0])


class Beam(Protocol):
    """What beam search reads of a live beam (a `Sequence`)."""

    @property
    def output_token_ids(self) -> list[int]: ...

    @property
    def cumulative_logprob(self) -> float: ...


@dataclass
class Hypothesis:
    """A finished beam: its output tokens and scores."""

    token_ids: list[int]
    cumulative_logprob: float  # sum of the tokens' log-probabilities (float32)
    score: float  # cumulative_logprob / len(token_ids) ** length_penalty: the ranking key
    stop_token_id: int | None  # the end-of-sequence or stop token it ended with; None: length


B = TypeVar("B", bound=Beam)


@dataclass
class Continuation(Generic[B]):
    """One of the next step's live beams: `parent` extended by `token_id`."""

    parent: B
    token_id: int
    cumulative_logprob: float


Candidates = tuple[list[int], list[float]]  # a beam's best next tokens and their log-probs


class BeamSearch:
    def __init__(
        self,
        *,
        num_beams: int,
        length_penalty: float,
        early_stopping: bool,
        max_output_tokens: int,
        stop_token_ids: frozenset[int],
        num_candidates: int,
    ) -> None:
        """`max_output_tokens`: the output length at which every beam ends (max_tokens, or what
        the context leaves); `stop_token_ids`: end-of-sequence ids and the request's stop ids;
        `num_candidates`: next tokens each beam offers (`SamplingParams.num_beam_candidates`)."""
        self.num_candidates = num_candidates
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.max_output_tokens = max_output_tokens
        self.stop_token_ids = stop_token_ids
        self.hypotheses: list[Hypothesis] = []  # best first, at most num_beams
        self.can_improve = True  # HF's `is_early_stop_heuristic_unsatisfied`
        self.is_done = False

    def _length_norm(self, num_tokens: int) -> float:
        return f32(num_tokens**self.length_penalty)

    def step(self, beams: list[B], candidates: list[Candidates]) -> list[Continuation[B]]:
        """Advance the search by one token. `beams` are the live beams (all with the same number
        of output tokens), `candidates` their best next tokens (parallel lists).

        Returns the next live beams, best first (empty once `is_done`); records the beams that end.
        """
        assert not self.is_done and beams and len(beams) == len(candidates)
        ranked = self._rank(beams, candidates)
        num_tokens = len(beams[0].output_token_ids) + 1
        ends = [
            c.token_id in self.stop_token_ids or num_tokens >= self.max_output_tokens
            for c in ranked
        ]
        self._finish(ranked, ends, num_tokens)
        live = [c for c, end in zip(ranked, ends) if not end][: self.num_beams]
        self._update_can_improve(live, num_tokens)
        full = len(self.hypotheses) == self.num_beams
        self.is_done = (
            not self.can_improve or (full and self.early_stopping) or all(ends) or not live
        )
        return [] if self.is_done else live

    def _rank(self, beams: list[B], candidates: list[Candidates]) -> list[Continuation[B]]:
        """The best `num_candidates` continuations over all beams (HF's flat top-k)."""
        ranked = [
            Continuation(beam, token_id, f32(beam.cumulative_logprob + logprob))
            for beam, (token_ids, logprobs) in zip(beams, candidates)
            for token_id, logprob in zip(token_ids, logprobs)
        ]
        # NOTE: stable: on equal scores the earlier beam, then the higher-ranked token, wins.
        ranked.sort(key=lambda c: -c.cumulative_logprob)
        return ranked[: self.num_candidates]

    def _finish(self, ranked: list[Continuation[B]], ends: list[bool], num_tokens: int) -> None:
        """Keep the continuations that end among the best num_beams, if they beat the worst
        hypothesis kept (HF considers no more once full with early stopping or once no live
        beam can improve)."""
        if not self.can_improve or (len(self.hypotheses) == self.num_beams and self.early_stopping):
            return
        norm = self._length_norm(num_tokens)
        for c, end in zip(ranked[: self.num_beams], ends):
            if not end:
                continue
            stop = c.token_id if c.token_id in self.stop_token_ids else None
            tokens = [*c.parent.output_token_ids, c.token_id]
            score = f32(c.cumulative_logprob / norm)
            self.hypotheses.append(Hypothesis(tokens, c.cumulative_logprob, score, stop))
        # NOTE: stable: an older hypothesis wins a tie, as in HF's merged top-k.
        self.hypotheses.sort(key=lambda h: -h.score)
        del self.hypotheses[self.num_beams :]

    def _update_can_improve(self, live: list[Continuation[B]], num_tokens: int) -> None:
        """Whether the best live beam could still beat the worst kept hypothesis (HF's early
        stop heuristic with `early_stopping=False`: it is judged at the current length)."""
        if not self.can_improve or len(self.hypotheses) < self.num_beams or not live:
            return
        best_possible = f32(live[0].cumulative_logprob / self._length_norm(num_tokens))
        self.can_improve = best_possible > min(h.score for h in self.hypotheses)

    def results(self, n: int) -> list[Hypothesis]:
        """The `n` best hypotheses, best first (after `is_done`)."""
        assert self.is_done
        return self.hypotheses[:n]


class BeamGroup:
    """The live beams of one beam-search request (its `Request.seqs`) and its search.

    A beam's candidates wait here until every live beam has reported this step's; then `advance`
    runs the search. Preempted or moved, the search restarts from the prompt (`restart`): it is
    deterministic, so it ends with the same beams.
    """

    def __init__(
        self,
        template: Sequence,
        *,
        max_model_len: int,
        eos_token_ids: frozenset[int],
        make_detokenizer: Callable[[], Detokenizer] | None,
    ) -> None:
        """`template`: the root sequence (the prompt and the request's parameters)."""
        self.template = template
        self.sampling_params = template.sampling_params
        self.max_model_len = max_model_len
        stop = set(self.sampling_params.stop_token_ids)
        if not self.sampling_params.ignore_eos:
            stop |= eos_token_ids
        self.stop_token_ids = frozenset(stop)
        self.num_candidates = self.sampling_params.num_beam_candidates(eos_token_ids)
        self.make_detokenizer = make_detokenizer
        self.live: list[Sequence] = []
        self.search = self._new_search()
        self.candidates: dict[int, Candidates] = {}

    def _new_search(self) -> BeamSearch:
        sampling_params = self.sampling_params
        room = self.max_model_len - self.template.num_prompt_tokens
        return BeamSearch(
            num_beams=sampling_params.num_beams,
            length_penalty=sampling_params.length_penalty,
            early_stopping=sampling_params.early_stopping,
            max_output_tokens=min(sampling_params.max_tokens or room, room),
            stop_token_ids=self.stop_token_ids,
            num_candidates=self.num_candidates,
        )

    def restart(self) -> Sequence:
        """Start over from the prompt: one root beam (a new sequence), nothing found yet."""
        t = self.template
        root = Sequence(
            seq_id=next_seq_id(),
            request_id=t.request_id,
            prompt_token_ids=t.prompt_token_ids,
            sampling_params=t.sampling_params,
            arrival_time=t.arrival_time,
            num_cached_tokens=t.num_cached_tokens,
            first_scheduled_time=t.first_scheduled_time,
            prompt_logprobs=t.prompt_logprobs,
            beam=self,
        )
        self.live[:] = [root]
        self.search = self._new_search()
        self.candidates.clear()
        return root

    def add_candidates(self, seq: Sequence, token_ids: list[int], logprobs: list[float]) -> bool:
        """Record a beam's next-token candidates; True once every live beam's are in."""
        self.candidates[seq.seq_id] = (token_ids, logprobs)
        return len(self.candidates) == len(self.live)

    def advance(self) -> tuple[list[tuple[Sequence, Sequence]], list[Sequence]]:
        """Run one search step over the collected candidates and extend the beams that live on.

        Returns (forks as (parent, child): new sequences that copy a beam, with its new token;
        beams to drop: those with no continuation, or every one once the search is done).
        `live` then holds the next live beams, best first, each ending in its new token.
        """
        candidates = [self.candidates[seq.seq_id] for seq in self.live]
        self.candidates.clear()
        if self.template.first_scheduled_time is None:  # kept across restarts
            self.template.first_scheduled_time = self.live[0].first_scheduled_time
            self.template.num_cached_tokens = self.live[0].num_cached_tokens
        continuations = self.search.step(self.live, candidates)
        forks: list[tuple[Sequence, Sequence]] = []
        extended: list[tuple[Sequence, Continuation[Sequence]]] = []
        continued: set[int] = set()
        for c in continuations:
            beam = c.parent
            if beam.seq_id in continued:  # a second continuation of one beam: a fork
                beam = c.parent.copy(seq_id=next_seq_id())
                forks.append((c.parent, beam))
            continued.add(beam.seq_id)
            extended.append((beam, c))
        dropped = [beam for beam in self.live if beam.seq_id not in continued]
        # NOTE: after the forks, which copy their parents' tokens before this step's.
        for beam, c in extended:
            beam.output_token_ids.append(c.token_id)
            beam.output_logprobs.append(None)
            beam.cumulative_logprob = c.cumulative_logprob
        self.live[:] = [beam for beam, _ in extended]
        return forks, dropped
