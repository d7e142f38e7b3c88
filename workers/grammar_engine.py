"""Grammar engines behind one protocol: `GrammarEngine` compiles a `GrammarSpec` on one
tokenizer and drives the engine's matchers; `make_engine` picks one by name (llguidance only,
docs/adr/0015), importing it on first use. No torch: masks are written through raw addresses.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from kvray.workers.grammar_spec import GrammarSpec, compact_json

DEFAULT_ENGINE = "llguidance"


class GrammarEngine(Protocol):
    """A grammar engine on one tokenizer. `compile` raises ValueError with the engine's reason
    for a grammar it cannot take; the matcher methods take what `matcher` returned."""

    eos_token_ids: tuple[int, ...]

    def compile(self, spec: GrammarSpec) -> object: ...
    def matcher(self, compiled: object) -> Any: ...
    def copy(self, matcher: Any) -> Any: ...
    def reset(self, matcher: Any) -> None: ...
    def consume(self, matcher: Any, token_ids: Sequence[int]) -> int: ...
    def fill(self, matcher: Any, address: int, num_bytes: int) -> None: ...
    def fill_rows(
        self, rows: list[tuple[Any, int]], address: int, row_bytes: int, num_rows: int
    ) -> None: ...
    def is_accepting(self, matcher: Any) -> bool: ...
    def is_stopped(self, matcher: Any) -> bool: ...


class LLGuidanceEngine:
    """llguidance: JSON schemas, regexes and Lark/GBNF grammars, masks computed lazily per token
    (no per-grammar precomputation), bounded work per compile and per mask (its parser limits).

    JSON is generated without whitespace between tokens (`whitespace_flexible` off: "," and
    ":"), so a small model cannot loop on newlines inside an answer.
    """

    def __init__(self, tokenizer: Any, *, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        import llguidance
        import llguidance.hf

        self._ll = llguidance
        own_eos = tokenizer.eos_token_id
        self.eos_token_ids = tuple(eos_token_ids) or (() if own_eos is None else (own_eos,))
        # NOTE: ~1-3 s for a 50k vocabulary (a token trie): build once per process.
        self._tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=vocab_size, eos_token=list(self.eos_token_ids) or None
        )
        self._executor: Any = None  # llguidance's thread pool for batches, made on first use

    def compile(self, spec: GrammarSpec) -> object:
        from llguidance import LLMatcher, grammar_from

        if spec.kind in ("json_schema", "json_object"):
            schema = spec.spec or '{"type":"object"}'
            grammar = LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False}
            )
        elif spec.kind == "choice":
            choices = json.loads(spec.spec)
            grammar = LLMatcher.grammar_from_lark(
                "start: " + " | ".join(map(compact_json, choices))
            )
        elif spec.kind == "regex":
            grammar = LLMatcher.grammar_from_regex(spec.spec)
        else:  # Lark, or GBNF turned into Lark
            grammar = grammar_from("grammar", spec.spec)
        # The template every sequence's matcher copies: the compiled grammar lives in it.
        template = LLMatcher(self._tokenizer, grammar, log_level=0)
        if template.is_error():
            raise ValueError(template.get_error())
        return template

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def copy(self, matcher: Any) -> Any:
        return matcher.deep_copy()

    def reset(self, matcher: Any) -> None:
        matcher.reset()

    def consume(self, matcher: Any, token_ids: Sequence[int]) -> int:
        # NOTE: try_consume_tokens stops short of end of sequence (and never errs the matcher,
        # unlike consume_token): one end-of-sequence id, where the grammar is complete, is last.
        end = next((i for i, t in enumerate(token_ids) if t in self.eos_token_ids), None)
        num = int(matcher.try_consume_tokens(list(token_ids[:end])))
        if end is None or num < end or not matcher.is_accepting():
            return num
        return num + int(matcher.consume_token(token_ids[end]))

    def fill(self, matcher: Any, address: int, num_bytes: int) -> None:
        matcher.unsafe_compute_mask_ptr(address, num_bytes)

    def fill_rows(
        self, rows: list[tuple[Any, int]], address: int, row_bytes: int, num_rows: int
    ) -> None:
        if self._executor is None:
            self._executor = self._ll.LLExecutor()
        self._executor.unsafe_compute_mask_ptr(rows, address, row_bytes, num_rows)

    def is_accepting(self, matcher: Any) -> bool:
        return bool(matcher.is_accepting())

    def is_stopped(self, matcher: Any) -> bool:
        return bool(matcher.is_stopped())


ENGINES: dict[str, Callable[..., GrammarEngine]] = {"llguidance": LLGuidanceEngine}


def make_engine(
    tokenizer: Any,
    *,
    vocab_size: int,
    eos_token_ids: Sequence[int],
    name: str = DEFAULT_ENGINE,
) -> GrammarEngine:
    """The named engine on a Hugging Face fast tokenizer (a logits row has `vocab_size`
    entries; `eos_token_ids` end a sequence and are what a finished grammar allows)."""
    if name not in ENGINES:
        raise ValueError(f"grammar engine must be one of {', '.join(ENGINES)}, got {name!r}")
    return ENGINES[name](tokenizer, vocab_size=vocab_size, eos_token_ids=eos_token_ids)
