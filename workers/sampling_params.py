"""A request's sampling parameters (`SamplingParams`), validated on construction, and the
error that names a parameter the server cannot take (`InvalidParameterError`).

Standard library only, like `protocol.py`, which re-exports both: the router builds these
without torch and they travel to the workers inside the step messages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvray.workers.grammar_spec import GrammarSpec

_MAX_LOGPROBS = 20
_MAX_N = 16
MAX_STOP_STRINGS = 64  # a request's stop strings, each at most MAX_STOP_CHARS long
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
# logit_bias entries: OpenAI's own limit (its API refuses a larger map); a set of allowed tokens
# of any size is allowed_token_ids.
MAX_LOGIT_BIAS = 300
MAX_LOGIT_BIAS_VALUE = 100.0  # OpenAI's range: [-100, 100]
# bad_words: strings, and the token sequences they become (vLLM's limits: 128 sequences,
# 1,024 tokens in all); each word at most MAX_BAD_WORD_CHARS long.
MAX_BAD_WORDS = 128
MAX_BAD_WORDS_TOKENS = 1024
MAX_BAD_WORD_CHARS = 256


class InvalidParameterError(ValueError):
    """A request parameter (or the prompt) that the server cannot take; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# SamplingParams fields that the router fills in (what a request sets is replaced): not request
# parameters, so not on the wire.
ROUTER_SET_FIELDS = frozenset({"bad_words_token_ids"})

