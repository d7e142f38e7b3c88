"""FakeWorker: the ModelWorker interface with no model, for scheduler tests and router load tests.

No torch. It checks every step against its own copy of each sequence (as the real worker does)
and "samples" a scripted token: `(last token * 31 + position) % vocab_size`, so outputs depend
only on a sequence's own tokens, like greedy decoding of a real model (a beam gets that token
and the ones after it as candidates). `kvray serve --model
fake` runs it in every replica, with the built-in tokenizer, to load-test the router.
A step sleeps `step_delay_s + token_delay_s * tokens it computes`, so prompt tokens served from
the prefix cache (never scheduled) cost nothing, as on a real model.
"""

from __future__ import annotations

import time

from kvray.workers.config import EngineConfig
from kvray.workers.protocol import StepInput, StepOutput, WorkerInfo
from kvray.workers.sequences import SequenceTable


class FakeWorker:
    def __init__(
        self,
        *,
        num_kv_blocks: int = 256,
        block_size: int = 16,
        max_model_len: int = 2048,
        vocab_size: int = 1000,
        eos_token_ids: tuple[int, ...] = (),
        step_delay_s: float = 0.0,
        token_delay_s: float = 0.0,
        model_path: str = "fake",
    ) -> None:
        self.info = WorkerInfo(
            model=model_path,
            device="cpu",
            dtype="none",
            vocab_size=vocab_size,
            max_model_len=max_model_len,
            eos_token_ids=eos_token_ids,
            block_size=block_size,
            num_kv_blocks=num_kv_blocks,
            kv_cache_bytes=0,
            weights_bytes=0,
        )
        self.step_delay_s = step_delay_s
        self.token_delay_s = token_delay_s  # per token computed (`StepInput.num_tokens`)
        self.table = SequenceTable()
        self.steps: list[StepInput] = []  # every step received, for tests to inspect

    @classmethod
    def from_config(
        cls, config: EngineConfig, *, step_delay_s: float = 0.02, token_delay_s: float = 0.0
    ) -> FakeWorker:
        """A fake replica shaped by an EngineConfig, speaking the built-in tokenizer's vocabulary."""
        from kvray.workers.checkpoints import resolve_tokenizer_only

        worker = config.worker
        max_model_len = worker.max_model_len or 2048
        return cls(
            num_kv_blocks=worker.num_kv_blocks
            or config.scheduler.max_num_seqs * -(-max_model_len // worker.block_size),
            block_size=worker.block_size,
            max_model_len=max_model_len,
            vocab_size=512,
            step_delay_s=step_delay_s,
            token_delay_s=token_delay_s,
            model_path=resolve_tokenizer_only(cache_dir=config.cache_dir),
        )

    def warmup(self) -> WorkerInfo:
        return self.info

    def health(self) -> bool:
        return True

    def step(self, step_input: StepInput) -> StepOutput:
        self.steps.append(step_input)
        seqs = self.table.apply(step_input)
        self.table.advance(seqs, step_input)
        out = StepOutput(step_id=step_input.step_id)
        bs = self.info.block_size
        for seq_id, seq in zip(step_input.seq_ids, seqs):
            assert len(seq.block_ids) * bs >= seq.num_computed_tokens, "too few blocks"
            if seq.num_computed_tokens != len(seq.token_ids):
                continue
            token = self.next_token(seq.token_ids, self.info.vocab_size)
            if (
                seq.sampling_params.num_beams > 1
            ):  # candidates: the scripted token first, then others
                width = seq.sampling_params.num_beam_candidates(self.info.eos_token_ids)
                out.beam_seq_ids.append(seq_id)
                out.beam_token_ids.append(
                    [(token + i) % self.info.vocab_size for i in range(width)]
                )
                out.beam_logprobs.append([-0.5 * (i + 1) for i in range(width)])
                continue
            seq.token_ids.append(token)
            out.seq_ids.append(seq_id)
            out.sampled_token_ids.append(token)
        delay_s = self.step_delay_s + self.token_delay_s * step_input.num_tokens
        if delay_s:
            time.sleep(delay_s)
        return out

    @staticmethod
    def next_token(token_ids: list[int], vocab_size: int) -> int:
        return (token_ids[-1] * 31 + len(token_ids)) % vocab_size
