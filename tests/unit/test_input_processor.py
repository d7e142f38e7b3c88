"""The input step's model-dependent checks: the context limit and the model's sampling
defaults, applied before a request is queued; a conversation's bounds (roles, messages, every
character), and where its input work runs (off the event loop, never behind larger inputs)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from kvray.cluster.chat_prompt import MAX_MESSAGES, ROLES, ChatPrompt
from kvray.cluster.input_processor import SMALL_INPUT_COST, InputProcessor
from kvray.workers.fake import FakeWorker
from kvray.workers.grammar_spec import GrammarSpec
from kvray.workers.protocol import InvalidParameterError, SamplingParams


def processor(**info_changes) -> InputProcessor:
    info = FakeWorker(vocab_size=100).warmup()
    return InputProcessor(info.__class__(**{**info.__dict__, **info_changes}), tokenizer=None)


def test_a_prompt_plus_max_tokens_past_the_context_is_refused():
    inputs = processor(max_model_len=64)
    prompt = list(range(1, 41))  # 40 tokens: 24 left
    assert inputs.process(prompt, SamplingParams(max_tokens=24), "fits").sampling_params
    with pytest.raises(InvalidParameterError) as err:
        inputs.process(prompt, SamplingParams(max_tokens=25), "over")
    assert err.value.param == "max_tokens"
    assert "40 tokens + max_tokens=25" in str(err.value) and "at most 24" in str(err.value)
    unbounded = inputs.process(prompt, SamplingParams(max_tokens=None), "rest")
    assert unbounded.sampling_params.max_tokens is None  # up to the end of the context


def test_samples_of_the_largest_seed_wrap_into_int64_and_draw_as_seed_plus_index():
    from kvray.workers.sampler import token_seed

    largest = 2**63 - 1
    request = processor().process([1, 2, 3], SamplingParams(n=3, seed=largest), "r")
    assert [s.sampling_params.seed for s in request.seqs] == [largest, -(2**63), -(2**63) + 1]
    for index, seq in enumerate(request.seqs):
        assert seq.sampling_params.seed is not None
        assert token_seed(seq.sampling_params.seed, 5) == token_seed(largest + index, 5)


def test_unset_knobs_take_the_models_sampling_defaults():
    inputs = processor(sampling_defaults={"temperature": 0.2, "top_p": 0.9})
    request = inputs.process([1, 2, 3], SamplingParams(top_p=0.5), "r")
    assert (request.sampling_params.temperature, request.sampling_params.top_p) == (0.2, 0.5)
    assert all(s.sampling_params.temperature == 0.2 for s in request.seqs)
    beams = inputs.process([1, 2, 3], SamplingParams(num_beams=2, max_tokens=4), "b")
    assert beams.sampling_params.temperature is None


@pytest.mark.parametrize(
    ("params", "param", "message"),
    [
        ({"logit_bias": {100: 5.0}}, "logit_bias", "outside the vocabulary [0, 100): [100]"),
        ({"allowed_token_ids": [1, 250]}, "allowed_token_ids", "ids in [0, 100); got 2 ids"),
        ({"allowed_token_ids": [1] * 101}, "allowed_token_ids", "at most 100 ids"),
        ({"bad_words": ["darn"]}, "bad_words", "bad_words need a tokenizer"),
    ],
)
def test_token_constraints_outside_the_model_are_refused_before_queueing(params, param, message):
    with pytest.raises(InvalidParameterError) as err:
        processor().process([1, 2, 3], SamplingParams(**params), "r")
    assert err.value.param == param and message in str(err.value)


# How a BPE tokenizer may split these texts: a word after a space starts with another token
# ("darn"), or is fewer tokens ("heck"), or the space is a token of its own ("x").
WORD_TOKENS = {"darn": [10, 11], " darn": [12, 11], "heck": [13, 16], " heck": [14]}
WORD_TOKENS |= {"x": [15], " x": [1, 15]}


class WordTokenizer:
    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": WORD_TOKENS[text]}


def test_bad_words_become_token_ids_at_a_texts_start_and_after_a_space():
    inputs = InputProcessor(processor().info, tokenizer=WordTokenizer())
    request = inputs.process([1, 2], SamplingParams(bad_words=["darn", " heck", "x"]), "r")
    want = ((10, 11), (12, 11), (13, 16), (14,), (15,))  # (1, 15) ends with (15,): banned
    assert request.sampling_params.bad_words_token_ids == want
    assert all(seq.sampling_params.bad_words_token_ids == want for seq in request.seqs)


def test_allowed_ids_that_bad_words_all_ban_are_refused():
    inputs = InputProcessor(processor().info, tokenizer=WordTokenizer())
    with pytest.raises(InvalidParameterError, match="one-token word of bad_words") as err:
        inputs.process(
            [1, 2], SamplingParams(allowed_token_ids=[15, 14], bad_words=["x", " heck"]), "r"
        )
    assert err.value.param == "allowed_token_ids"
    # a word of two tokens bans its last one only after the first: allowed ids stay usable
    request = inputs.process(
        [1, 2], SamplingParams(allowed_token_ids=[11], bad_words=["darn"]), "r"
    )
    assert request.sampling_params.allowed_token_ids == (11,)


def test_allowed_ids_that_all_end_the_sequence_below_min_tokens_are_refused():
    eos = processor().info.eos_token_ids
    stops = SamplingParams(allowed_token_ids=[*eos, 7], stop_token_ids=[7], min_tokens=2)
    with pytest.raises(InvalidParameterError, match="min_tokens") as err:
        processor().process([1, 2, 3], stops, "r")
    assert err.value.param == "allowed_token_ids"
    # with ignore_eos the end-of-sequence ids are ordinary tokens
    ignored = SamplingParams(allowed_token_ids=list(eos), min_tokens=2, ignore_eos=True)
    assert processor().process([1, 2, 3], ignored, "r").sampling_params.min_tokens == 2


def test_bad_words_token_ids_a_caller_set_are_replaced():
    inputs = InputProcessor(processor().info, tokenizer=WordTokenizer())
    forged = SamplingParams(bad_words_token_ids=[(1,)])
    assert inputs.process([1, 2], forged, "r").sampling_params.bad_words_token_ids == ()


def test_bad_words_giving_too_many_token_sequences_are_refused():
    inputs = InputProcessor(processor().info, tokenizer=WordTokenizer())
    with pytest.raises(InvalidParameterError, match="give 130 token sequences") as err:
        inputs.process([1, 2], SamplingParams(bad_words=["darn"] * 65), "r")
    assert err.value.param == "bad_words"


# ---------------------------------------------------------------------- conversations


class StubTokenizer:
    """A tokenizer and chat template that count words (ids in [1, 50]); it records what each
    render saw and on which thread, and holds texts longer than `hold_above` until `release`."""

    chat_template = "{{ messages }}"

    def __init__(self, hold_above: int | None = None) -> None:
        self.hold_above = hold_above
        self.held = threading.Event()  # a long text is being held
        self.release = threading.Event()
        self.renders: list[tuple[str, list[dict]]] = []  # (thread name, messages)

    def apply_chat_template(self, messages, *, add_generation_prompt, tokenize):
        self.renders.append((threading.current_thread().name, messages))
        return " ".join(f"{m['role']}: {m['content']}" for m in messages)

    def __call__(self, text, add_special_tokens=True):
        if self.hold_above is not None and len(text) > self.hold_above:
            self.held.set()
            assert self.release.wait(timeout=60)
        return {"input_ids": [1 + len(word) % 50 for word in text.split()]}


def chat_processor(tokenizer: StubTokenizer, **info_changes) -> InputProcessor:
    info = FakeWorker(vocab_size=100).warmup()
    return InputProcessor(info.__class__(**{**info.__dict__, **info_changes}), tokenizer)


def user(content: str = "hi", **fields) -> dict:
    return {"role": "user", "content": content, **fields}


def test_a_megabyte_role_is_refused_before_the_template_runs():
    tokenizer = StubTokenizer()
    inputs = chat_processor(tokenizer, max_model_len=8192)
    with pytest.raises(InvalidParameterError) as err:
        inputs.tokenize(ChatPrompt(({"role": "x" * 2**20, "content": "hi"},)))
    assert err.value.param == "messages" and "messages[0].role" in str(err.value)
    assert len(str(err.value)) < 300  # the role is not echoed back
    assert tokenizer.renders == []


def test_only_the_known_roles_are_accepted():
    inputs = chat_processor(StubTokenizer())
    for role in ROLES:
        assert inputs.tokenize(ChatPrompt(({"role": role, "content": "hi"},)))
    for role in ("narrator", "", "User", "function"):
        with pytest.raises(InvalidParameterError, match=r"messages\[0\]\.role must be one of"):
            inputs.tokenize(ChatPrompt(({"role": role, "content": "hi"},)))


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "n" * 2048},
        {"tool_call_id": "c" * 2048},
        {"tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "a" * 2048}}]},
    ],
    ids=["name", "tool_call_id", "tool_calls"],
)  # fmt: skip
def test_names_and_tool_fields_count_toward_the_prompts_characters(fields):
    tokenizer = StubTokenizer()
    inputs = chat_processor(tokenizer, max_model_len=64)  # 32 x 64 = 2,048 characters
    assert inputs.tokenize(ChatPrompt((user(),)))
    with pytest.raises(InvalidParameterError, match="characters; at most 2048") as err:
        inputs.tokenize(ChatPrompt((user(**fields),)))
    assert err.value.param == "messages"
    assert len(tokenizer.renders) == 1  # the first chat only


def test_a_template_sees_every_field_of_a_message():
    tokenizer = StubTokenizer()
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = (user(name="ann"), {"role": "assistant", "content": "", "tool_calls": [call]})
    chat_processor(tokenizer).tokenize(ChatPrompt(messages))
    assert tokenizer.renders[0][1] == list(messages)


def test_more_messages_than_max_messages_are_refused_naming_the_field():
    tokenizer = StubTokenizer()
    inputs = chat_processor(tokenizer, max_model_len=8192)
    assert len(inputs.tokenize(ChatPrompt((user(),) * MAX_MESSAGES))) == 2 * MAX_MESSAGES
    for num_messages in (MAX_MESSAGES + 1, 2047):
        with pytest.raises(InvalidParameterError) as err:
            inputs.tokenize(ChatPrompt((user(),) * num_messages))
        assert err.value.param == "messages"
        assert f"messages holds {num_messages} messages; at most {MAX_MESSAGES}" in str(err.value)
    assert len(tokenizer.renders) == 1


def test_a_conversation_is_rendered_on_the_input_pool_not_the_event_loop():
    tokenizer = StubTokenizer()
    inputs = chat_processor(tokenizer)

    async def admit():
        return await inputs.process_async(ChatPrompt((user(),)), SamplingParams(), "r")

    request = asyncio.run(admit())
    assert request.prompt_token_ids == [6, 3]  # "user: hi"
    [(thread, _)] = tokenizer.renders
    assert thread.startswith("kvray-input") and thread != threading.current_thread().name
    inputs.close()


def test_a_small_input_is_not_stuck_behind_large_ones():
    tokenizer = StubTokenizer(hold_above=SMALL_INPUT_COST)
    inputs = chat_processor(tokenizer, max_model_len=65_536)
    large, small = "w " * 60_000, "w " * 2_500  # 120,000 and 5,000 characters

    async def scenario():
        held = [asyncio.create_task(inputs.tokenize_async(large)) for _ in range(3)]
        await asyncio.to_thread(tokenizer.held.wait, 60)  # one is in progress, two queued
        chat = ChatPrompt((user(small),))
        small_ids = await asyncio.wait_for(inputs.tokenize_async(small), timeout=60)
        chat_ids = await asyncio.wait_for(inputs.tokenize_async(chat), timeout=60)
        assert not any(task.done() for task in held)  # the large ones still wait
        tokenizer.release.set()
        return small_ids, chat_ids, await asyncio.gather(*held)

    small_ids, chat_ids, large_ids = asyncio.run(scenario())
    assert len(small_ids) == 2_500 and len(chat_ids) == 2_501
    assert [len(ids) for ids in large_ids] == [60_000] * 3
    inputs.close()


# -------------------------------------------------------------------- structured output


def constraining_processor(tiny_tokenizer, **info_changes) -> InputProcessor:
    info = FakeWorker(vocab_size=len(tiny_tokenizer), eos_token_ids=(0,)).warmup()
    changes = {"can_constrain_output": True, **info_changes}
    return InputProcessor(info.__class__(**{**info.__dict__, **changes}), tiny_tokenizer)


JSON = SamplingParams(structured_output={"json": {"type": "object", "uniqueItems": True}})


def test_a_schema_the_engine_cannot_enforce_is_refused_before_queueing(tiny_tokenizer):
    inputs = constraining_processor(tiny_tokenizer)
    try:
        with pytest.raises(InvalidParameterError, match="uniqueItems") as err:
            asyncio.run(inputs.process_async("Hi", JSON, "r"))
        assert err.value.param == "structured_output.json"
        with pytest.raises(InvalidParameterError, match="uniqueItems"):
            inputs.process("Hi", JSON, "r")  # the offline path checks on its own thread
        regex = SamplingParams(structured_output={"regex": "[a-z]+"})
        assert asyncio.run(inputs.process_async("Hi", regex, "ok")).seqs
    finally:
        inputs.close()


def test_a_grammar_compiles_on_the_checkers_threads_not_the_event_loop(tiny_tokenizer):
    inputs = constraining_processor(tiny_tokenizer)
    assert inputs.grammars is not None
    compiler = inputs.grammars.compiler()
    compile_on_engine, threads = compiler.engine.compile, []

    def recording(spec):
        threads.append(threading.current_thread())
        return compile_on_engine(spec)

    compiler.engine.compile = recording  # type: ignore[method-assign]
    try:
        regex = SamplingParams(structured_output={"regex": "[0-9]{3}"})
        asyncio.run(inputs.process_async("Hi", regex, "r"))
    finally:
        inputs.close()
    assert threads and threading.main_thread() not in threads


def test_a_resumed_sample_off_the_grammar_is_refused(tiny_tokenizer):
    from kvray.cluster.input_processor import Resumed

    inputs = constraining_processor(tiny_tokenizer)
    choice = SamplingParams(structured_output={"choice": ["yes", "no"]}, max_tokens=8)
    yes = tuple(tiny_tokenizer.encode("yes", add_special_tokens=False))
    off = tuple(tiny_tokenizer.encode("maybe", add_special_tokens=False))
    try:
        asyncio.run(inputs.process_async("Hi", choice, "r", resume={0: Resumed(yes[:1], 1, False)}))
        with pytest.raises(InvalidParameterError, match="resumed sample 0") as err:
            asyncio.run(inputs.process_async("Hi", choice, "r", resume={0: Resumed(off, 5, False)}))
    finally:
        inputs.close()
    assert err.value.param == "resume"


@pytest.mark.parametrize(
    ("has_tokenizer", "reason"),
    [(True, "no grammar engine"), (False, "it has no tokenizer")],
)
def test_a_model_that_cannot_constrain_refuses_by_the_specs_field(
    tiny_tokenizer, has_tokenizer, reason
):
    info = FakeWorker(vocab_size=len(tiny_tokenizer)).warmup()  # can_constrain_output: false
    inputs = InputProcessor(info, tiny_tokenizer if has_tokenizer else None)
    params = SamplingParams(structured_output=GrammarSpec("regex", "a+", param="response_format"))
    with pytest.raises(InvalidParameterError, match=reason) as err:
        asyncio.run(inputs.process_async([1, 2], params, "r"))
    assert err.value.param == "response_format"