# The sampling knobs a model may set defaults for (its generation_config.json), and what each
# means when neither the request nor the model sets it: no change to the model's distribution.
NEUTRAL_KNOBS: dict[str, float] = {
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
}


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops. Validated on construction.

    Defaults follow vLLM's `SamplingParams`: 16 new tokens; the sampling knobs (`temperature`,
    `top_k`, `top_p`, `min_p`, `repetition_penalty`) left unset (None) take the served model's
    defaults (its generation_config.json, `WorkerInfo.sampling_defaults`; see `with_defaults`),
    else their neutral values (`NEUTRAL_KNOBS`: temperature 1.0, the filters off). Temperature 0
    is greedy. Penalties follow their usual meanings: `repetition_penalty` (HF/CTRL style, over
    prompt and output, 1.0 = off) divides positive and multiplies negative logits of seen
    tokens; `presence_penalty` and `frequency_penalty` (OpenAI style, output only, 0 = off)
    subtract a flat amount once / per occurrence.

    Raises:
        ValueError: a field is out of range; the message names the field and the range.
    """

    n: int = 1
    temperature: float | None = None  # None: the model's default, else 1.0; 0: greedy
    top_k: int | None = None  # None: the model's default, else 0; 0 (or -1) keeps every token
    top_p: float | None = None  # None: the model's default, else 1.0 (every token)
    min_p: float | None = None  # None: the model's default, else 0.0 (off)
    repetition_penalty: float | None = None  # None: the model's default, else 1.0 (off)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: until the model's context is full
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: none; k: the sampled token's and the top-k alternatives'
    skip_special_tokens: bool = True
    # Sample best_of (>= n) and return the n with the highest cumulative logprob. None: n.
    best_of: int | None = None
    # Beam search with this many beams (1: off), as Hugging Face `generate(num_beams=...)`:
    # returns the n best beams, ranked by cumulative logprob / length ** length_penalty.
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False  # end once num_beams beams have finished
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's and its top-k
    # Added to the logits before sampling (OpenAI's logit_bias): token id -> bias in [-100,
    # 100]; -100 in effect bans a token and +100 forces it. Given as a mapping (or pairs), kept
    # as (token id, bias) pairs sorted by id, so the object stays hashable.
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] = ()  # only these ids may be sampled; (): every id
    # Words never generated (vLLM's bad_words): a word's last token is banned right after the
    # output ends with the rest of the word (a one-token word: always).
    bad_words: tuple[str, ...] = ()
    # NOTE: not a request parameter (ROUTER_SET_FIELDS): the input processor sets it from
    # bad_words with the model's tokenizer, so the worker needs none.
    bad_words_token_ids: tuple[tuple[int, ...], ...] = field(default=(), repr=False)
    # Structured output: the output follows a JSON schema, is any JSON object, matches a regex,
    # is one of a choice of strings or follows a grammar (`GrammarSpec`; a mapping in vLLM's
    # `structured_outputs` form becomes one). None: free text. The router compiles it before
    # the request is queued; the workers mask each row's logits with it.
    structured_output: GrammarSpec | None = None

    def __post_init__(self) -> None:
        # Accept lists (and a single stop string) for convenience; store tuples so the
        # object stays hashable and immutable.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids or ()))
        words = (self.bad_words,) if isinstance(self.bad_words, str) else self.bad_words
        object.__setattr__(self, "bad_words", tuple(words or ()))
        object.__setattr__(
            self, "bad_words_token_ids", tuple(tuple(w) for w in self.bad_words_token_ids or ())
        )
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if self.structured_output is not None:
            object.__setattr__(self, "structured_output", _grammar_spec(self.structured_output))
        self._validate()

    def _validate(self) -> None:
        _check_int("n", self.n, 1, _MAX_N)
        if self.temperature is not None:
            _check_float("temperature", self.temperature, 0.0, 100.0)
        if self.top_k is not None:
            _check_int("top_k", self.top_k, 0, 2**31 - 1, hint="0 or -1 disables it")
        if self.top_p is not None:
            _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        if self.min_p is not None:
            _check_float("min_p", self.min_p, 0.0, 1.0)
        if self.repetition_penalty is not None:
            _check_float("repetition_penalty", self.repetition_penalty, 0.0, 100.0, low_open=True)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None:
            _check_int("seed", self.seed, -(2**63), 2**63 - 1)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1, 2**31 - 1, hint="or None for no limit")
        _check_int("min_tokens", self.min_tokens, 0, 2**31 - 1)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidParameterError(
                "min_tokens",
                f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens} "
                f"and max_tokens={self.max_tokens}",
            )
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidParameterError(
                "stop", f"stop holds {len(self.stop)} strings; at most {MAX_STOP_STRINGS}"
            )
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
                raise InvalidParameterError(
                    "stop",
                    f"stop must hold non-empty strings of at most {MAX_STOP_CHARS} characters, "
                    f"got {s!r:.60}",
                )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidParameterError(
                "stop_token_ids",
                f"stop_token_ids holds {len(self.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS}",
            )
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, 0, 2**31 - 1)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, _MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, 0, _MAX_LOGPROBS)
        self._validate_token_constraints()
        self._validate_structured_output()
        _check_int("num_beams", self.num_beams, 1, _MAX_N)
        _check_float("length_penalty", self.length_penalty, -10.0, 10.0)
        if not isinstance(self.early_stopping, bool):
            raise InvalidParameterError(
                "early_stopping",
                f"early_stopping must be true or false, got {self.early_stopping!r}",
            )
        if self.num_beams > 1:
            self._validate_beam_search()
            return
        if self.best_of is not None:
            _check_int("best_of", self.best_of, self.n, _MAX_N, hint="at least n")
        if self.num_samples > 1 and self.is_greedy:
            param = "n" if self.best_of is None else "best_of"
            raise InvalidParameterError(
                param,
                f"{param} > 1 needs random sampling (temperature > 0 and top_k != 1): greedy "
                "samples would all be equal",
            )

    def _validate_token_constraints(self) -> None:
        """logit_bias, allowed_token_ids and bad_words; the vocabulary is the router's check."""
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidParameterError(
                "logit_bias",
                f"logit_bias holds {len(self.logit_bias)} tokens; at most {MAX_LOGIT_BIAS} (use "
                "allowed_token_ids to allow a set of tokens and no other)",
            )
        bound = MAX_LOGIT_BIAS_VALUE
        for token_id, bias in self.logit_bias:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise InvalidParameterError(
                    "logit_bias",
                    f"logit_bias keys must be token ids (integers >= 0), got {token_id!r}",
                )
            is_number = isinstance(bias, int | float) and not isinstance(bias, bool)
            if not is_number or not -bound <= bias <= bound:  # (NaN fails the range)
                raise InvalidParameterError(
                    "logit_bias",
                    f"logit_bias[{token_id}] must be a number in [-{bound:g}, {bound:g}], got {bias!r}",
                )
        if len({token_id for token_id, _ in self.logit_bias}) < len(self.logit_bias):
            raise InvalidParameterError("logit_bias", "logit_bias names a token id twice")
        for t in self.allowed_token_ids:
            _check_int("allowed_token_ids", t, 0, 2**31 - 1)
        if len(self.bad_words) > MAX_BAD_WORDS:
            raise InvalidParameterError(
                "bad_words", f"bad_words holds {len(self.bad_words)} words; at most {MAX_BAD_WORDS}"
            )
        for word in self.bad_words:
            if not isinstance(word, str) or not word.strip() or len(word) > MAX_BAD_WORD_CHARS:
                raise InvalidParameterError(
                    "bad_words",
                    "bad_words must hold words (not only spaces) of at most "
                    f"{MAX_BAD_WORD_CHARS} characters, got {word!r:.60}",
                )

    def _validate_structured_output(self) -> None:
        """A finished answer can only end: nothing may keep it going."""
        spec = self.structured_output
        if spec is None:
            return
        for name, is_set in (("ignore_eos", self.ignore_eos), ("min_tokens", self.min_tokens)):
            if is_set:
                raise InvalidParameterError(
                    name,
                    f"{name} does not combine with structured output ({spec.param}): once the "
                    "answer is complete the sequence can only end; leave it unset",
                )

    @property
    def has_token_constraints(self) -> bool:
        """Whether the sampler changes this request's logits for logit_bias, allowed_token_ids
        or bad_words."""
        return bool(self.logit_bias or self.allowed_token_ids or self.bad_words_token_ids)

    def _validate_beam_search(self) -> None:
        if self.n > self.num_beams:
            raise InvalidParameterError(
                "n", f"n must be <= num_beams ({self.num_beams}): it is how many beams to return"
            )
        if self.temperature not in (None, 0.0):
            raise InvalidParameterError(
                "temperature",
                "beam search is deterministic: leave temperature unset (or 0), got "
                f"{self.temperature}",
            )
        unsupported = {
            "top_k": self.top_k not in (None, 0),
            "top_p": self.top_p not in (None, 1.0),
            "min_p": self.min_p not in (None, 0.0),
            "repetition_penalty": self.repetition_penalty not in (None, 1.0),
            "presence_penalty": self.presence_penalty != 0.0,
            "frequency_penalty": self.frequency_penalty != 0.0,
            "best_of": self.best_of is not None,
            "stop": bool(self.stop),
            "logprobs": self.logprobs is not None,
        }
        for name, is_set in unsupported.items():
            if is_set:
                raise InvalidParameterError(
                    name,
                    f"{name} does not combine with beam search (num_beams > 1); leave it unset "
                    "(each beam's cumulative_logprob is returned)",
                )

    def with_defaults(self, defaults: Mapping[str, float]) -> SamplingParams:
        """The parameters a request runs with: each sampling knob it left unset takes the
        model's default from `defaults` (`WorkerInfo.sampling_defaults`), else its neutral value
        (`NEUTRAL_KNOBS`). A beam search takes none (its knobs stay unset: beams do not sample).

        Raises:
            ValueError: the combination is invalid once resolved (`n > 1` over a greedy default).
        """
        if self.num_beams > 1:
            return self
        unset: dict[str, Any] = {
            name: defaults.get(name, neutral)
            for name, neutral in NEUTRAL_KNOBS.items()
            if getattr(self, name) is None
        }
        return replace(self, **unset) if unset else self

    def knob(self, name: str) -> float:
        """A sampling knob's value (`NEUTRAL_KNOBS`), its neutral one where it is unset."""
        value = getattr(self, name)
        return NEUTRAL_KNOBS[name] if value is None else value

    @property
    def num_samples(self) -> int:
        """Sequences the request runs: best_of (or n) samples, or one per beam."""
        return max(self.num_beams, self.best_of or self.n)

    @property
    def is_ranked(self) -> bool:
        """Whether its samples are ranked at the end (beam search, best_of > n): such a request
        streams nothing until it is done, then one chunk per returned sample."""
        return self.num_beams > 1 or self.num_samples > self.n

    def num_beam_candidates(self, eos_token_ids: tuple[int, ...] | frozenset[int]) -> int:
        """Next tokens each beam offers per step, as Hugging Face keeps them: enough that
        num_beams beams live on even if every stop and end-of-sequence id ends one."""
        stop = set(self.stop_token_ids) | (set() if self.ignore_eos else set(eos_token_ids))
        return max(2, 1 + len(stop)) * self.num_beams

    @property
    def is_greedy(self) -> bool:
        """Whether the next token is always the most likely one. The one greedy rule: the
        sampler takes the argmax for these rows, and `n > 1` is refused for them. An unset
        knob is not greedy (until `with_defaults` gives it the model's value)."""
        return self.temperature == 0.0 or self.top_k == 1


