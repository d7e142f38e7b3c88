"""Structured output's compiled grammars and per-sequence state: each spec compiled once
(`GrammarCompiler`, a bounded LRU cache) and each sequence's place in its grammar
(`GrammarMatcher`), which follows the sequence's output tokens and is rebuilt from them; on a
worker, the engine on the model's tokenizer and each constrained sequence's grammar
(`WorkerGrammars`, `SequenceGrammar`).

No torch here: the router imports this to check a spec before it queues a request
(`cluster/structured_output.py`). Workers fill token bitmasks with it; `token_bitmask.py`
applies them to logits. The spec is `grammar_spec.py`'s, the engine `grammar_engine.py`'s.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvray.workers.grammar_engine import GrammarEngine, make_engine
from kvray.workers.grammar_spec import GrammarSpec
from kvray.workers.sampling_params import InvalidParameterError

logger = logging.getLogger(__name__)

# -- compiled grammars ------------------------------------------------------------------------


@dataclass
class CompilerStats:
    num_hits: int = 0
    num_misses: int = 0  # compiles, refused specs included
    num_evictions: int = 0
    num_entries: int = 0


class GrammarCompiler:
    """Compiles specs on one engine, keeping the last `max_entries` results (refusals too, so a
    client repeating a bad schema costs one compile). Thread-safe: compiles run on threads
    (llguidance releases the GIL while it compiles), two threads may compile one spec at once."""

    def __init__(self, engine: GrammarEngine, *, max_entries: int = 256) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.engine = engine
        self.max_entries = max_entries
        self.stats = CompilerStats()
        self._cache: OrderedDict[tuple[str, str], object | InvalidParameterError] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> object:
        """The engine's compiled grammar for `spec`, from the cache where it is there.

        Raises:
            InvalidParameterError: the engine refuses the spec; `param` is the spec's field.
        """
        key = (spec.kind, spec.spec)
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._cache.move_to_end(key)
                self.stats.num_hits += 1
        if entry is None:
            entry = self._compile(spec)
            self._put(key, entry)
        if isinstance(entry, InvalidParameterError):
            raise InvalidParameterError(spec.param, f"{spec.param}: {entry}")
        return entry

    def matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        """A matcher at the start of `spec`'s grammar (compiled here where it is not cached)."""
        return GrammarMatcher(self.engine, self.engine.matcher(self.compile(spec)))

    def _compile(self, spec: GrammarSpec) -> object | InvalidParameterError:
        try:
            return self.engine.compile(spec)
        except ValueError as exc:  # the engine's reason, first lines only
            reason = " ".join(str(exc).strip().splitlines()[:4])
            return InvalidParameterError(
                spec.param, f"unsupported or invalid {spec.kind}: {reason}"
            )

    def _put(self, key: tuple[str, str], entry: object) -> None:
        with self._lock:
            self.stats.num_misses += 1
            self._cache[key] = entry
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
                self.stats.num_evictions += 1
            self.stats.num_entries = len(self._cache)


# -- one sequence's state ---------------------------------------------------------------------


class GrammarMatcher:
    """Where one sequence's output stands in its grammar: a function of the output tokens alone,
    so a sequence recomputed after preemption, moved to another replica or resumed rebuilds it
    from its tokens (`rebuild`), and a fork copies it (`fork`)."""

    def __init__(self, engine: GrammarEngine, state: Any, num_tokens: int = 0) -> None:
        self._engine = engine
        self._state = state  # the engine's matcher
        self.num_tokens = num_tokens  # output tokens consumed

    def rebuild(self, token_ids: Sequence[int]) -> None:
        """Start over and consume `token_ids` (the sequence's output so far).

        Raises:
            ValueError: a token the grammar does not allow; the matcher is then at the start.
        """
        self._engine.reset(self._state)
        self.num_tokens = 0
        consumed = self._engine.consume(self._state, token_ids)
        if consumed < len(token_ids):
            self._engine.reset(self._state)
            raise ValueError(
                f"output token {token_ids[consumed]} (position {consumed}) is not allowed by the "
                "grammar"
            )
        self.num_tokens = consumed

    def catch_up(self, token_ids: Sequence[int], *, offset: int = 0) -> None:
        """Consume the tokens of `token_ids[offset:]` (the sequence's output so far) past
        `num_tokens`: the worker's sampled tokens and a beam's chosen ones, before the next
        mask.

        Raises:
            ValueError: a token the grammar does not allow (the matcher stops before it).
        """
        new = token_ids[offset + self.num_tokens :]
        consumed = self._engine.consume(self._state, new)
        self.num_tokens += consumed
        if consumed < len(new):
            raise ValueError(
                f"output token {new[consumed]} (position {self.num_tokens}) is not allowed by "
                "the grammar"
            )

    def advance(self, token_id: int) -> bool:
        """Consume one sampled token. False (the state unchanged) if the grammar forbids it."""
        if self._engine.consume(self._state, (token_id,)) != 1:
            return False
        self.num_tokens += 1
        return True

    def fill_mask(self, bitmask_row: Any) -> None:
        """Write the tokens allowed next into `bitmask_row`: a contiguous CPU int32 tensor of
        `ceil(vocab_size / 32)` words (`token_bitmask.allocate_token_bitmask`'s rows). Only
        end-of-sequence ids are allowed once the grammar is finished."""
        assert bitmask_row.is_contiguous() and bitmask_row.element_size() == 4
        self._engine.fill(self._state, bitmask_row.data_ptr(), bitmask_row.numel() * 4)

    @property
    def is_finished(self) -> bool:
        """Whether nothing but end of sequence may follow (or it has been consumed)."""
        return self._engine.is_stopped(self._state)

    @property
    def is_accepting(self) -> bool:
        """Whether the output so far is complete: end of sequence is allowed now."""
        return self._engine.is_accepting(self._state)

    def fork(self) -> GrammarMatcher:
        """An independent copy at the same place (a forked sample or beam)."""
        return GrammarMatcher(self._engine, self._engine.copy(self._state), self.num_tokens)


