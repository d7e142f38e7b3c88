"""A request's token constraints checked against the model (logit_bias, allowed_token_ids and
bad_words name tokens of its vocabulary), and bad_words turned into token ids, in the router
before anything is queued. The worker applies them (`workers/token_constraints.py`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from kvray.workers.protocol import (
    MAX_BAD_WORDS,
    MAX_BAD_WORDS_TOKENS,
    InvalidParameterError,
    SamplingParams,
    WorkerInfo,
)


def check_token_constraints(
    sampling_params: SamplingParams, info: WorkerInfo, *, has_tokenizer: bool
) -> None:
    """Model-dependent checks on top of SamplingParams' own.

    Raises:
        InvalidParameterError: an id outside the vocabulary, bad_words without a tokenizer, or
            allowed ids that all end the sequence while min_tokens forbids ending it.
    """
    vocab_size = info.vocab_size
    outside = [t for t, _ in sampling_params.logit_bias if t >= vocab_size]
    if outside:
        raise InvalidParameterError(
            "logit_bias",
            f"logit_bias names token ids outside the vocabulary [0, {vocab_size}): {outside[:8]}",
        )
    allowed = sampling_params.allowed_token_ids
    outside = [t for t in allowed if t >= vocab_size]
    if outside or len(allowed) > vocab_size:
        raise InvalidParameterError(
            "allowed_token_ids",
            f"allowed_token_ids must hold at most {vocab_size} ids in [0, {vocab_size}); got "
            f"{len(allowed)} ids" + (f", {outside[:8]} outside" if outside else ""),
        )
    if allowed and sampling_params.min_tokens:
        eos = () if sampling_params.ignore_eos else info.eos_token_ids
        if set(allowed) <= {*sampling_params.stop_token_ids, *eos}:
            raise InvalidParameterError(
                "allowed_token_ids",
                f"every id in allowed_token_ids ends the sequence, which min_tokens "
                f"({sampling_params.min_tokens}) forbids: nothing could be generated; allow "
                "another token or drop min_tokens",
            )
    if sampling_params.bad_words and not has_tokenizer:
        raise InvalidParameterError(
            "bad_words", "bad_words need a tokenizer; this model has none (use logit_bias)"
        )


def with_bad_words_token_ids(
    sampling_params: SamplingParams, tokenizer: Any | None, info: WorkerInfo
) -> SamplingParams:
    """The parameters with `bad_words_token_ids` made from `bad_words` (what was there is
    replaced): each word as it starts a text, and as it follows a space where that gives other
    tokens. vLLM takes the second only when it has as many tokens as the first; kvray takes it
    unless the space is a token of its own (then the first sequence already bans the word).

    Raises:
        InvalidParameterError: a word gives no token, the words are too many, or every
            allowed id is a one-token bad word.
    """
    words: list[tuple[int, ...]] = []
    for word in sampling_params.bad_words:
        assert tokenizer is not None, "check_token_constraints first"
        plain = _encode(tokenizer, word.lstrip())
        if not plain:
            raise InvalidParameterError("bad_words", f"bad_words entry {word!r:.60} gives no token")
        words.append(plain)
        spaced = _encode(tokenizer, " " + word.lstrip())
        if spaced and spaced != plain and spaced[1:] != plain:
            words.append(spaced)
    num_tokens = sum(len(w) for w in words)
    if len(words) > MAX_BAD_WORDS or num_tokens > MAX_BAD_WORDS_TOKENS:
        raise InvalidParameterError(
            "bad_words",
            f"bad_words give {len(words)} token sequences of {num_tokens} tokens in all; at most "
            f"{MAX_BAD_WORDS} sequences and {MAX_BAD_WORDS_TOKENS} tokens",
        )
    if any(t >= info.vocab_size for w in words for t in w):
        raise InvalidParameterError(
            "bad_words",
            f"bad_words give token ids outside the model's vocabulary {info.vocab_size}",
        )
    allowed = sampling_params.allowed_token_ids
    if allowed and set(allowed) <= {w[0] for w in words if len(w) == 1}:
        raise InvalidParameterError(
            "allowed_token_ids",
            "every id in allowed_token_ids is a one-token word of bad_words: nothing could be "
            "generated",
        )
    if tuple(words) == sampling_params.bad_words_token_ids:
        return sampling_params
    return replace(sampling_params, bad_words_token_ids=tuple(words))


def _encode(tokenizer: Any, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
