"""Decode steps as replays of a forward prepared at warmup.

A decode-only step (every sequence computes one token) of n sequences is padded to the
smallest prepared batch size b >= n and runs the forward prepared for b on persistent input
buffers, instead of thousands of Python-level operator calls:

- CUDA: a CUDA graph per batch size, captured at warmup (milliseconds each). The attention is
  the Triton paged kernel, which reads its context lengths on the device.
- CPU (opt-in): one `torch.compile` (inductor, weights frozen) with a symbolic batch size,
  compiled at warmup for every size up to `max_batch` at once (a one-sequence step is padded
  to 2). A start with it took 170 s with empty caches and 68 s with inductor's disk cache
  (SmolLM2-135M, 2 cores, ADR 0010). The attention is kvray's C++ kernel, traced as an opaque
  op.

Padding rows compute token 0 at position 0, write their key/value into the cache's
`null_block` and attend over that slot only; their logits are dropped. Prompt chunks and mixed
steps keep the eager path, where the arithmetic, not the overhead, dominates.
"""

from __future__ import annotations

import functools
import logging
import time
import types
from collections.abc import Callable

import torch

from kvray.workers import device as devices
from kvray.workers.attention import AttentionMetadata, DecodeKernel, attention_context
from kvray.workers.kv_cache import KVCache
from kvray.workers.llama_family import Forward

logger = logging.getLogger(__name__)


def batch_sizes(max_batch: int, device: torch.device) -> list[int]:
    """The batch sizes a decode step is padded to. CUDA (a graph per size): 1, 2, 4, 8, then
    every multiple of 16 up to `max_batch`. CPU (one graph for all): every size from 2 up; one
    sequence runs padded to two, as Dynamo would compile a second graph, for size 1 alone."""
    if device.type != "cuda":
        return list(range(min(2, max_batch), max_batch + 1))
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    sizes += list(range(16, max_batch, 16))
    return [*sizes, max_batch]


