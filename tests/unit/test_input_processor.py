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


def test_unset_knobs_take_the_models_sampling_defaults():
    inputs = processor(sampling_defaults={"temperature": 0.2, "top_p": 0.9})
    request = inputs.process([1, 2, 3], SamplingParams(top_p=0.5), "r")
    assert (request.sampling_params.temperature, request.sampling_params.top_p) == (0.2, 0.5)
    assert all(s.sampling_params.temperature == 0.2 for s in request.seqs)
    beams = inputs.process([1, 2, 3], SamplingParams(num_beams=2, max_tokens=4), "b")
    assert beams.sampling_params.temperature is None


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
