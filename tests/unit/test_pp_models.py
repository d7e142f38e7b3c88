"""kvray's own models split into pipeline stages (fp32, gloo, one process a rank): two stages
compute one rank's logits bit for bit (the same operations in the same order; the hidden
states cross between processes as they are), tensor_parallel_size 2 x pipeline_parallel_size 2
follows tensor parallelism's rule (one rank's greedy tokens, logits within 1e-4), each stage
holds only its layers and their KV cache, and what stages cannot split is refused by name. One
spawn of four processes serves the whole module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from transformers import AutoConfig

from kvray.workers.models import load_model, model_class
from kvray.workers.models.layers import Placement
from kvray.workers.models.loader import checkpoint_weights
from kvray.workers.models.pipeline import make_stage, split_layers
from kvray.workers.rank_group import group_output, output_rank
from kvray.workers.tensor_parallel import join_group
from tests.unit.test_tp_models import (
    CPU,
    SHAPE,
    assert_follows,
    hf_model,
    kvray_greedy,
    one_thread,  # noqa: F401  (an autouse fixture: this module's tests run on one thread too)
    placement,
    prompts,
)

CONFIGS = {
    # biases on every projection; two layers: one a stage
    "llama": lambda: transformers.LlamaConfig(**SHAPE, attention_bias=True, mlp_bias=True),
    # tied embeddings (the last stage keeps its own copy), a window on layers 1 and 2, and
    # three layers: the first stage takes two
    "qwen2": lambda: transformers.Qwen2Config(
        **{**SHAPE, "num_hidden_layers": 3}, tie_word_embeddings=True, use_sliding_window=True,
        sliding_window=8, max_window_layers=1,
    ),
    # one key/value head, replicated over both tensor-parallel ranks of a stage
    "mistral": lambda: transformers.MistralConfig(
        **{**SHAPE, "num_key_value_heads": 1}, sliding_window=8
    ),
}  # fmt: skip


# (tensor_parallel_size, pipeline_parallel_size) of each run, in order: ranks 0 and 1 of the
# four processes run the second after the first (one spawn: starting processes is the cost)
RUNS = ((2, 2), (1, 2))


def build_hf(arch: str) -> torch.nn.Module:
    return hf_model(CONFIGS[arch]())


def _rank_main(rank: int, folders: dict[str, str], out: str) -> None:
    torch.set_num_threads(1)
    for tp, pp in RUNS:
        if rank < tp * pp:
            _run(rank, tp, pp, folders, Path(out) / f"tp{tp}pp{pp}")


def _run(rank: int, tp: int, pp: int, folders: dict[str, str], out: Path) -> None:
    """One rank: join the groups, load each checkpoint's stage shard, generate, save."""
    groups = join_group(
        rank=rank,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        init_method=f"file://{out}.init",
        device=CPU,
    )
    results: dict[str, Any] = {}
    try:
        for arch, folder in folders.items():
            config = AutoConfig.from_pretrained(folder)
            stage = make_stage(
                config.num_hidden_layers,
                index=groups.stage_index,
                num_stages=pp,
                links=groups.links,
            )
            model = load_model(config, checkpoint_weights(folder), placement(groups.tensor), stage)
            results[arch] = {
                "generated": kvray_greedy(model, prompts(config.vocab_size), groups.links),
                "numels": {name: p.numel() for name, p in model.named_parameters()},
                "kv_cache_spec": model.kv_cache_spec(torch.float32),
                "stage": (stage.index, list(stage.layers)),
                "head": None if model.lm_head is None else model.lm_head.weight.clone(),
            }
    finally:
        dist.destroy_process_group()
    torch.save(results, f"{out}.rank{rank}.pt")


@pytest.fixture(scope="module")
def hf_models() -> dict[str, Any]:
    return {arch: build_hf(arch) for arch in CONFIGS}


