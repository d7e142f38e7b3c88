"""Structured output's grammar side on the built-in tiny tokenizer (offline): specs and their
errors, the compiled-grammar cache, per-sequence matchers (rebuilt from tokens, forked), random
walks of the mask that must always give valid output, the router's off-loop check, and
applying a bitmask to logits."""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading

import jsonschema
import pytest
import torch

from kvray.cluster.structured_output import GrammarChecker
from kvray.workers.grammar_engine import make_engine
from kvray.workers.grammar_spec import GrammarSpec
from kvray.workers.protocol import InvalidParameterError
from kvray.workers.structured_output import GrammarCompiler, fill_masks
from kvray.workers.tiny_model import make_tokenizer
from kvray.workers.token_bitmask import allocate_token_bitmask, apply_token_bitmask

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "weight": {"type": "number", "minimum": 0.5, "maximum": 80},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "integer"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "age", "tags", "owner"],
    "additionalProperties": False,
}
WALK_SCHEMAS = {
    "typical": SCHEMA,
    "anyOf, nullable": {
        "type": "object",
        "properties": {
            "v": {"anyOf": [{"type": "integer", "maximum": 9}, {"type": "boolean"}]},
            "note": {"type": ["string", "null"], "maxLength": 5},
        },
        "required": ["v", "note"],
        "additionalProperties": False,
    },
    "$ref": {
        "$defs": {
            "P": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "array",
        "items": {"$ref": "#/$defs/P"},
        "minItems": 1,
        "maxItems": 2,
    },
    "pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2,3}$"}},
        "required": ["code"],
        "additionalProperties": False,
    },
}
MAX_WALK_TOKENS = 300


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    engine = make_engine(
        tokenizer, vocab_size=len(tokenizer), eos_token_ids=[tokenizer.eos_token_id]
    )
    return GrammarCompiler(engine, max_entries=64)


def token_bytes(tokenizer) -> list[bytes | None]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    out: list[bytes | None] = [None] * len(tokenizer)
    for token, i in tokenizer.get_vocab().items():
        if i not in tokenizer.all_special_ids:
            out[i] = bytes(to_byte[c] for c in token)
    return out


def allowed_ids(row: torch.Tensor, vocab_size: int) -> list[int]:
    words = [w & 0xFFFFFFFF for w in row.tolist()]
    return [t for t in range(vocab_size) if words[t // 32] >> (t % 32) & 1]


def mask_of(matcher, vocab_size: int) -> list[int]:
    bitmask = allocate_token_bitmask(1, vocab_size)
    matcher.fill_mask(bitmask[0])
    return allowed_ids(bitmask[0], vocab_size)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


# -------------------------------------------------------------------------------- specs


def test_an_unknown_kind_is_refused_naming_the_field():
    with pytest.raises(InvalidParameterError, match="unknown structured output kind") as e:
        GrammarSpec("xml", "<a/>", param="structured_outputs")
    assert e.value.param == "structured_outputs"


def test_a_schema_must_be_a_json_object_and_the_error_names_its_field():
    with pytest.raises(InvalidParameterError, match="must be a JSON object") as e:
        GrammarSpec.json_schema("[1, 2]", param="response_format")
    assert e.value.param == "response_format"
    with pytest.raises(InvalidParameterError, match="not JSON") as e:
        GrammarSpec.json_schema("{oops", param="response_format")
    assert e.value.param == "response_format"


def test_a_schema_is_stored_compactly_with_its_key_order():
    spec = GrammarSpec.json_schema('{ "b": 1,\n  "a": {"type": "object"} }')
    assert spec.spec == '{"b":1,"a":{"type":"object"}}'
    assert spec.param == "structured_outputs.json"


def test_specs_that_differ_only_in_their_field_are_equal():
    a = GrammarSpec.json_schema(SCHEMA, param="response_format")
    b = GrammarSpec.json_schema(json.dumps(SCHEMA, indent=2), param="structured_outputs.json")
    assert a == b and hash(a) == hash(b)


def test_choices_must_be_non_empty_strings():
    with pytest.raises(InvalidParameterError, match="non-empty strings") as e:
        GrammarSpec.choice(["yes", ""])
    assert e.value.param == "structured_outputs.choice"
    with pytest.raises(InvalidParameterError, match="list of 1 to"):
        GrammarSpec.choice([])


def test_json_object_takes_no_spec_and_regex_needs_one():
    with pytest.raises(InvalidParameterError, match="takes no spec"):
        GrammarSpec("json_object", "{}")
    with pytest.raises(InvalidParameterError, match="is empty"):
        GrammarSpec("regex", "")


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (GrammarSpec.json_schema({"type": "array", "uniqueItems": True}), "uniqueItems"),
        (GrammarSpec.json_schema({"type": "strin"}), "strin"),
        (GrammarSpec.json_schema({"type": "integer", "minimum": 5, "maximum": 1}), "minimum"),
        (GrammarSpec.json_schema({"$ref": "#/$defs/Missing"}), "Missing"),
        (GrammarSpec("regex", "(a)\\1"), "backreference"),
        (GrammarSpec("grammar", "start: undefined_rule"), "undefined_rule"),
    ],
)
def test_what_the_engine_refuses_is_an_error_naming_the_field(compiler, spec, reason):
    with pytest.raises(InvalidParameterError, match=reason) as e:
        compiler.compile(spec)
    assert e.value.param == spec.param
    assert str(e.value).startswith(f"{spec.param}: unsupported or invalid {spec.kind}")