def fill_masks(matchers: Sequence[tuple[GrammarMatcher, int]], bitmask: Any) -> None:
    """Fill row `row` of `bitmask` (a contiguous CPU int32 tensor, [num_rows, words]) for each
    `(matcher, row)`, on the engine's threads: a step's masks in one call. The matchers share
    one engine."""
    if not matchers:
        return
    assert bitmask.is_contiguous() and bitmask.element_size() == 4 and bitmask.dim() == 2
    num_rows, row_bytes = bitmask.shape[0], bitmask.shape[1] * 4
    assert all(0 <= row < num_rows for _, row in matchers)
    engine = matchers[0][0]._engine
    rows = [(m._state, row) for m, row in matchers]
    engine.fill_rows(rows, bitmask.data_ptr(), row_bytes, num_rows)


# -- on a worker ------------------------------------------------------------------------------


class SequenceGrammar:
    """A worker sequence's grammar: its matcher, caught up with the sequence's output before
    each mask. An output that leaves its grammar (the sampler never samples such a token; a
    spec this worker could not compile) can only end: its mask then allows end of sequence
    alone, so a constraint is never dropped."""

    def __init__(self, matcher: GrammarMatcher | None) -> None:
        self.matcher = matcher  # None: the output can only end

    def follow(self, token_ids: Sequence[int], num_prompt_tokens: int) -> GrammarMatcher | None:
        """Catch up with the output (`token_ids[num_prompt_tokens:]`). Returns the matcher to
        fill the next mask from, or None where only end of sequence may follow."""
        matcher = self.matcher
        if matcher is None:
            return None
        try:
            matcher.catch_up(token_ids, offset=num_prompt_tokens)
        except ValueError as exc:
            # NOTE: a finished answer's mask allows only end of sequence; tokens after it were
            # sampled in steps the router sent before it saw the end, and it drops them.
            if matcher.is_finished:
                return matcher
            logger.error("an output left its grammar (%s); it can only end now", exc)
            self.matcher = None
        return self.matcher

    def fork(self) -> SequenceGrammar:
        """An independent copy (a forked sample or beam)."""
        return SequenceGrammar(None if self.matcher is None else self.matcher.fork())


class WorkerGrammars:
    """A worker's structured output: the engine on the model's tokenizer, its compiled specs
    (cached by spec) and a grammar for each constrained sequence when it arrives."""

    def __init__(self, engine: GrammarEngine, *, max_entries: int = 256) -> None:
        self.compiler = GrammarCompiler(engine, max_entries=max_entries)

    @classmethod
    def load(
        cls,
        model_path: str,
        *,
        revision: str | None,
        trust_remote_code: bool,
        vocab_size: int,
        eos_token_ids: Sequence[int],
    ) -> WorkerGrammars | None:
        """The engine on the tokenizer saved beside the model (as the router loads it). None,
        logged, where the model cannot constrain its output: no tokenizer, no end-of-sequence
        id to end a finished answer with, or a tokenizer the engine cannot take."""
        if not eos_token_ids:
            logger.info("structured output is off: the model has no end-of-sequence token")
            return None
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(
                model_path, revision=revision, trust_remote_code=trust_remote_code
            )
            engine = make_engine(tokenizer, vocab_size=vocab_size, eos_token_ids=eos_token_ids)
        except Exception as exc:  # NOTE: any failure here leaves the worker serving
            logger.warning(
                "structured output is off: no grammar engine for %s (%s)", model_path, exc
            )
            return None
        return cls(engine)

    def sequence_grammar(
        self, spec: GrammarSpec, output_token_ids: Sequence[int]
    ) -> SequenceGrammar:
        """The grammar of a sequence that arrives (new, or sent again whole after a
        preemption, a failover or a resume), rebuilt from the output it already has."""
        try:
            matcher = self.compiler.matcher(spec)
            matcher.rebuild(output_token_ids)
        except ValueError as exc:  # (InvalidParameterError too) the router's check passed
            logger.error("a sequence's grammar failed on this worker (%s); it can only end", exc)
            return SequenceGrammar(None)
        return SequenceGrammar(matcher)