@pytest.fixture(scope="module")
def folders(hf_models, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pp-models")
    saved = {}
    for arch, model in hf_models.items():
        saved[arch] = str(root / arch)
        model.save_pretrained(saved[arch])
    return saved


@pytest.fixture(scope="module")
def runs(folders, tmp_path_factory) -> dict[tuple[int, int], list[dict]]:
    """Every rank's results of each run in `RUNS`, rank order."""
    root = tmp_path_factory.mktemp("pp")
    world = max(tp * pp for tp, pp in RUNS)
    mp.spawn(_rank_main, args=(folders, str(root)), nprocs=world, join=True)
    return {
        (tp, pp): [
            torch.load(root / f"tp{tp}pp{pp}.rank{r}.pt", weights_only=False)
            for r in range(tp * pp)
        ]
        for tp, pp in RUNS
    }


@pytest.fixture(scope="module")
def two_stages(runs) -> list[dict]:
    return runs[1, 2]


@pytest.fixture(scope="module")
def two_by_two(runs) -> list[dict]:
    return runs[2, 2]


@pytest.fixture(scope="module")
def one_rank(folders) -> dict[str, Any]:
    """The whole model on one rank, loaded from the same checkpoints."""
    return {
        arch: load_model(
            AutoConfig.from_pretrained(folder), checkpoint_weights(folder), placement()
        )
        for arch, folder in folders.items()
    }


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_two_stages_compute_one_ranks_logits_bit_for_bit(arch, one_rank, two_stages):
    model = one_rank[arch]
    alone = kvray_greedy(model, prompts(model.config.vocab_size))
    first, last = (rank[arch]["generated"] for rank in two_stages)
    for (tokens0, logprobs0), (tokens1, logprobs1), (tokens, logprobs) in zip(first, last, alone):
        assert tokens0 == tokens1 == tokens, (tokens0, tokens1, tokens)
        assert logprobs0 == []  # the first stage has no logits
        for got, expected in zip(logprobs1, logprobs, strict=True):
            assert torch.equal(got, expected), (got - expected).abs().max()


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_two_by_two_ranks_follow_one_rank_as_tensor_parallelism_does(arch, one_rank, two_by_two):
    model = one_rank[arch]
    alone = kvray_greedy(model, prompts(model.config.vocab_size))
    generated = [rank[arch]["generated"] for rank in two_by_two]
    for rank in (0, 1, 3):  # every rank holds rank 2's tokens
        assert [g[0] for g in generated[rank]] == [g[0] for g in generated[2]]
    for got, reference in zip(generated[2], alone):
        assert_follows(got, reference, atol=1e-4)
    for got, other in zip(generated[2], generated[3]):  # both last-stage ranks: all the logits
        assert all(torch.equal(a, b) for a, b in zip(got[1], other[1]))


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_each_stage_holds_its_layers_and_their_kv_cache_only(arch, one_rank, two_stages):
    model = one_rank[arch]
    full = {name: p.numel() for name, p in model.named_parameters()}
    layers = model.config.num_hidden_layers
    expected_layers = [list(r) for r in split_layers(layers, 2)]
    whole_spec = model.kv_cache_spec(torch.float32)
    for index, rank in enumerate(two_stages):
        got = rank[arch]
        assert got["stage"] == (index, expected_layers[index])
        names = {f"model.layers.{i}." for i in expected_layers[index]}
        mine = {n for n in full if any(n.startswith(prefix) for prefix in names)}
        mine |= {"model.embed_tokens.weight"} if index == 0 else {"model.norm.weight"}
        expected = {n: full[n] for n in mine}
        if index == 1:  # tied (qwen2): its own copy of the embedding
            expected["lm_head.weight"] = full["model.embed_tokens.weight"]
        assert got["numels"] == expected
        spec = got["kv_cache_spec"]
        assert spec.num_layers == len(expected_layers[index])
        assert spec.bytes_per_block(4) * layers == whole_spec.bytes_per_block(4) * spec.num_layers
    if arch == "qwen2":
        embedding = model.model.embed_tokens.weight
        assert torch.equal(two_stages[1][arch]["head"], embedding)


def test_layers_split_contiguously_the_first_stages_taking_the_remainder():
    assert split_layers(30, 2) == [range(0, 15), range(15, 30)]
    assert split_layers(3, 2) == [range(0, 2), range(2, 3)]
    assert split_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert split_layers(2, 1) == [range(0, 2)]


def test_more_stages_than_layers_are_refused_naming_pipeline_parallel_size():
    with pytest.raises(ValueError) as error:
        make_stage(2, index=0, num_stages=3)
    message = str(error.value)
    assert "pipeline_parallel_size (3) is larger than the model's num_hidden_layers (2)" in message


def test_other_architectures_refuse_pipeline_stages_by_name():
    assert model_class("gpt2", pipeline_parallel_size=1) is None
    with pytest.raises(ValueError, match="pipeline_parallel_size 2 needs one of kvray's own"):
        model_class("gpt2", pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size 2 x pipeline_parallel_size 2"):
        model_class("gpt2", tensor_parallel_size=2, pipeline_parallel_size=2)


def test_the_first_rank_of_the_last_stage_answers_for_the_group():
    from kvray.workers.protocol import StepOutput

    assert [output_rank(1, 1), output_rank(2, 1), output_rank(1, 2), output_rank(2, 2)] == [
        0, 0, 1, 2,
    ]  # fmt: skip
    outputs = [StepOutput(5, [1], [9]) for _ in range(4)]
    outputs[2] = StepOutput(5, [1], [9], forward_s=0.3)
    assert group_output(outputs, output_rank=2) is outputs[2]
    outputs[0] = StepOutput(5, [1], [8])  # a stage that took other tokens
    with pytest.raises(RuntimeError, match="rank 0 holds"):
        group_output(outputs, output_rank=2)


def test_a_stage_builds_without_a_group_on_the_meta_device():
    config = CONFIGS["qwen2"]()
    meta = Placement(placement().parallel, torch.float32, torch.device("meta"))
    first = model_class("qwen2")(config, meta, make_stage(3, index=0, num_stages=2))
    last = model_class("qwen2")(config, meta, make_stage(3, index=1, num_stages=2))
    assert first.lm_head is None and first.model.norm is None
    assert last.model.embed_tokens is None and last.lm_head is not None
    assert sorted(first.model.layers) == ["0", "1"] and sorted(last.model.layers) == ["2"]
