"""Incremental detokenization and stop strings, one `Detokenizer` per sequence.

Text is released only once it is final: a token that ends inside a multi-byte character waits
for the rest of it, and when stop strings are set the last `len(longest stop) - 1` characters
are held back, so a stop string is never streamed (unless `include_stop_str_in_output`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_REPLACEMENT_CHAR = "\ufffd"
_PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first outputs, for correct spacing


def _decoder(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """`ids -> text`, as `tokenizer.decode` gives it.

    NOTE: a fast tokenizer's Rust backend is called directly when transformers would not
    post-process its output; the Python wrapper costs more than the decode itself (measured:
    ~15% of the router's CPU at 500 streams).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class Detokenizer:
    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool = True,
        stop: tuple[str, ...] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._decode = _decoder(tokenizer, skip_special_tokens)
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        context = prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]
        self._ids = list(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self.text = ""  # the output text so far (cut at a stop string once one matched)
        self._num_released = 0
        self._holdback = max((len(s) for s in stop), default=1) - 1

    def add_token(self, token_id: int) -> str | None:
        """Append one token's text. Returns the stop string it completed, if any."""
        self._ids.append(token_id)
        new_text = self._decode_pending(final=False)
        if not new_text:
            return None
        start = max(0, len(self.text) - self._holdback)
        self.text += new_text
        return self._find_stop(start)

    def mark_released(self, num_chars: int) -> None:
        """The first `num_chars` characters of the text were streamed already (a resumed
        stream): release only what follows them."""
        self._num_released = max(0, min(num_chars, len(self.text)))

    def flush(self) -> str | None:
        """At the end of a sequence: decode whatever waited for more bytes. Returns the stop
        string that text completed, if any (then the text is cut as `add_token` cuts it)."""
        new_text = self._decode_pending(final=True)
        if not new_text:
            return None
        start = max(0, len(self.text) - self._holdback)
        self.text += new_text
        return self._find_stop(start)

    def release(self, *, finished: bool) -> str:
        """The text not released yet that can no longer change (all of it once finished)."""
        end = (
            len(self.text) if finished else max(self._num_released, len(self.text) - self._holdback)
        )
        delta = self.text[self._num_released : end]
        self._num_released = end
        return delta

    def _decode_pending(self, *, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or (full.endswith(_REPLACEMENT_CHAR) and not final):
            return ""  # an incomplete character: wait for the next token
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(prefix) :]

    def _find_stop(self, start: int) -> str | None:
        if not self.stop:
            return None
        best: tuple[int, str] | None = None
        for s in self.stop:
            idx = self.text.find(s, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        idx, s = best
        self.text = self.text[: idx + len(s)] if self.include_stop else self.text[:idx]
        return s
