"""EngineCore: the router-side half of one replica, with no knowledge of where its worker runs.

It owns the replica's scheduler and block manager, queues the requests placed on the replica,
and turns each step's output into text chunks (detokenized, stop strings applied). A ranked
request (beam search, best_of > n) sends nothing until it ends, then its n best samples, one
chunk each. The offline `LLM` steps it with an in-process worker; the cluster's `StepLoop`
steps it over Ray.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from kvray.cluster.beam_search import BeamGroup
from kvray.cluster.block_manager import BlockManager
from kvray.cluster.chunks import CompletionChunk
from kvray.cluster.request import Request
from kvray.cluster.scheduler import Scheduler, TokenEvent
from kvray.cluster.sequence import FinishReason, Sequence
from kvray.workers.config import SchedulerConfig
from kvray.workers.protocol import Logprobs, StepInput, StepOutput, WorkerInfo


class EngineCore:
    def __init__(
        self,
        info: WorkerInfo,
        config: SchedulerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.info = info
        self.block_manager = BlockManager(
            info.num_kv_blocks, info.block_size, enable_prefix_caching=config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            config,
            self.block_manager,
            max_model_len=info.max_model_len,
            eos_token_ids=info.eos_token_ids,
            clock=clock,
        )
        self._requests: dict[str, Request] = {}
        # Prompt blocks of the requests queued or running here, by hash: soon cached (or being
        # computed), so placement counts them as this replica's (`num_prefix_blocks`)
        self._incoming_hashes: Counter[int] = Counter()
        self.num_finished_requests = 0
        self.step_seconds = 0.0  # the worker's time in steps (StepOutput.forward_s)
        self.mask_seconds = 0.0  # of which structured output's masks (StepOutput.mask_s)

    # ------------------------------------------------------------------ requests

    def add(self, request: Request) -> None:
        """Queue a request: a new one (from the input processor), or one taken from another
        replica, whose unfinished sequences are recomputed from prompt + streamed tokens.

        Raises:
            ValueError: its request_id is already queued here.
        """
        if request.request_id in self._requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self._requests[request.request_id] = request
        held = self.num_prefix_blocks(request.prompt_hashes) * self.block_manager.block_size
        self._incoming_hashes.update(request.prompt_hashes)
        if request.beam is not None:  # new, or moved here: the search starts over
            root = request.beam.restart()
            root.num_held_tokens = held
            self.scheduler.add(root)
            return
        for seq in request.seqs:
            if not seq.is_finished:
                seq.num_held_tokens = held
                self.scheduler.add(seq)

    def release(self, request: Request) -> Request:
        """Remove one request for another replica to `add`; its KV state here is dropped."""
        self._forget(request)
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.remove(seq.seq_id)
        return request

    def take_unfinished(self) -> list[Request]:
        """Remove every unfinished request, for another replica to continue (failover, drain).

        Their sequences keep their prompt, streamed tokens and text state; KV state is dropped.
        """
        return [self.release(request) for request in list(self._requests.values())]

    def queued_requests(self) -> list[Request]:
        """Queued requests that hold nothing here (`Request.is_movable`), in queue order."""
        seen: set[str] = set()
        movable = []
        for seq in self.scheduler.waiting:
            request = self._requests.get(seq.request_id)
            if request is None or request.request_id in seen:
                continue
            seen.add(request.request_id)
            if request.is_movable:
                movable.append(request)
        return movable

    def abort(self, request_id: str) -> list[CompletionChunk]:
        """End every sequence of a request now; returns their final (ABORT) chunks."""
        request = self._requests.get(request_id)
        if request is None:
            return []
        chunks = []
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq.seq_id, FinishReason.ABORT)
                chunks.append(self._final_chunk(seq, [], None))
        if not request.sampling_params.is_ranked:
            return self._deliver(chunks)
        self._forget(request)
        self.num_finished_requests += 1
        return [
            self._first(
                request,
                CompletionChunk(
                    request_id,
                    index,
                    [],
                    "",
                    finish_reason=FinishReason.ABORT,
                    num_prompt_tokens=len(request.prompt_token_ids),
                ),
            )
            for index in range(request.num_outputs)
        ]

    def abort_all(self) -> list[CompletionChunk]:
        return [c for request_id in list(self._requests) for c in self.abort(request_id)]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ steps

    def schedule(self) -> StepInput:
        return self.scheduler.schedule()

    def process(self, step_output: StepOutput) -> list[CompletionChunk]:
        """Apply one step's output: record tokens, stop rules, one chunk per sequence (ranked
        requests: their n best samples once they end)."""
        self.step_seconds += step_output.forward_s
        self.mask_seconds += step_output.mask_s
        chunks = [self._chunk(event) for event in self.scheduler.update(step_output)]
        for group in self.scheduler.finished_beams:
            chunks.extend(self._beam_results(group))
        self.scheduler.finished_beams.clear()
        return self._deliver(chunks)

    def _deliver(self, chunks: list[CompletionChunk]) -> list[CompletionChunk]:
        """What goes out: ranked requests' chunks are kept until the request ends; a request's
        first chunk carries its prompt logprobs; a finished request is forgotten."""
        out = []
        touched: dict[str, Request] = {}
        for chunk in chunks:
            request = touched[chunk.request_id] = self._requests[chunk.request_id]
            if request.is_best_of:
                previous = request.outputs.get(chunk.index)
                request.outputs[chunk.index] = chunk if previous is None else previous.merge(chunk)
            else:
                out.append(self._first(request, chunk))
        for request in touched.values():
            if request.is_finished:
                if request.is_best_of:
                    out.extend(self._first(request, c) for c in self._best_samples(request))
                self._forget(request)
                self.num_finished_requests += 1
        return out

    def _forget(self, request: Request) -> None:
        del self._requests[request.request_id]
        self._incoming_hashes.subtract(request.prompt_hashes)
        for block_hash in request.prompt_hashes:
            if self._incoming_hashes[block_hash] <= 0:
                del self._incoming_hashes[block_hash]

    def num_prefix_blocks(self, hashes: list[int]) -> int:
        """How many leading prompt blocks `hashes` (`block_manager.prefix_hashes`) this replica
        holds for a new request: cached, or coming (the prompt of a request queued or running
        here: computed before a request placed behind it would be). Read only."""
        return self.block_manager.num_cached_blocks(hashes, also=self._incoming_hashes)

    @staticmethod
    def _first(request: Request, chunk: CompletionChunk) -> CompletionChunk:
        if not request.has_streamed:
            request.has_streamed = True
            chunk.prompt_logprobs = request.prompt_logprobs
        return chunk

    @staticmethod
    def _best_samples(request: Request) -> list[CompletionChunk]:
        """best_of: the n samples with the highest cumulative logprob, as chunks 0..n-1."""
        ranked = sorted(
            request.outputs.values(), key=lambda c: (-(c.cumulative_logprob or 0.0), c.index)
        )
        asked = request.sampling_params.logprobs is not None
        return [
            replace(chunk, index=rank, logprobs=chunk.logprobs if asked else None)
            for rank, chunk in enumerate(ranked[: request.num_outputs])
        ]

    def _beam_results(self, group: BeamGroup) -> list[CompletionChunk]:
        """A finished beam search's n best beams, as chunks 0..n-1."""
        t = group.template
        chunks = []
        for rank, hyp in enumerate(group.search.results(t.sampling_params.n)):
            text = ""
            if group.make_detokenizer is not None:
                detok = group.make_detokenizer()
                for token_id in hyp.token_ids:
                    detok.add_token(token_id)
                detok.flush()
                text = detok.release(finished=True)
            stop = hyp.stop_token_id
            chunks.append(
                CompletionChunk(
                    t.request_id,
                    rank,
                    hyp.token_ids,
                    text,
                    finish_reason=FinishReason.LENGTH if stop is None else FinishReason.STOP,
                    stop_reason=stop if stop in t.sampling_params.stop_token_ids else None,
                    num_prompt_tokens=t.num_prompt_tokens,
                    num_output_tokens=len(hyp.token_ids),
                    num_cached_tokens=t.num_cached_tokens,
                    first_scheduled_time=t.first_scheduled_time,
                    cumulative_logprob=hyp.cumulative_logprob,
                )
            )
        return chunks

    def step(self, execute: Callable[[StepInput], StepOutput]) -> list[CompletionChunk]:
        """One step, synchronously: schedule, `execute` it (a worker's `step`), process.

        The cluster's `StepLoop` does the same with a step in flight; see `step_loop.py`.
        """
        return self.process(execute(self.schedule()))

    def _chunk(self, event: TokenEvent) -> CompletionChunk:
        seq = event.seq
        logprobs = [event.logprobs] if seq.sampling_params.logprobs is not None else None
        detok = seq.detokenizer
        stop = detok.add_token(event.token_id) if detok is not None else None
        if stop is not None:
            if seq.is_finished:  # a token rule ended it too; the stop string wins
                seq.finish_reason, seq.stop_reason = FinishReason.STOP, stop
            else:
                self.scheduler.finish(seq.seq_id, FinishReason.STOP, stop)
        if seq.is_finished:
            return self._final_chunk(seq, [event.token_id], logprobs)
        return CompletionChunk(
            seq.request_id,
            seq.index,
            [event.token_id],
            detok.release(finished=False) if detok is not None else "",
            logprobs,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=len(seq.output_token_ids),
        )

    def _final_chunk(
        self, seq: Sequence, token_ids: list[int], logprobs: list[Logprobs | None] | None
    ) -> CompletionChunk:
        detok = seq.detokenizer
        text = ""
        if detok is not None:
            if seq.finish_reason is not FinishReason.STOP or not isinstance(seq.stop_reason, str):
                stop = detok.flush()  # the last text can complete a stop string too
                if stop is not None and seq.finish_reason is not FinishReason.ABORT:
                    seq.finish_reason, seq.stop_reason = FinishReason.STOP, stop
            text = detok.release(finished=True)
        return CompletionChunk(
            seq.request_id,
            seq.index,
            token_ids,
            text,
            logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=len(seq.output_token_ids),
            num_cached_tokens=seq.num_cached_tokens,
            first_scheduled_time=seq.first_scheduled_time,
            cumulative_logprob=seq.cumulative_logprob
            if seq.sampling_params.logprobs is not None
            else None,
        )