def _bias_pairs(value: Any) -> tuple[tuple[int, float], ...]:
    """logit_bias as sorted (token id, bias) pairs, from a mapping or pairs (checked later)."""
    if not value:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = [(token_id, bias) for token_id, bias in items]
        return tuple(sorted(pairs, key=lambda pair: pair[0]))
    except (TypeError, ValueError):
        raise InvalidParameterError(
            "logit_bias", f"logit_bias must map token ids to biases, got {value!r:.60}"
        ) from None


def _grammar_spec(value: Any) -> GrammarSpec:
    """structured_output as a GrammarSpec: one, or a mapping in vLLM's `structured_outputs`
    form ({"json": schema}, {"regex": ...}, {"choice": [...]}, {"grammar": ...})."""
    # NOTE: imported here: grammar_spec imports this module's InvalidParameterError.
    from kvray.workers.grammar_spec import GrammarSpec, from_structured_outputs

    if isinstance(value, GrammarSpec):
        return value
    spec = (
        from_structured_outputs(value, param="structured_output")
        if isinstance(value, Mapping)
        else None
    )
    if spec is None:
        raise InvalidParameterError(
            "structured_output",
            "structured_output must be a GrammarSpec or a mapping such as {'json': schema}, got "
            f"{value!r:.60}",
        )
    return spec


def _check_int(name: str, value: object, low: int, high: int, *, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterError(name, f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        extra = f" ({hint})" if hint else ""
        raise InvalidParameterError(name, f"{name} must be in [{low}, {high}]{extra}, got {value}")


def _check_float(
    name: str, value: object, low: float, high: float, *, low_open: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise InvalidParameterError(name, f"{name} must be a number, got {value!r}")
    bracket = "(" if low_open else "["
    if value > high or value < low or (low_open and value == low):
        raise InvalidParameterError(name, f"{name} must be in {bracket}{low}, {high}], got {value}")
