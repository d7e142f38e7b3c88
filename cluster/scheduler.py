"""The per-replica scheduler: FCFS continuous batching over a paged KV cache.

One rule: each step gives every sequence up to `num_tokens - num_computed_tokens` tokens within
the step's token budget. A decode is the case where that difference is 1; a long prompt is
computed in chunks. When blocks run out, the newest running sequence is preempted: its blocks
are freed and it is recomputed later from its prompt and the tokens it already produced.

`schedule()` may run again before the previous step's `update()`: a sequence that is still
waiting for its sampled token counts it as pending and decodes it anyway (the worker holds it);
a beam waits for `update()`, where its beam search picks the next beams. Sequences fork (`n`
samples after one prefill, beams from beams) and share KV blocks copy-on-write.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kvray.cluster.beam_search import BeamGroup
from kvray.cluster.block_manager import BlockManager
from kvray.cluster.sequence import FinishReason, Sequence, SequenceStatus
from kvray.workers.config import SchedulerConfig
from kvray.workers.protocol import BlockCopy, Fork, Logprobs, NewSequence, StepInput, StepOutput

# Prompt tokens scored for prompt_logprobs per step: each keeps a [vocab] row of logits.
MAX_PROMPT_LOGITS = 512


@dataclass
class TokenEvent:
    """One token a sequence received in `update()`, and whether it ended the sequence."""

    seq: Sequence
    token_id: int
    logprobs: Logprobs | None
    finish_reason: FinishReason | None


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        *,
        max_model_len: int,
        eos_token_ids: tuple[int, ...] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[int, Sequence] = {}  # unfinished, by seq_id
        self._dropped_seq_ids: list[int] = []  # to tell the worker in the next step
        self._forks: list[Fork] = []  # beams forked in update(), for the next step
        self._beam_token_ids: dict[int, int] = {}  # tokens chosen for beams, for the next step
        self.finished_beams: list[BeamGroup] = []  # searches that ended; the engine takes them
        self._step_id = 0
        self._prompt_logits_left = MAX_PROMPT_LOGITS
        self.num_preemptions = 0
        # Tokens its waiting sequences will compute: known tokens but the prompt tokens the
        # replica held for them when queued (`Sequence.num_queued_work`; the router's load signal)
        self.num_queued_tokens = 0

    # ------------------------------------------------------------------ admission

    def add(self, seq: Sequence) -> None:
        """Queue a sequence in arrival order (FCFS): a new one at the back, one moved here from
        another replica where it would have been. The caller validated it against max_model_len."""
        assert seq.seq_id not in self.seqs
        self.seqs[seq.seq_id] = seq
        parent = seq.fork_parent
        if parent is not None and self.seqs.get(parent.seq_id) is parent:
            parent.unborn.append(seq)  # forks when its parent reaches the fork point
            return
        seq.fork_parent = None
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        position = len(self.waiting)
        while position > 0 and self.waiting[position - 1].arrival_time > seq.arrival_time:
            position -= 1
        self.waiting.insert(position, seq)
        self.num_queued_tokens += seq.num_queued_work

    def finish(
        self, seq_id: int, reason: FinishReason, stop_reason: str | int | None = None
    ) -> None:
        """End a sequence now (stop string, abort): free its blocks; the worker drops it next step."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return
        self._unlist(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    def remove(self, seq_id: int) -> Sequence:
        """Take a sequence out (to move it elsewhere): blocks freed, ready to be recomputed."""
        seq = self.seqs.pop(seq_id)
        self._unlist(seq)
        self._reset_for_recompute(seq)
        seq.num_pending_tokens = 0  # sampled by a worker whose output will never be read
        return seq

    def _unlist(self, seq: Sequence) -> None:
        """Take `seq` out of the running list (telling the worker) or out of the queue; samples
        waiting to fork from it go to the queue."""
        for child in seq.unborn:
            child.fork_parent = None
            self._enqueue(child)
        seq.unborn = []
        # NOTE: a beam forked or extended since the last step: the worker must not hear of it.
        # (A fork's parent is only ever dropped with the child: they are one beam search.)
        self._beam_token_ids.pop(seq.seq_id, None)
        self._forks = [f for f in self._forks if f.child_id != seq.seq_id]
        if seq.fork_parent is not None:
            seq.fork_parent.unborn.remove(seq)
            seq.fork_parent = None
        elif seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._dropped_seq_ids.append(seq.seq_id)
        else:
            self.waiting.remove(seq)
            self.num_queued_tokens -= seq.num_queued_work

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    # ------------------------------------------------------------------ schedule

    def schedule(self) -> StepInput:
        """Build the next step. Mutates sequences (computed counts, blocks, pending tokens).

        Returns a StepInput; it may schedule nothing (then only carries drops).
        """
        step = StepInput(self._step_id, forks=self._forks, beam_token_ids=self._beam_token_ids)
        step.finished_seq_ids = self._dropped_seq_ids
        self._step_id += 1
        self._dropped_seq_ids, self._forks, self._beam_token_ids = [], [], {}
        self._prompt_logits_left = MAX_PROMPT_LOGITS
        self._fork_samples(step)
        budget = self.config.max_num_batched_tokens
        budget, preempted = self._schedule_running(step, budget)
        if not preempted:
            self._admit_waiting(step, budget)
        return step

    def _schedule_running(self, step: StepInput, budget: int) -> tuple[int, bool]:
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = self._num_new_tokens(seq, budget)
            if num_new == 0:
                i += 1
                continue
            target = seq.num_computed_tokens + num_new
            while not self.block_manager.can_allocate(seq, target):
                self._preempt(self.running[-1])
                preempted = True
                if seq.status is not SequenceStatus.RUNNING:
                    break
            else:
                copy = self.block_manager.copy_on_write(seq)
                if copy is not None:
                    step.block_copies.append(BlockCopy(seq.seq_id, *copy))
                new_blocks = self.block_manager.allocate(seq, target)
                if new_blocks:
                    step.new_block_ids[seq.seq_id] = new_blocks
                self._add_to_step(step, seq, num_new)
                budget -= num_new
                i += 1
        return budget, preempted

    def _admit_waiting(self, step: StepInput, budget: int) -> None:
        seats = self._num_seats()
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if seq.num_pending_tokens:
                break  # preempted while a step was in flight; its last token is not back yet
            family = seq.sampling_params.num_beams if seq.beam is not None else 1 + len(seq.unborn)
            if self.running and seats + family > self.config.max_num_seqs:
                break
            seats += family
            # NOTE: prompt logprobs need every prompt position's logits: no cached prefix.
            prefix = (
                self.block_manager.match_prefix(seq.all_token_ids)
                if seq.prompt_logprobs is None
                else []
            )
            num_cached = len(prefix) * self.block_manager.block_size
            num_new = min(seq.num_known_tokens - num_cached, self._chunk_limit(budget, seq))
            if seq.unborn:
                num_new = min(num_new, seq.fork_point - num_cached)
            need = -(-(num_cached + num_new) // self.block_manager.block_size) - len(prefix)
            if need > self.block_manager.num_free_after_acquiring(prefix):
                break
            self.waiting.popleft()
            self.num_queued_tokens -= seq.num_queued_work
            self.block_manager.acquire_prefix(seq, prefix)
            seq.num_computed_tokens = num_cached
            if seq.first_scheduled_time is None:  # not on a recompute (preemption, failover)
                seq.first_scheduled_time = self.clock()
                seq.num_cached_tokens = num_cached
            self.block_manager.allocate(seq, num_cached + num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            step.new_seqs.append(
                NewSequence(
                    seq_id=seq.seq_id,
                    token_ids=seq.all_token_ids,
                    num_prompt_tokens=seq.num_prompt_tokens,
                    sampling_params=seq.sampling_params,
                    block_ids=list(seq.block_ids),
                    num_computed_tokens=num_cached,
                )
            )
            seq.is_known_to_worker = True
            if num_new:  # 0: a cached prefix reaches the fork point; its samples fork next step
                self._add_to_step(step, seq, num_new)
            budget -= num_new

    def _num_seats(self) -> int:
        """Sequences the running ones will be once forked (a beam search is num_beams)."""
        beams = {
            id(s.beam): s.sampling_params.num_beams for s in self.running if s.beam is not None
        }
        singles = sum(1 + len(s.unborn) for s in self.running if s.beam is None)
        return singles + sum(beams.values())

    def _chunk_limit(self, budget: int, seq: Sequence) -> int:
        chunk = self.config.prefill_chunk_size
        limit = budget if chunk is None else min(budget, chunk)
        if seq.prompt_logprobs is not None and seq.num_computed_tokens < seq.num_prompt_tokens:
            limit = min(limit, self._prompt_logits_left)  # each token is a row of logits
        return limit

    def _num_new_tokens(self, seq: Sequence, budget: int) -> int:
        if seq.beam is not None and seq.num_pending_tokens:
            return 0  # its next token is chosen in update(), with its beam search's others
        remaining = seq.num_tokens - seq.num_computed_tokens
        if seq.unborn:
            remaining = min(remaining, seq.fork_point - seq.num_computed_tokens)
        if remaining == 1 and not self._may_sample(seq):
            return 0  # its last sample already reaches a limit; it finishes on update
        return min(remaining, self._chunk_limit(budget, seq))

    def _may_sample(self, seq: Sequence) -> bool:
        """Whether computing the last token would yield a token the sequence may still emit."""
        max_tokens = seq.sampling_params.max_tokens
        if max_tokens is not None and seq.num_output_tokens >= max_tokens:
            return False
        return seq.num_tokens < self.max_model_len

    def _add_to_step(self, step: StepInput, seq: Sequence, num_new: int) -> None:
        if seq.prompt_logprobs is not None and seq.num_computed_tokens < seq.num_prompt_tokens:
            self._prompt_logits_left -= num_new
        step.seq_ids.append(seq.seq_id)
        step.num_scheduled_tokens.append(num_new)
        step.num_computed_tokens.append(seq.num_computed_tokens)
        seq.num_computed_tokens += num_new
        if seq.num_computed_tokens == seq.num_tokens:
            seq.num_pending_tokens += 1  # this step samples the next token

    def _preempt(self, seq: Sequence) -> None:
        """Free `seq`'s blocks and put it at the front of the queue for recompute (a beam: its
        whole beam search starts over)."""
        if seq.beam is not None:
            self._restart_beams(seq.beam)
            return
        self.running.remove(seq)
        self._dropped_seq_ids.append(seq.seq_id)
        self._reset_for_recompute(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.num_queued_tokens += seq.num_queued_work

    def _restart_beams(self, group: BeamGroup) -> None:
        for beam in list(group.live):
            self._drop(beam)
        root = group.restart()
        self.seqs[root.seq_id] = root
        self.waiting.appendleft(root)
        self.num_queued_tokens += root.num_queued_work
        self.num_preemptions += 1

    # ------------------------------------------------------------------ forks

    def _fork_samples(self, step: StepInput) -> None:
        """Fork the unborn samples of every running sequence that reached its fork point."""
        for parent in [s for s in self.running if s.unborn]:
            if parent.num_computed_tokens >= parent.fork_point:
                children, parent.unborn = parent.unborn, []
                for child in reversed(children):  # each goes right after the parent
                    child.fork_parent = None
                    self._fork(parent, child, step.forks)

    def _fork(self, parent: Sequence, child: Sequence, forks: list[Fork]) -> None:
        """Start `child` (a copy of `parent`'s tokens) running on `parent`'s blocks."""
        self.block_manager.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_tokens = parent.num_cached_tokens
        child.first_scheduled_time = parent.first_scheduled_time
        child.status = SequenceStatus.RUNNING
        child.is_known_to_worker = True
        self.seqs[child.seq_id] = child
        self.running.insert(self.running.index(parent) + 1, child)
        forks.append(Fork(child.seq_id, parent.seq_id, child.sampling_params))

    def _advance_beams(self, group: BeamGroup) -> None:
        """Run a beam search step: drop and fork beams (the worker hears next step)."""
        forks, dropped = group.advance()
        for beam in dropped:
            self._drop(beam)
        for parent, child in forks:
            self._fork(parent, child, self._forks)
        for beam in group.live:
            self._beam_token_ids[beam.seq_id] = beam.output_token_ids[-1]
            self.block_manager.cache_full_blocks(beam)
        if group.search.is_done:
            self.finished_beams.append(group)

    def _drop(self, seq: Sequence) -> None:
        """End a beam that leads nowhere (or whose search is done or starts over)."""
        del self.seqs[seq.seq_id]
        self._unlist(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def _reset_for_recompute(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.is_known_to_worker = False

    # ------------------------------------------------------------------ update

    def update(self, step_output: StepOutput) -> list[TokenEvent]:
        """Record sampled tokens and apply token-level finish rules.

        Sequences that finish here release their blocks. Tokens for sequences that already
        finished (a step that was in flight when they stopped) are ignored.
        """
        for seq_id, (start, entries) in step_output.prompt_logprobs.items():
            if seq_id in self.seqs:
                self.seqs[seq_id].add_prompt_logprobs(start, entries)
        events = []
        logprobs = step_output.logprobs or [None] * len(step_output.seq_ids)
        for seq_id, token_id, lp in zip(
            step_output.seq_ids, step_output.sampled_token_ids, logprobs
        ):
            seq = self.seqs.get(seq_id)
            if seq is None:
                continue
            seq.num_pending_tokens -= 1
            seq.output_token_ids.append(token_id)
            seq.output_logprobs.append(lp)
            if lp is not None:
                seq.cumulative_logprob += lp.logprob
            if seq.status is SequenceStatus.WAITING:  # preempted while this token was in flight
                self.num_queued_tokens += 1
            reason, stop_reason = seq.end_after(token_id, self.eos_token_ids, self.max_model_len)
            events.append(TokenEvent(seq, token_id, lp, reason))
            if reason is not None:
                self.finish(seq_id, reason, stop_reason)
            else:
                self.block_manager.cache_full_blocks(seq)
        self._update_beams(step_output)
        return events

    def _update_beams(self, step_output: StepOutput) -> None:
        for seq_id, token_ids, logprobs in zip(
            step_output.beam_seq_ids, step_output.beam_token_ids, step_output.beam_logprobs
        ):
            seq = self.seqs.get(seq_id)
            if seq is None:  # preempted (its search restarted) or aborted while in flight
                continue
            assert seq.beam is not None
            seq.num_pending_tokens -= 1
            if seq.beam.add_candidates(seq, token_ids, logprobs):
                self._advance_beams(seq.beam)
