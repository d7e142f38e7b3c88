"""The benchmark scripts import and parse their arguments (they are not run in CI),
engine_throughput's pieces that decide what a run prints and how big its baselines are, and
the routing benchmark's workloads: seeded, shaped as described, and their ideal cache hits; the
structured-answers run's schemas and its reassembly of streamed tool calls."""

from __future__ import annotations

import importlib
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize(
    "script",
    sorted(
        p.name
        for p in BENCH.glob("*.py")
        if p.name
        not in (
            "clients.py",
            "common.py",
            "grammar_workloads.py",
            "load.py",
            "routing_workloads.py",
            "structured_workloads.py",
        )
    ),
)
def test_bench_script_shows_its_help(script):
    result = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def bench_module(name: str):
    """A module of bench/ (a folder of scripts, not a package)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def engine_throughput():
    return bench_module("engine_throughput")


def kvray_and(baseline: str, ratio: float) -> dict[str, dict]:
    return {"kvray": {"tokens_per_s": ratio}, baseline: {"tokens_per_s": 1.0}}


def test_targets_are_not_judged_off_the_full_workload(engine_throughput, capsys):
    engine_throughput.print_targets("uniform", kvray_and("hf-cb", 0.5), num_requests=4)
    out = capsys.readouterr().out
    assert "MISSES" not in out and "meets" not in out
    assert out.count("\n") == 1 and "set for 64 requests" in out and "has 4" in out


def test_targets_are_judged_on_the_full_workload(engine_throughput, capsys):
    engine_throughput.print_targets("uniform", kvray_and("hf-cb", 0.5), num_requests=64)
    assert "target kvray >= 3.0x hf-cb: 0.50x (MISSES)" in capsys.readouterr().out


def test_quick_runs_the_uniform_workload_only(engine_throughput, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(engine_throughput, "bench_model", lambda name: Path(name))
    monkeypatch.setattr(engine_throughput, "linear_weight_count", lambda model_dir: 1)
    monkeypatch.setattr(
        engine_throughput, "run_workload", lambda args, w, d: ran.append((w, args)) or []
    )
    monkeypatch.setattr(sys, "argv", ["engine_throughput.py", "--quick", "--systems", "hf-cb"])
    assert engine_throughput.main() == 0
    assert [(w, args.num_requests) for w, args in ran] == [("uniform", 4)]


def test_hf_cb_cache_holds_every_request_and_no_more(engine_throughput):
    from transformers import ContinuousBatchingConfig

    reqs = [engine_throughput.BenchRequest([1] * 500, 256)] * 64  # mixed's longest, 64 times
    config = engine_throughput.hf_cb_config(reqs)
    assert ContinuousBatchingConfig().page_size == 256
    assert config.num_blocks == 64 * 3 + 1  # 756 tokens in 3 pages each, and a spare page
    assert config.max_batch_tokens == engine_throughput.MAX_BATCHED_TOKENS
    assert config.max_requests_per_batch == 64


def test_hf_cb_runs_every_request_to_its_length(engine_throughput, tiny_model_path):
    model = engine_throughput.load_hf(Path(tiny_model_path), "cpu", "float32")
    reqs = [engine_throughput.BenchRequest([5, 6, 7], 4), engine_throughput.BenchRequest([8], 9)]
    assert engine_throughput.run_hf_cb(model, reqs) == 13


def test_shaped_model_tokenizer_decodes_every_token_id(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        from common import make_vocab_tokenizer
    finally:
        sys.path.remove(str(BENCH))
    from transformers import AutoTokenizer

    make_vocab_tokenizer(100).save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.decode(list(range(100))).split() == [f"t{i}" for i in range(100)]


@pytest.fixture(scope="module")
def workloads():
    return bench_module("routing_workloads")


def test_routing_workloads_are_the_same_for_the_same_seed(workloads):
    for make in (
        lambda seed: workloads.multi_turn(8, seed=seed, rate=4.0),
        lambda seed: workloads.shared_system(4, 3, seed=seed, rate=16.0),
        lambda seed: workloads.unique_prompts(8, seed=seed),
    ):
        assert make(0) == make(0)
        assert make(0) != make(1)


def test_multi_turn_conversations_grow_their_history_turn_by_turn(workloads):
    convs = workloads.multi_turn(20, seed=0, rate=4.0)
    assert len({c.session_id for c in convs}) == 20
    assert [c.start_s for c in convs] == [i / 4.0 for i in range(20)]  # interleaved, steady
    assert {len(c.turns) for c in convs} <= set(range(4, 9)) and len(
        {len(c.turns) for c in convs}
    ) > 2
    for c in convs:
        assert len(c.max_tokens) == len(c.turns) and len(c.think_s) == len(c.turns) - 1
        assert 128 <= len(c.turns[0]) <= 384 and all(16 <= len(t) <= 96 for t in c.turns[1:])
        assert all(1.0 <= p <= 3.0 for p in c.think_s) and not c.system
    conv, history, prompts = convs[0], [], []
    for i, turn in enumerate(conv.turns):
        prompts.append(workloads.make_prompt(conv, history, turn, "tokens"))
        history.append((turn, [7] * conv.max_tokens[i], ""))
    for i in range(1, len(prompts)):  # the whole history, its answer, then the new message
        earlier = prompts[i - 1] + [7] * conv.max_tokens[i - 1]
        assert prompts[i] == earlier + list(conv.turns[i])


def test_shared_system_requests_interleave_every_prompt_with_each_question(workloads):
    convs = workloads.shared_system(4, 6, seed=0, rate=16.0, system_len=64)
    assert len(convs) == 24 and [c.start_s for c in convs] == [i / 16.0 for i in range(24)]
    systems = sorted({c.system for c in convs})
    assert len(systems) == 4 and all(len(s) == 64 for s in systems)
    assert len({c.session_id for c in convs}) == len({(c.session_id, c.system) for c in convs}) == 4
    for c in convs:
        assert len(c.turns) == 1 and 16 <= len(c.turns[0]) <= 48
        assert workloads.make_prompt(c, [], c.turns[0], "tokens") == [*c.system, *c.turns[0]]
    assert all(sum(c.system == s for c in convs) == 6 for s in systems)
    assert sum(a.system == b.system for a, b in itertools.pairwise(convs)) < 12  # not grouped


def test_unique_prompts_share_no_cached_block(workloads):
    from kvray.cluster.block_manager import prefix_hashes

    convs = workloads.unique_prompts(64, seed=0)
    firsts = [prefix_hashes(list(c.turns[0]), 16)[0] for c in convs]
    assert len(set(firsts)) == 64
    assert all(128 <= len(c.turns[0]) <= 512 and c.start_s == 0 for c in convs)


def test_ideal_counts_each_system_prompt_computed_once(workloads):
    convs = workloads.shared_system(3, 4, seed=0, rate=16.0, system_len=64)  # 4 blocks of 16
    sent = [(workloads.make_prompt(c, [], c.turns[0], "tokens"), [1, 2]) for c in convs]
    assert workloads.ideal_cached_tokens(sent, 16) == 3 * 3 * 64  # all but each prompt's first


def test_ideal_counts_a_turns_whole_history_but_the_last_answer_token(workloads):
    first, answer = list(range(1, 41)), list(range(100, 110))  # 40 + 10 tokens: 49 computed
    sent = [(first, answer), (first + answer + [200, 201], [])]
    assert workloads.ideal_cached_tokens(sent, 16) == 48  # 3 full blocks of the 49


def test_chat_turns_carry_their_history_as_messages(workloads):
    conv = workloads.shared_system(1, 1, seed=0, rate=1.0, system_len=5, question=(3, 3))[0]
    history = [((1, 2), [9], "an answer")]
    messages = workloads.make_prompt(conv, history, (3,), "chat")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"] == workloads.words(conv.system)
    assert messages[2]["content"] == "an answer" and len(messages[3]["content"].split()) == 1


@pytest.fixture(scope="module")
def answers():
    return bench_module("structured_answers")


@pytest.fixture(scope="module")
def structured():
    return bench_module("structured_workloads")


def test_structured_answers_cover_every_schema_with_valid_schemas(structured):
    import jsonschema

    assert len(structured.PROMPTS) == 50 and len(structured.SCHEMAS) == 20
    assert {name for name, _ in structured.PROMPTS} == set(structured.SCHEMAS)
    for schema in [*structured.SCHEMAS.values(), *(p for _, p in structured.TOOLS.values())]:
        jsonschema.Draft202012Validator.check_schema(schema)


def fake_stream(chunks: list[dict]):
    """An `openai` client whose chat.completions.create streams `chunks` (choice dicts)."""
    from types import SimpleNamespace as NS

    def to_chunk(choice: dict) -> NS:
        calls = [
            NS(index=c["index"], function=NS(name=c.get("name"), arguments=c.get("arguments")))
            for c in choice.get("tool_calls", [])
        ]
        delta = NS(content=None, tool_calls=calls or None)
        return NS(choices=[NS(delta=delta, finish_reason=choice.get("finish_reason"))])

    async def events():
        for choice in chunks:
            yield to_chunk(choice)

    async def create(**kwargs):
        assert kwargs["stream"] is True
        return events()

    return NS(chat=NS(completions=NS(create=create)))


def test_streamed_tool_calls_are_reassembled_by_index(answers):
    import asyncio

    client = fake_stream([
        {"tool_calls": [{"index": 0, "name": "get_weather", "arguments": ""}]},
        {"tool_calls": [{"index": 1, "name": "get_weather", "arguments": '{"city":'}]},
        {"tool_calls": [{"index": 0, "arguments": '{"city":"Paris",'}]},
        {"tool_calls": [{"index": 0, "arguments": '"unit":"celsius"}'}]},
        {"tool_calls": [{"index": 1, "arguments": '"Rome","unit":"kelvin"}'}]},
        {"finish_reason": "tool_calls"},
    ])  # fmt: skip
    mode = answers.Mode(sampled=False, streamed=True)
    calls, finish = asyncio.run(answers.ask_tools(client, "m", "hi", mode, 0))
    assert finish == "tool_calls"
    assert calls == [
        ("get_weather", '{"city":"Paris","unit":"celsius"}'),
        ("get_weather", '{"city":"Rome","unit":"kelvin"}'),
    ]
    assert answers.tool_call_error(calls[0], "get_weather") == ""
    assert "kelvin" in answers.tool_call_error(calls[1], None)  # not in the unit's enum
    assert "not the named" in answers.tool_call_error(calls[0], "book_flight")


def test_structured_answers_check_multiple_of_in_decimal(answers):
    schema = {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.01}
    assert answers.schema_error("0.07", schema) == ""  # 0.07 / 0.01 is 7.000000000000001
    assert "multiple of 0.01" in answers.schema_error("0.071", schema)
    assert "maximum" in answers.schema_error("10.5", schema)


def test_host_step_counts_a_nested_phase_only_once():
    host_step = bench_module("host_step")
    clock = iter([0.0, 1.0, 3.0, 4.0])  # outer starts, inner starts, inner ends, outer ends
    phases = host_step.Phases(lambda: next(clock))
    inner = phases.timed("inner", lambda: None)
    phases.timed("outer", inner)()
    assert phases.take() == {"inner": 2.0, "outer": 2.0}
    assert phases.take() == {}


def test_host_step_sampled_mix_covers_every_knob():
    host_step = bench_module("host_step")
    mix = [host_step.sampling_params("sampled", i, 8) for i in range(5)]
    assert {p.is_greedy for p in mix} == {True, False}
    assert any(p.top_p < 1 for p in mix) and any(p.top_k for p in mix)
    assert any(p.seed is not None for p in mix) and any(p.repetition_penalty for p in mix)
    assert all(p.is_greedy for p in (host_step.sampling_params("greedy", i, 8) for i in range(5)))


def test_memory_counts_only_the_pages_a_tensor_has_written():
    import torch

    from kvray.workers.host_memory import lazy_zeros

    memory = bench_module("memory")
    t = lazy_zeros((4 * 2**20,), torch.uint8)
    assert not t.any() and memory.resident_bytes(t) == 0  # read: the shared zero page
    t[: 2**20] = 1
    assert memory.resident_bytes(t) == 2**20
    assert memory.resident_bytes(torch.ones(2**20, dtype=torch.uint8)) == 2**20


def test_memory_breakdown_leaves_the_rest_of_the_resident_bytes(capsys):
    memory = bench_module("memory")
    mib = 2**20
    run = {"phases": [{"phase": "end", "rss": 1000 * mib, "peak": 1200 * mib}],
           "imports": 400 * mib, "weights": 250 * mib, "kv_resident": 90 * mib,
           "kv_cache": 2048 * mib, "malloc_free": 60 * mib, "num_kv_blocks": 5825,
           "dtype": "torch.bfloat16", "ready_s": 1.0, "requests_s": 2.0}  # fmt: skip
    memory.print_breakdown({"bf16": run})
    rows = {line[:28].strip(): line[28:].split() for line in capsys.readouterr().out.splitlines()}
    assert rows["resident"] == ["1000"] and rows["rest"] == ["200"]
    assert rows["KV cache, allocated"] == ["2048"]


def test_peers_table_shows_shares_of_the_limits_memory_and_first_tokens(capsys):
    peers = bench_module("peers")
    common = bench_module("common")
    gib = 2**30
    results = {
        "kvray bf16": {"tokens": 100, "seconds": 1.0, "imported": gib // 4, "peak": gib,
                       "rss": gib, "ttft_ms": 51.2},
        "llama.cpp q4_1": {"tokens": 192, "seconds": 1.0, "imported": gib // 4,
                           "peak": gib // 2, "rss": gib // 2, "ttft_ms": 102.4},
    }  # fmt: skip
    limits = common.HardwareLimits(matmul_flops=1e12, read_bytes=1e10)
    peers.print_table("W2 single", results, limits, 10**7, seed=0)
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == ["system", "tok/s", "kvray", "best/x", "of", "read", "BW",
                                "peak", "GiB", "end", "GiB", "TTFT", "ms", "of", "matmul"]  # fmt: skip
    # one stream reads every weight a token: 100 tok/s x 1e7 weights x 2 bytes of 1e10 B/s;
    # a first token is 2 FLOPs a weight for each of the prompt's 128 tokens (shares under 10%
    # with decimals, as engine_throughput.py prints them)
    assert lines[3].split()[2:] == ["100.0", "1.00x", "20%", "1.00", "1.00", "51.2", "5.00%"]
    assert lines[4].split()[2:] == ["192.0", "0.52x", "12%", "0.50", "0.50", "102.4", "2.50%"]
    peers.verdicts([{"W2 single": results}])
    lines = capsys.readouterr().out.splitlines()
    assert (
        "kvray bf16 100.0 / llama.cpp q4_1 192.0 tok/s = 0.52x (target >= 1.2x: MISSES)"
        in (lines[2])
    )
    assert "kvray bf16 51.2 ms / llama.cpp q4_1 102.4 ms (target: no slower: meets)" in lines[3]