# -------------------------------------------------------------------------------- the cache


def fresh_compiler(compiler: GrammarCompiler, max_entries: int) -> GrammarCompiler:
    return GrammarCompiler(compiler.engine, max_entries=max_entries)


def test_the_cache_compiles_a_spec_once_and_counts_hits(compiler):
    cache = fresh_compiler(compiler, 4)
    first = cache.compile(GrammarSpec.json_schema(SCHEMA, param="response_format"))
    again = cache.compile(GrammarSpec.json_schema(json.dumps(SCHEMA, indent=1)))
    assert again is first
    assert (cache.stats.num_misses, cache.stats.num_hits, cache.stats.num_entries) == (1, 1, 1)


def test_the_cache_evicts_the_least_recently_used_spec(compiler):
    cache = fresh_compiler(compiler, 2)
    a, b, c = (GrammarSpec("regex", r) for r in ("a+", "b+", "c+"))
    cache.compile(a)
    cache.compile(b)
    cache.compile(a)  # a is now the most recent
    cache.compile(c)  # evicts b
    assert cache.stats.num_evictions == 1
    cache.compile(a)
    assert cache.stats.num_misses == 3
    cache.compile(b)
    assert cache.stats.num_misses == 4 and cache.stats.num_entries == 2


def test_the_cache_keeps_refusals_and_names_each_callers_field(compiler):
    cache = fresh_compiler(compiler, 4)
    bad = {"type": "array", "uniqueItems": True}
    with pytest.raises(InvalidParameterError):
        cache.compile(GrammarSpec.json_schema(bad, param="response_format"))
    with pytest.raises(InvalidParameterError) as e:
        cache.compile(GrammarSpec.json_schema(bad, param="structured_outputs.json"))
    assert e.value.param == "structured_outputs.json"
    assert (cache.stats.num_misses, cache.stats.num_hits) == (1, 1)


# -------------------------------------------------------------------------------- matchers

ANSWER = '{"name":"Rex","kind":"dog","age":3,"tags":["a"],"owner":{"city":"Paris"}}'


def test_advance_refuses_a_forbidden_token_and_keeps_its_place(compiler, tokenizer):
    matcher = compiler.matcher(GrammarSpec.json_schema(SCHEMA))
    (brace,) = encode(tokenizer, "{")
    (letter,) = encode(tokenizer, "x")
    assert matcher.advance(brace)
    before = mask_of(matcher, len(tokenizer))
    assert not matcher.advance(letter)
    assert matcher.num_tokens == 1 and mask_of(matcher, len(tokenizer)) == before


