"""Incremental detokenization: joined deltas equal a full decode; stop strings cut and never stream."""

from __future__ import annotations

import pytest

from kvray.cluster.detokenizer import Detokenizer

TEXTS = [
    "Hello, world! The quick brown fox.",
    "Café naïve — 日本語のテキスト 🚀✨ and € symbols",
    "def fibonacci(n):\n    return n",
]


def stream(tokenizer, ids, **kwargs):
    detok = Detokenizer(tokenizer, [0], **kwargs)
    deltas, stop = [], None
    for t in ids:
        stop = detok.add_token(t)
        if stop is not None:
            break
        deltas.append(detok.release(finished=False))
    if stop is None:
        detok.flush()
    deltas.append(detok.release(finished=True))
    return deltas, stop


@pytest.mark.parametrize("text", TEXTS)
def test_joined_deltas_equal_full_decode(tiny_tokenizer, text):
    ids = tiny_tokenizer(text)["input_ids"]
    deltas, _ = stream(tiny_tokenizer, ids)
    assert "".join(deltas) == tiny_tokenizer.decode(ids) == text


def test_multibyte_characters_are_never_split(tiny_tokenizer):
    text = "日本語のテキスト 🚀✨"
    ids = tiny_tokenizer(text)["input_ids"]
    assert len(ids) > len(text)  # byte-level BPE: some characters span several tokens
    deltas, _ = stream(tiny_tokenizer, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_stop_string_spanning_tokens_cuts_text_and_is_not_streamed(tiny_tokenizer):
    text = "Hello, world! The quick brown fox."
    ids = tiny_tokenizer(text)["input_ids"]
    deltas, stop = stream(tiny_tokenizer, ids, stop=("quick brown",))
    assert stop == "quick brown"
    assert "".join(deltas) == "Hello, world! The "
    assert not any("quick" in d for d in deltas)


def test_stop_string_kept_when_asked(tiny_tokenizer):
    ids = tiny_tokenizer("Hello, world! The quick brown fox.")["input_ids"]
    deltas, _ = stream(tiny_tokenizer, ids, stop=("world",), include_stop_str_in_output=True)
    assert "".join(deltas) == "Hello, world"


def test_earliest_stop_string_wins(tiny_tokenizer):
    ids = tiny_tokenizer("one two three four")["input_ids"]
    deltas, stop = stream(tiny_tokenizer, ids, stop=("four", "two"))
    assert stop == "two"
    assert "".join(deltas) == "one "
