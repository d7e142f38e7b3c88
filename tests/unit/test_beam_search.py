"""Beam search's rules on hand-built candidates: which beams live on, which end, when it stops."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from kvray.cluster.beam_search import BeamSearch, f32

EOS = 0


@dataclass
class Beam:
    output_token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0


def search(**options) -> BeamSearch:
    defaults = dict(
        num_beams=2,
        length_penalty=1.0,
        early_stopping=False,
        max_output_tokens=10,
        stop_token_ids=frozenset({EOS}),
        num_candidates=4,  # Hugging Face's for 2 beams and 1 end-of-sequence id
    )
    return BeamSearch(**{**defaults, **options})


def advance(bs: BeamSearch, beams: list[Beam], candidates) -> list[Beam]:
    live = bs.step(beams, candidates)
    return [Beam([*c.parent.output_token_ids, c.token_id], c.cumulative_logprob) for c in live]


def test_the_best_continuations_over_all_beams_live_on():
    bs = search()
    beams = [Beam([1], -1.0), Beam([2], -2.0)]
    live = bs.step(beams, [([5, 6], [-3.0, -3.5]), ([7, 8], [-0.1, -5.0])])
    assert [(c.parent.output_token_ids, c.token_id) for c in live] == [([2], 7), ([1], 5)]
    assert [c.cumulative_logprob for c in live] == [f32(-2.1), -4.0]


def test_an_ending_among_the_best_num_beams_is_kept_with_its_length_normalised_score():
    bs = search(length_penalty=0.5)
    live = bs.step([Beam([3, 4], -1.0)], [([EOS, 5, 6, 7], [-0.5, -1.0, -2.0, -3.0])])
    [hyp] = bs.hypotheses
    assert hyp.token_ids == [3, 4, EOS] and hyp.stop_token_id == EOS
    assert hyp.score == pytest.approx(-1.5 / math.sqrt(3), rel=1e-6)
    assert [c.token_id for c in live] == [5, 6]  # the end does not take a live beam's place


def test_an_ending_ranked_past_num_beams_is_dropped():
    bs = search()
    bs.step([Beam([3], -1.0)], [([5, 6, EOS, 7], [-0.5, -1.0, -2.0, -3.0])])
    assert bs.hypotheses == []


def test_early_stopping_ends_once_num_beams_beams_have_ended():
    bs = search(early_stopping=True)
    beams = advance(bs, [Beam()], [([EOS, 1, 2, 3], [-0.1, -0.2, -0.3, -0.4])])
    assert not bs.is_done
    beams = advance(bs, beams, [([EOS, 4], [-5.0, -6.0]), ([5, 6], [-0.1, -0.2])])
    assert not bs.is_done  # the second ending ranked past num_beams
    advance(bs, beams, [([EOS, 7], [-0.1, -0.2]), ([8, 9], [-0.3, -0.4])])
    assert bs.is_done and len(bs.results(2)) == 2


def test_without_early_stopping_it_ends_when_no_live_beam_can_beat_the_worst_kept():
    bs = search()
    beams = advance(bs, [Beam()], [([EOS, 1, 2, 3], [-0.1, -0.2, -0.3, -0.4])])
    beams = advance(bs, beams, [([EOS, 4], [-0.1, -6.0]), ([5, 6], [-5.0, -5.1])])
    assert bs.is_done  # best live -5.2 / 2 < worst kept -0.3 / 2
    assert [h.token_ids for h in bs.results(2)] == [[EOS], [1, EOS]]


def test_every_beam_ends_at_max_output_tokens():
    bs = search(max_output_tokens=1)
    live = bs.step([Beam()], [([1, 2, 3, 4], [-0.1, -0.2, -0.3, -0.4])])
    assert live == [] and bs.is_done
    assert [(h.token_ids, h.stop_token_id) for h in bs.results(2)] == [([1], None), ([2], None)]


@pytest.mark.parametrize("penalty", [1.0, -1.0])
def test_length_penalty_decides_between_a_short_and_a_long_beam(penalty):
    bs = search(length_penalty=penalty, max_output_tokens=2)
    beams = advance(bs, [Beam()], [([EOS, 1, 4, 5], [-0.5, -0.6, -3.0, -3.1])])
    advance(bs, beams, [([2, 3], [-0.2, -0.3]), ([6, 7], [-5.0, -6.0])])
    # [EOS] scores -0.5 either way; [1, 2] (-0.8 over 2 tokens) -0.4 with 1.0, -1.6 with -1.0
    best = bs.results(1)[0].token_ids
    assert best == ([1, 2] if penalty == 1.0 else [EOS])