def test_rebuild_from_tokens_reaches_the_same_mask_as_advancing(compiler, tokenizer):
    spec = GrammarSpec.json_schema(SCHEMA)
    tokens = encode(tokenizer, ANSWER[:40])
    stepped = compiler.matcher(spec)
    for t in tokens:
        assert stepped.advance(t)
    rebuilt = compiler.matcher(spec)
    rebuilt.advance(tokens[0])
    rebuilt.rebuild(tokens)  # from wherever it was: a recompute starts over
    assert rebuilt.num_tokens == len(tokens)
    assert mask_of(rebuilt, len(tokenizer)) == mask_of(stepped, len(tokenizer))


def test_catch_up_consumes_only_the_tokens_it_has_not_seen(compiler, tokenizer):
    spec = GrammarSpec.json_schema(SCHEMA)
    tokens = encode(tokenizer, ANSWER)
    matcher = compiler.matcher(spec)
    matcher.catch_up(tokens[:7])
    matcher.catch_up(tokens[:7])  # nothing new
    matcher.catch_up(tokens[:20])
    rebuilt = compiler.matcher(spec)
    rebuilt.rebuild(tokens[:20])
    assert matcher.num_tokens == 20
    assert mask_of(matcher, len(tokenizer)) == mask_of(rebuilt, len(tokenizer))
    with pytest.raises(ValueError, match="position 21"):  # a raw control byte: never JSON
        matcher.catch_up([*tokens[:21], *encode(tokenizer, "\x01")])
    assert matcher.num_tokens == 21


def test_rebuild_refuses_tokens_off_the_grammar_and_names_the_position(compiler, tokenizer):
    matcher = compiler.matcher(GrammarSpec.json_schema(SCHEMA))
    tokens = encode(tokenizer, '{"name":') + encode(tokenizer, "x")
    with pytest.raises(ValueError, match=f"position {len(tokens) - 1}"):
        matcher.rebuild(tokens)
    assert matcher.num_tokens == 0 and matcher.advance(tokens[0])  # back at the start


def test_a_finished_answer_allows_only_end_of_sequence(compiler, tokenizer):
    matcher = compiler.matcher(GrammarSpec.json_schema(SCHEMA))
    matcher.rebuild(encode(tokenizer, ANSWER))
    assert matcher.is_finished and matcher.is_accepting
    assert mask_of(matcher, len(tokenizer)) == [tokenizer.eos_token_id]
    assert matcher.advance(tokenizer.eos_token_id)
    assert not matcher.advance(encode(tokenizer, " ")[0])  # nothing after end of sequence


def test_an_unfinished_answer_does_not_allow_end_of_sequence(compiler, tokenizer):
    matcher = compiler.matcher(GrammarSpec.json_schema(SCHEMA))
    matcher.rebuild(encode(tokenizer, ANSWER[:-1]))
    assert not matcher.is_finished and not matcher.is_accepting
    assert tokenizer.eos_token_id not in mask_of(matcher, len(tokenizer))


def test_a_fork_moves_on_without_its_parent(compiler, tokenizer):
    parent = compiler.matcher(GrammarSpec("choice", '["cat","dog"]'))
    child = parent.fork()
    (c,) = encode(tokenizer, "c")
    assert child.advance(c)
    assert parent.num_tokens == 0 and child.num_tokens == 1
    assert mask_of(parent, len(tokenizer)) != mask_of(child, len(tokenizer))