class DecodeGraphs:
    """Persistent inputs and the prepared forwards (CUDA: one per batch size; CPU: one for all),
    for one model and cache."""

    def __init__(
        self,
        forward: Forward,
        kv_cache: KVCache,
        kernel: DecodeKernel,
        device: torch.device,
        max_batch: int,
        max_model_len: int,
    ) -> None:
        self.forward = forward  # the model's forward (workers/llama_family.py)
        self.device = device
        self._cuda = device.type == "cuda"
        self.block_size = bs = kv_cache.block_size
        self.null_block = kv_cache.null_block
        self.kv_caches, self.kernel = kv_cache.layers, kernel
        self.sizes = batch_sizes(max_batch, device)
        width = -(-max_model_len // bs)  # NOTE: the kernels read only a sequence's own blocks
        n = self.sizes[-1]
        # One buffer, so a step is one copy: rows token ids, positions, slots, context lengths.
        # A padding row's column: token 0 at position 0, in the null block, attending one slot.
        self._padding = torch.tensor([[0], [0], [self.null_block * bs], [1]], device=device)
        self._columns = self._padding.repeat(1, n)
        self.input_ids = self._columns[0:1]  # [1, n]
        self.positions = self._columns[1:2]  # [1, n]
        self.slots = self._columns[2]
        self.context_lens = self._columns[3]
        self.block_table = torch.full((n, width), self.null_block, dtype=torch.long, device=device)
        self._replays: dict[int, Callable[[], torch.Tensor]] = {}
        self.num_replays = 0  # decode steps run as replays (the tests read it)

    def batch_size(self, num_seqs: int) -> int | None:
        """The prepared batch size a decode step of `num_seqs` runs at, or None (eager)."""
        return next((b for b in self.sizes if b >= num_seqs), None)

    def _forward(self, batch: int) -> torch.Tensor:  # [1, batch, vocab]
        """The model's forward over the first `batch` rows of the buffers (all rows' logits).
        Under torch.compile on CPU `batch` is symbolic: everything here slices by it."""
        metadata = AttentionMetadata(
            slot_mapping=self.slots[:batch],
            block_size=self.block_size,
            num_decodes=batch,
            decode_block_ids=self.block_table[:batch].reshape(-1),
            decode_positions=self.positions[0, :batch],
            prefills=[],
            kv_caches=self.kv_caches,
            decode_kernel=self.kernel,
            decode_context_lens=self.context_lens[:batch],
        )
        with attention_context(metadata):
            return self.forward(self.input_ids[:, :batch], self.positions[:, :batch], 0)

    @torch.inference_mode()
    def build(self) -> bool:
        """Prepare every batch size (at warmup). False on failure, with a warning: the caller
        keeps eager steps."""
        started = time.perf_counter()
        try:
            if self._cuda:
                self._capture_cuda_graphs()
            else:
                self._compile()
        except Exception as e:  # a capture or compile failure: slower, never broken
            logger.debug("decode graphs failed", exc_info=True)
            self._replays.clear()
            logger.warning(
                "decode graphs failed (%s: %s); decode steps run eagerly",
                type(e).__name__,
                str(e).strip().splitlines()[0] if str(e).strip() else "",
            )
            return False
        sizes = self.sizes if self._cuda else f"{self.sizes[0]}..{self.sizes[-1]}"
        logger.info("decode graphs ready for batch sizes %s in %.1f s", sizes,
                    time.perf_counter() - started)  # fmt: skip
        return True

    def _capture_cuda_graphs(self) -> None:
        pool = None
        for b in reversed(self.sizes):  # the largest first: the smaller ones reuse its memory
            self._forward(b)  # NOTE: outside capture: Triton compiles its kernel on first use
            self._replays[b], pool = devices.capture_graph(
                functools.partial(self._forward, b), self.device, pool=pool
            )
        devices.synchronize(self.device)

    def _compile(self) -> None:
        import torch._dynamo
        import torch._inductor.config

        # NOTE: one graph with a symbolic batch size serves every size: one compile where a
        # graph per size cost ~40 s each, and steps of 32 sequences replay as well as steps of
        # one (bench/step_ab.py: 1.89x eager at 1, 1.68x at 8, 1.27x at 32). The forward is
        # this instance's own copy of the function: Dynamo keeps its graphs per code object, so
        # another engine's graphs (other weights, frozen in) are never candidates, and the
        # replays can skip the guards.
        code = DecodeGraphs._forward.__code__.replace()
        forward = types.MethodType(types.FunctionType(code, globals(), "_forward"), self)
        compiled = torch.compile(forward, dynamic=True)
        # NOTE: freezing makes the weights constants, so inductor keeps the packed layouts of
        # workers/packed_linear.py (and packs the rest); emulated precision casts round bf16
        # intermediates where eager does, so replays give the eager step's tokens. Both apply
        # while compiling, which the first call does; the largest size must then reuse it.
        with torch._inductor.config.patch(freezing=True, emulate_precision_casts=True):
            compiled(self.sizes[0])
            with torch._dynamo.config.patch(error_on_recompile=True):
                compiled(self.sizes[-1])
        for b in self.sizes:
            self._replays[b] = _call(compiled, b)

    def run(self, seqs: list[tuple[int, int, list[int]]], batch: int) -> torch.Tensor:
        """One decode step of `seqs` (token id, position, block ids) padded to `batch`: the
        logits of `seqs`' tokens, [len(seqs), vocab] (a view; valid until the next run)."""
        n, bs = len(seqs), self.block_size
        width = max(position // bs for _, position, _ in seqs) + 1
        columns = torch.tensor(
            [
                (token, position, blocks[position // bs] * bs + position % bs, position + 1)
                for token, position, blocks in seqs
            ]
        ).T  # [4, n]: token ids, positions, slots, context lengths
        table = torch.tensor([blocks[:width] + [0] * (width - len(blocks)) for *_, blocks in seqs])
        self._columns[:, :n].copy_(columns)
        self.block_table[:n, :width].copy_(table)
        if n < batch:  # NOTE: rows left from a bigger step would write into real sequences
            self._columns[:, n:batch] = self._padding
            self.block_table[n:batch, 0] = self.null_block
        self.num_replays += 1
        return self._replays[batch]()[0, :n]


def _call(compiled: Callable[[int], torch.Tensor], batch: int) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        # NOTE: every size was compiled at warmup, and only those sizes are called, which is
        # what skipping the guards needs: Dynamo then checks only what tells the sizes (and
        # engines) apart, not every module attribute: 12.7 against 14.5 ms a step at one stream.
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return compiled(batch)

    return call
