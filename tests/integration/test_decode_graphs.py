"""Decode steps replayed from compiled forwards (`decode_graphs: on`) on CPU: same tokens as
the eager steps, padding rows that never leak into real sequences, and eager steps when the
compile fails."""

from __future__ import annotations

import pytest
import torch

from kvray import LLM, SamplingParams
from kvray.workers import cpu_kernels, decode_graphs
from kvray.workers.tiny_model import make_tiny_model

pytestmark = pytest.mark.skipif(
    cpu_kernels.paged_decode_attention() is None,
    reason="kvray's paged decode kernel is not built here: no kernel to compile around",
)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 500, (n,), generator=g).tolist() for n in (1, 20, 70)]


def _generate(llm: LLM) -> list[list[int]]:
    # Different lengths: the batch shrinks 3 -> 2 -> 1, so steps run padded (3 of 4) and exact.
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 20, 28)]
    return [o.token_ids for o in llm.generate(_prompts(), params)]


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_bf16_decode_graphs_give_the_eager_tokens(model_cache_dir, quantization):
    kwargs = dict(
        cache_dir=model_cache_dir, dtype="bfloat16", max_model_len=256, quantization=quantization
    )
    eager = LLM("tiny", decode_graphs="off", **kwargs)
    assert eager.worker.runner.graphs is None
    expected = _generate(eager)

    llm = LLM("tiny", decode_graphs="on", max_graph_batch=4, **kwargs)
    graphs = llm.worker.runner.graphs
    assert graphs is not None and graphs.sizes == [2, 3, 4]  # one graph; one sequence runs at 2
    assert llm.worker.info.decode_graph_batch_sizes == (2, 3, 4)  # GetModelInfo reports them
    assert graphs.batch_size(1) == 2 and graphs.batch_size(3) == 3 and graphs.batch_size(5) is None
    assert _generate(llm) == expected
    # Every decode step replayed: 27 steps after the longest prompt's first token, the last 8
    # with one sequence padded to two.
    assert graphs.num_replays == 27
    # The padding rows wrote only the null block, which no sequence is ever given.
    assert llm.worker.kv_cache.null_block == llm.worker.info.num_kv_blocks
    assert _generate(llm) == expected  # and a second round, over reused blocks, agrees too


def test_two_engines_in_one_process_each_replay_their_own_graphs(model_cache_dir, tmp_path):
    # Replays skip Dynamo's guards, and frozen weights are guarded by identity only: two
    # engines of the same architecture and shapes, different weights, called in turn, must
    # each still run their own model.
    kwargs = dict(cache_dir=model_cache_dir, dtype="bfloat16", max_model_len=256)
    names = ("tiny", str(make_tiny_model(tmp_path / "tiny-seed-1", seed=1)))
    expected = [_generate(LLM(name, decode_graphs="off", **kwargs)) for name in names]
    assert expected[0] != expected[1]  # else a mix-up could not show
    engines = [LLM(name, decode_graphs="on", max_graph_batch=2, **kwargs) for name in names]
    for _ in range(2):
        assert [_generate(llm) for llm in engines] == expected
    assert all(llm.worker.runner.graphs.num_replays > 0 for llm in engines)


def test_a_failed_compile_leaves_eager_decode_steps(model_cache_dir, monkeypatch, caplog):
    def fail(self):
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(decode_graphs.DecodeGraphs, "_compile", fail)
    llm = LLM("tiny", cache_dir=model_cache_dir, dtype="bfloat16", decode_graphs="on",
              max_graph_batch=2, max_model_len=256)  # fmt: skip
    assert llm.worker.runner.graphs is None
    assert "decode graphs failed (RuntimeError: no compiler today)" in caplog.text
    assert all(len(t) == n for t, n in zip(_generate(llm), (12, 20, 28)))


def test_fp32_keeps_eager_steps_even_when_asked(model_cache_dir):
    llm = LLM("tiny", cache_dir=model_cache_dir, dtype="float32", decode_graphs="on",
              max_model_len=256)  # fmt: skip
    assert llm.worker.runner.graphs is None  # no paged kernel in fp32: SDPA, HF's exact path


def test_batch_sizes_cover_every_count_up_to_the_largest():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert decode_graphs.batch_sizes(6, cpu) == [2, 3, 4, 5, 6]  # one graph serves them all
    assert decode_graphs.batch_sizes(1, cpu) == [1]
    assert decode_graphs.batch_sizes(1, cuda) == [1]
    assert decode_graphs.batch_sizes(8, cuda) == [1, 2, 4, 8]
    assert decode_graphs.batch_sizes(40, cuda) == [1, 2, 4, 8, 16, 32, 40]
    sizes = decode_graphs.batch_sizes(256, cuda)
    assert all(next(b for b in sizes if b >= n) - n < 16 for n in range(1, 257))
