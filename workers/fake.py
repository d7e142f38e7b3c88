"""FakeWorker: the ModelWorker interface with no model, for scheduler tests and router load tests.

No torch. It checks every step against its own copy of each sequence (as the real worker does)
and "samples" a scripted token: `(last token * 31 + position) % vocab_size`, so outputs depend
only on a sequence's own tokens, like greedy decoding of a real model. `kvray serve --model
fake` runs it in every replica, with the built-in tokenizer, to load-test the router.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kvray.workers.config import WorkerConfig
from kvray.workers.protocol import StepInput, StepOutput, WorkerInfo


@dataclass
class _FakeSeq:
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int


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
        self.seqs: dict[int, _FakeSeq] = {}
        self.steps: list[StepInput] = []  # every step received, for tests to inspect

    @classmethod
    def from_config(
        cls, config: WorkerConfig, *, cache_dir: str | None = None, step_delay_s: float = 0.02
    ) -> FakeWorker:
        """A fake replica shaped by a WorkerConfig, speaking the built-in tokenizer's vocabulary."""
        from kvray.workers.tiny_model import resolve_tokenizer_only

        max_model_len = config.max_model_len or 2048
        return cls(
            num_kv_blocks=config.num_kv_blocks
            or config.max_num_seqs * -(-max_model_len // config.block_size),
            block_size=config.block_size,
            max_model_len=max_model_len,
            vocab_size=512,
            step_delay_s=step_delay_s,
            model_path=resolve_tokenizer_only(cache_dir=cache_dir),
        )

    def warmup(self) -> WorkerInfo:
        return self.info

    def health(self) -> bool:
        return True

    def step(self, step_input: StepInput) -> StepOutput:
        self.steps.append(step_input)
        for seq_id in step_input.finished_seq_ids:
            self.seqs.pop(seq_id, None)
        for req in step_input.new_requests:
            self.seqs[req.seq_id] = _FakeSeq(
                list(req.token_ids), list(req.block_ids), req.num_computed_tokens
            )
        for seq_id, block_ids in step_input.new_block_ids.items():
            self.seqs[seq_id].block_ids.extend(block_ids)
        out = StepOutput(step_id=step_input.step_id)
        bs = self.info.block_size
        for seq_id, n, computed in zip(
            step_input.seq_ids, step_input.num_scheduled_tokens, step_input.num_computed_tokens
        ):
            seq = self.seqs[seq_id]
            assert seq.num_computed_tokens == computed, (seq_id, seq.num_computed_tokens, computed)
            seq.num_computed_tokens += n
            assert seq.num_computed_tokens <= len(seq.token_ids), "computing an unknown token"
            assert len(seq.block_ids) * bs >= seq.num_computed_tokens, "too few blocks"
            if seq.num_computed_tokens == len(seq.token_ids):
                token = self.next_token(seq.token_ids, self.info.vocab_size)
                seq.token_ids.append(token)
                out.seq_ids.append(seq_id)
                out.sampled_token_ids.append(token)
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        return out

    @staticmethod
    def next_token(token_ids: list[int], vocab_size: int) -> int:
        return (token_ids[-1] * 31 + len(token_ids)) % vocab_size