def test_fill_masks_fills_each_matchers_row_as_one_fill_would(compiler, tokenizer):
    spec = GrammarSpec.json_schema(SCHEMA)
    tokens = encode(tokenizer, ANSWER)
    matchers = []
    for n in (0, 5, 17, len(tokens)):
        m = compiler.matcher(spec)
        m.rebuild(tokens[:n])
        matchers.append(m)
    bitmask = allocate_token_bitmask(6, len(tokenizer))
    fill_masks([(m, row) for m, row in zip(matchers, (4, 0, 2, 5))], bitmask)
    for m, row in zip(matchers, (4, 0, 2, 5)):
        assert allowed_ids(bitmask[row], len(tokenizer)) == mask_of(m, len(tokenizer))
    assert bitmask[1].eq(-1).all() and bitmask[3].eq(-1).all()  # rows not named stay as they were


# -------------------------------------------------------------------------------- random walks


def random_walk(matcher, tokenizer, closers: set[int], rng: random.Random) -> list[int] | None:
    """A seeded walk of the mask until end of sequence (None past MAX_WALK_TOKENS). Now and
    then it takes a token that closes a string or a value, so that walks end."""
    tokens: list[int] = []
    eos = tokenizer.eos_token_id
    while len(tokens) < MAX_WALK_TOKENS:
        allowed = mask_of(matcher, len(tokenizer))
        assert allowed, "the mask allows nothing"
        if eos in allowed and (len(allowed) == 1 or rng.random() < 0.5):
            return tokens
        choices = [t for t in allowed if t != eos]
        closing = [t for t in choices if t in closers]
        token = rng.choice(closing if closing and rng.random() < 0.3 else choices)
        assert matcher.advance(token)
        tokens.append(token)
    return None


def walk_texts(compiler, tokenizer, spec: GrammarSpec, num_walks: int) -> list[str]:
    pieces = token_bytes(tokenizer)
    closers = {i for i, b in enumerate(pieces) if b is not None and any(c in b for c in b'"]},')}
    texts = []
    for seed in range(num_walks):
        tokens = random_walk(compiler.matcher(spec), tokenizer, closers, random.Random(seed))
        if tokens is not None:
            # NOTE: strict UTF-8: a walk that split a character would fail here.
            texts.append(b"".join(pieces[t] or b"?" for t in tokens).decode("utf-8"))
    assert len(texts) >= num_walks * 3 // 4, f"only {len(texts)} of {num_walks} walks ended"
    return texts


@pytest.mark.parametrize("name", list(WALK_SCHEMAS))
def test_random_walks_of_the_mask_give_schema_valid_json(compiler, tokenizer, name):
    schema = WALK_SCHEMAS[name]
    validator = jsonschema.Draft202012Validator(schema)
    for text in walk_texts(compiler, tokenizer, GrammarSpec.json_schema(schema), 20):
        errors = [e.message for e in validator.iter_errors(json.loads(text))]
        assert not errors, f"{text!r}: {errors}"


def test_random_walks_of_a_regex_and_a_choice_match_them(compiler, tokenizer):
    pattern = r"[a-z]{2,5}-[0-9]{1,3}(\.[a-z]{2})?"
    for text in walk_texts(compiler, tokenizer, GrammarSpec("regex", pattern), 20):
        assert re.fullmatch(pattern, text), text
    choices = ["cat", "category", "dog house"]
    texts = walk_texts(compiler, tokenizer, GrammarSpec.choice(choices), 20)
    assert set(texts) <= set(choices) and len(set(texts)) > 1


def test_random_walks_of_json_object_give_objects(compiler, tokenizer):
    for text in walk_texts(compiler, tokenizer, GrammarSpec("json_object"), 20):
        assert isinstance(json.loads(text), dict), text


# -------------------------------------------------------------------------------- the router


