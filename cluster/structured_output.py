"""The router's check of a request's grammar, before anything is queued: the spec is compiled
(once per spec: a bounded cache) on threads of its own, never on the event loop, and a resumed
sample's tokens are replayed through it. Workers compile their own copy to mask with
(docs/adr/0015); what passes here compiles there.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kvray.workers.grammar_engine import DEFAULT_ENGINE, make_engine
from kvray.workers.grammar_spec import GrammarSpec
from kvray.workers.protocol import InvalidParameterError, WorkerInfo
from kvray.workers.structured_output import CompilerStats, GrammarCompiler

# NOTE: llguidance releases the GIL while it compiles, so each compile thread can keep a core
# busy: leave one for the event loop (on 2 cores, two threads compiling 20 schemas at once
# delayed the loop by 4.2 ms, one thread by 1.1 ms; bench/structured_output.py --part stall).
NUM_COMPILE_THREADS = max(1, min(2, len(os.sched_getaffinity(0)) - 1))


class GrammarChecker:
    """Checks `GrammarSpec`s against the served model's tokenizer. The engine's tokenizer index
    (seconds for a large vocabulary) is built on the first check, on a compile thread."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        max_entries: int = 256,
        engine: str = DEFAULT_ENGINE,
    ) -> None:
        self._make = lambda: GrammarCompiler(
            make_engine(tokenizer, vocab_size=vocab_size, eos_token_ids=eos_token_ids, name=engine),
            max_entries=max_entries,
        )
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()
        self._threads = ThreadPoolExecutor(NUM_COMPILE_THREADS, thread_name_prefix="kvray-grammar")

    @classmethod
    def for_model(cls, info: WorkerInfo, tokenizer: Any | None) -> GrammarChecker | None:
        """A checker for the served model, or None where it cannot constrain its output (no
        tokenizer here, or workers without a grammar engine: `cannot_constrain` says which)."""
        if tokenizer is None or not info.can_constrain_output:
            return None
        return cls(tokenizer, vocab_size=info.vocab_size, eos_token_ids=info.eos_token_ids)

    async def check(
        self, spec: GrammarSpec, resumed: Mapping[int, Sequence[int]] | None = None
    ) -> None:
        """Compile `spec` off the event loop and replay each resumed sample's output tokens
        (`resumed`: sample index -> the tokens it had).

        Raises:
            InvalidParameterError: the engine refuses the spec (`param`: the spec's field), or a
                resumed sample holds a token the grammar forbids (`param`: "resume").
        """
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._threads, self.check_sync, spec, resumed)

    def check_sync(
        self, spec: GrammarSpec, resumed: Mapping[int, Sequence[int]] | None = None
    ) -> None:
        """`check` on the caller's thread (tests, the offline LLM)."""
        compiler = self.compiler()
        compiler.compile(spec)
        for index, token_ids in (resumed or {}).items():
            try:
                compiler.matcher(spec).rebuild(token_ids)
            except ValueError as exc:
                raise InvalidParameterError(
                    "resume", f"resumed sample {index} does not follow {spec.param}: {exc}"
                ) from None

    def compiler(self) -> GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                self._compiler = self._make()
            return self._compiler

    @property
    def stats(self) -> CompilerStats:
        """Cache hits and compiles so far (nothing before the first check)."""
        return self._compiler.stats if self._compiler is not None else CompilerStats()

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)


def cannot_constrain(spec: GrammarSpec, *, has_tokenizer: bool) -> InvalidParameterError:
    """The error for a constrained request to a model that cannot constrain its output."""
    reason = (
        "its workers have no grammar engine (the fake model has none; a model needs its "
        "tokenizer and an end-of-sequence token)"
        if has_tokenizer
        else "it has no tokenizer"
    )
    return InvalidParameterError(
        spec.param, f"{spec.param}: this model cannot constrain its output: {reason}"
    )
