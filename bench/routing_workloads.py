"""The routing benchmark's workloads (`routing.py`): seeded, deterministic request lists, how a
turn's prompt is made of its conversation's history, and the ideal prefix-cache hits."""

from __future__ import annotations

import random
from dataclasses import dataclass

VOCAB = 500  # token ids of the generated pieces: 1..499 (the fake model's vocabulary is 512)
_WORDS = (
    "the river stone green light seven under paper garden music table window quiet north "
    "winter silver market story bright morning corner yellow bridge letter summer orange "
    "forest simple people travel little mountain school dinner number ocean father mother "
    "coffee engine planet doctor island answer friend circle button pocket rabbit thunder "
    "history kitchen animal finger shadow ticket wooden golden street basket flower cotton "
    "candle"
)
WORDS = _WORDS.split()  # a real model's prompts: piece token i is the word WORDS[i % 64]
Prompt = list[int] | str | list[dict[str, str]]  # token ids, text, or chat messages
Turn = tuple[tuple[int, ...], list[int], str]  # an earlier turn: its message, answer ids, text


@dataclass(frozen=True)
class Conversation:
    """Requests sent one after another, each when the previous answer has arrived: a chat's
    turns, or one request. A turn's prompt: `system`, then every earlier turn and its answer,
    then this turn's message. Pieces are token ids (words, for a real model)."""

    session_id: str
    start_s: float  # when the first turn is sent, from the run's start
    system: tuple[int, ...]  # a shared system prompt; () for none
    turns: tuple[tuple[int, ...], ...]  # each turn's new user message
    max_tokens: tuple[int, ...]  # each turn's answer length (ignore_eos: always reached)
    think_s: tuple[float, ...] = ()  # the pause before each later turn (the user reading)


def _piece(rng: random.Random, lengths: tuple[int, int]) -> tuple[int, ...]:
    return tuple(rng.randrange(1, VOCAB) for _ in range(rng.randint(*lengths)))


def multi_turn(
    num_conversations: int,
    *,
    seed: int,
    rate: float,
    first=(128, 384),
    later=(16, 96),
    answer=(32, 96),
    think=(1.0, 3.0),
    num_turns=(4, 8),
) -> list[Conversation]:
    """Conversations starting at a steady `rate` per second, 4-8 turns each, a pause of
    `think` seconds (uniform, to 0.1 s) before each later turn: idle histories wait in the
    caches, as real chats' do."""
    rng = random.Random(seed)
    out = []
    for i in range(num_conversations):
        n = rng.randint(*num_turns)
        turns = (_piece(rng, first), *(_piece(rng, later) for _ in range(n - 1)))
        answers = tuple(rng.randint(*answer) for _ in range(n))
        pauses = tuple(round(rng.uniform(*think), 1) for _ in range(n - 1))
        out.append(Conversation(f"conversation-{i}", i / rate, (), turns, answers, pauses))
    return out


def shared_system(
    num_systems: int,
    num_questions: int,
    *,
    seed: int,
    rate: float,
    system_len: int = 1024,
    question=(16, 48),
    answer: int = 32,
) -> list[Conversation]:
    """Every system prompt with each of its questions, shuffled, one request per 1/`rate` s;
    the session is the system prompt's index."""
    rng = random.Random(seed)
    systems = [
        tuple(rng.randrange(1, VOCAB) for _ in range(system_len)) for _ in range(num_systems)
    ]
    pairs = [(k, _piece(rng, question)) for k in range(num_systems) for _ in range(num_questions)]
    rng.shuffle(pairs)
    return [
        Conversation(f"system-{k}", i / rate, systems[k], (q,), (answer,))
        for i, (k, q) in enumerate(pairs)
    ]


def unique_prompts(
    num_requests: int, *, seed: int, prompt=(128, 512), answer=(32, 128)
) -> list[Conversation]:
    """Prompts that share no prefix, all at once (a closed loop sends them)."""
    rng = random.Random(seed)
    return [
        Conversation(f"request-{i}", 0.0, (), (_piece(rng, prompt),), (rng.randint(*answer),))
        for i in range(num_requests)
    ]


def ideal_cached_tokens(sent: list[tuple[list[int], list[int]]], block_size: int) -> int:
    """Cached prompt tokens if one cache held every token computed before (each system prompt,
    each history computed once): `sent` is (prompt ids, answer ids) in the order sent. Counts
    full blocks before a prompt's last token, as kvray's prefix cache does."""
    from kvray.cluster.block_manager import prefix_hashes

    seen: set[int] = set()
    total = 0
    for prompt, answer in sent:
        hashes = prefix_hashes(prompt, block_size)
        total += block_size * next((i for i, h in enumerate(hashes) if h not in seen), len(hashes))
        seen.update(prefix_hashes(prompt + answer, block_size))  # the answer's last: not computed
    return total


def make_prompt(
    conv: Conversation, history: list[Turn], turn: tuple[int, ...], render: str
) -> Prompt:
    """This turn's prompt: `render` "tokens" (ids), "chat" (messages, pieces as words; an
    answer as the text it streamed) or "text" (words; single requests only)."""
    if render == "tokens":
        ids = list(conv.system)
        for user, answer_ids, _ in history:
            ids += [*user, *answer_ids]
        return ids + list(turn)
    if render == "text":
        assert not conv.system and not history, "text prompts are single requests"
        return words(turn)
    messages = [{"role": "system", "content": words(conv.system)}] if conv.system else []
    for user, _, answer_text in history:
        messages += [
            {"role": "user", "content": words(user)},
            {"role": "assistant", "content": answer_text},
        ]
    return [*messages, {"role": "user", "content": words(turn)}]


def words(piece: tuple[int, ...]) -> str:
    return " ".join(WORDS[t % len(WORDS)] for t in piece)


def prompt_ids(prompt: Prompt, tokenizer) -> list[int]:
    """The token ids the router makes of a prompt (as `InputProcessor.tokenize` does)."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    if prompt and isinstance(prompt[0], dict):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(prompt)  # type: ignore[arg-type]