def test_the_router_compiles_off_its_event_loop_and_caches(tokenizer):
    checker = GrammarChecker(
        tokenizer, vocab_size=len(tokenizer), eos_token_ids=[tokenizer.eos_token_id]
    )
    compiler = checker.compiler()
    threads = []
    compile_on_engine = compiler.engine.compile

    def recording(spec):
        threads.append(threading.current_thread())
        return compile_on_engine(spec)

    compiler.engine.compile = recording  # type: ignore[method-assign]
    spec = GrammarSpec.json_schema(SCHEMA, param="response_format")

    async def main() -> None:
        await checker.check(spec)
        await checker.check(GrammarSpec.json_schema(SCHEMA))
        with pytest.raises(InvalidParameterError) as e:
            await checker.check(GrammarSpec("regex", "(?=a)b", param="structured_outputs.regex"))
        assert e.value.param == "structured_outputs.regex"

    try:
        asyncio.run(main())
    finally:
        checker.close()
    assert threads and threading.main_thread() not in threads
    assert (checker.stats.num_misses, checker.stats.num_hits) == (2, 1)


def test_the_router_refuses_resumed_tokens_off_the_grammar(tokenizer):
    checker = GrammarChecker(
        tokenizer, vocab_size=len(tokenizer), eos_token_ids=[tokenizer.eos_token_id]
    )
    spec = GrammarSpec.json_schema(SCHEMA)
    try:
        checker.check_sync(spec, {0: encode(tokenizer, ANSWER[:20])})
        with pytest.raises(InvalidParameterError, match="resumed sample 1") as e:
            checker.check_sync(spec, {0: [], 1: encode(tokenizer, "[1]")})
    finally:
        checker.close()
    assert e.value.param == "resume"


# -------------------------------------------------------------------------------- logits


def test_apply_token_bitmask_masks_exactly_the_zero_bits():
    g = torch.Generator().manual_seed(0)
    vocab = 100  # not a multiple of 32: the last word is partly unused
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 4), dtype=torch.int32, generator=g)
    logits = torch.randn(3, vocab, generator=g)
    expected = logits.clone()
    for r in range(3):
        allowed = set(allowed_ids(bitmask[r], vocab))
        for t in range(vocab):
            if t not in allowed:
                expected[r, t] = float("-inf")
    apply_token_bitmask(logits, bitmask)
    assert torch.equal(logits, expected)


def test_apply_token_bitmask_touches_only_the_given_rows():
    logits = torch.zeros(4, 64)
    bitmask = torch.zeros(2, 2, dtype=torch.int32)
    bitmask[0, 0] = 0b101  # row 3 keeps tokens 0 and 2
    bitmask[1, 1] = 1  # row 1 keeps token 32
    apply_token_bitmask(logits, bitmask, rows=torch.tensor([3, 1]))
    assert torch.isfinite(logits[3]).nonzero().flatten().tolist() == [0, 2]
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [32]
    assert torch.isfinite(logits[0]).all() and torch.isfinite(logits[2]).all()


def test_tokens_past_the_bitmask_are_masked():
    logits = torch.zeros(1, 40)  # e.g. a model whose vocabulary is padded past the tokenizer's
    apply_token_bitmask(logits, torch.full((1, 1), -1, dtype=torch.int32))
    assert torch.isfinite(logits[0, :32]).all() and torch.isinf(logits[0, 32:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_token_bitmask_equals_a_masked_fill(dtype):
    g = torch.Generator().manual_seed(1)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (5, 3), dtype=torch.int32, generator=g)
    logits = torch.randn(5, 96, generator=g).to(dtype)
    shifts = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)
    expected = logits.masked_fill(~allowed, float("-inf"))
    apply_token_bitmask(logits, bitmask)
    assert torch.equal(logits, expected)


@pytest.mark.parametrize(
    "grammar",
    ['root ::= "yes" | "no" | "maybe"', 'start: answer\nanswer: "yes" | "no" | "maybe"'],
    ids=["gbnf", "lark"],
)
def test_a_gbnf_or_lark_grammar_constrains_the_walks(compiler, tokenizer, grammar):
    texts = walk_texts(compiler, tokenizer, GrammarSpec("grammar", grammar), 12)
    assert set(texts) <= {"yes", "no", "maybe"} and len(set(texts)) > 1
