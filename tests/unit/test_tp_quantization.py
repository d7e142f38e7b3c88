"""int8 weight-only layers on tensor-parallel shards (workers/models/ with `quantization: int8`):
two ranks (two processes, gloo, fp32) follow one rank's int8 model, each rank holds half of
its int8 bytes, and a rank's part of a row-parallel layer quantizes to the one-rank layer's
values. One spawn of two ranks serves those tests; `quantization: w8a8` has one more (its
row-parallel layers scale each rank's part of a row on its own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from transformers import AutoConfig

from kvray.workers import execution_plan as plans
from kvray.workers.config import WorkerConfig
from kvray.workers.models import load_model
from kvray.workers.models.layers import Placement
from kvray.workers.models.loader import checkpoint_weights
from kvray.workers.models.parallel import SINGLE_RANK, init_process_group, split_sizes
from kvray.workers.quantization import GROUP_SIZE, Int8Linear, quantize_linears
from kvray.workers.tensor_parallel import split_unit
from kvray.workers.w8a8 import Int8ActLinear
from tests.unit.test_tp_models import (
    assert_follows,
    hf_greedy,
    hf_model,
    kvray_greedy,
    one_thread,  # noqa: F401  (an autouse fixture: this module's tests run on one thread too)
    prompts,
)

CPU = torch.device("cpu")
INT8 = WorkerConfig(quantization="int8", tensor_parallel_size=2)
W8A8 = WorkerConfig(quantization="w8a8", tensor_parallel_size=2)
# Every split on whole groups of 32 input features: head_dim 32 (o_proj: 2 heads a rank),
# intermediate 160 (5 groups: 96 and 64 columns a rank), hidden 64 (2 groups). Biases on every
# layer: a row-parallel layer's is added once, after the all-reduce, not in each rank's kernel.
SHAPE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
    initializer_range=0.2,  # top logits well apart: greedy tokens do not hinge on rounding
)  # fmt: skip
# The layers whose weights the ranks split, as named in kvray's model
SPLIT = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")


def build_hf() -> Any:
    return hf_model(transformers.LlamaConfig(**SHAPE, attention_bias=True, mlp_bias=True))


def int8_model(config: Any, weights: Any, parallel: Any, settings: WorkerConfig = INT8) -> Any:
    """kvray's model of one rank, int8 (or w8a8) as the worker prepares it (`execution_plan`)."""
    placement = Placement(parallel, torch.float32, CPU, split_unit(settings))
    model = load_model(config, weights, placement)
    plan = plans.decide_plan(model, device=CPU, dtype=torch.float32, settings=settings)
    plans.prepare_model(model, plan)
    return model


def int8_layers(model: Any) -> dict[str, tuple[int, torch.Tensor]]:
    """Each int8 layer's weight bytes (int8 values and scales; not its bias, which a
    row-parallel layer keeps whole) and dequantized weight [out, in], by its module's name."""
    layers = {}
    for name, module in model.named_modules():
        if type(module) is Int8Linear:
            size = sum(b.numel() * b.element_size() for b in (module.weight_int8, module.scale))
            layers[name.removesuffix(".kernel")] = (size, module.weight)
    return layers


def _rank_main(rank: int, init_file: str, folder: str, out: str, quantization: str) -> None:
    torch.set_num_threads(1)
    parallel = init_process_group(
        rank=rank, world_size=2, init_method=f"file://{init_file}", device=CPU
    )
    try:
        config = AutoConfig.from_pretrained(folder)
        settings = W8A8 if quantization == "w8a8" else INT8
        model = int8_model(config, checkpoint_weights(folder), parallel, settings)
        result = {"generated": kvray_greedy(model, prompts(config.vocab_size)),
                  "layers": int8_layers(model)}  # fmt: skip
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def hf() -> Any:
    return build_hf()


@pytest.fixture(scope="module")
def one_rank(hf: Any) -> Any:
    return int8_model(hf.config, hf.state_dict().items(), SINGLE_RANK)


@pytest.fixture(scope="module")
def two_ranks(hf: Any, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return spawn_two_ranks(hf, tmp_path_factory.mktemp("tp-int8"), "int8")


def spawn_two_ranks(hf: Any, root: Path, quantization: str) -> list[dict]:
    hf.save_pretrained(root / "model")
    args = (str(root / "init"), str(root / "model"), str(root), quantization)
    mp.spawn(_rank_main, args=args, nprocs=2)
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_one_rank_int8_follows_transformers_int8(hf, one_rank):
    """The same int8 weights as `quantize_linears` gives transformers' model (per output row,
    so fusing q/k/v and gate/up changes none)."""
    quantized = build_hf()
    quantize_linears(quantized)
    for got, ref in zip(kvray_greedy(one_rank, prompts(128)),
                        (hf_greedy(quantized, p) for p in prompts(128))):  # fmt: skip
        assert_follows(got, ref, atol=1e-5)


def test_two_int8_ranks_follow_one_int8_rank(one_rank, two_ranks):
    """Each rank's int8 values are the one-rank model's (see the next test): what differs is
    only where the partial sums are added (fp32, all-reduced), so 1e-4 on log-probabilities,
    the fp32 tensor-parallel tests' tolerance."""
    first, second = (rank["generated"] for rank in two_ranks)
    single = kvray_greedy(one_rank, prompts(128))
    for got, other, alone in zip(first, second, single):
        assert got[0] == other[0]
        assert_follows(got, alone, atol=1e-4)


class _RanksParts(torch.nn.Module):
    """A row-parallel layer's two ranks in one process: each part of the inputs times its
    rank's w8a8 layer (quantized from that rank's columns; each row of inputs scaled on its
    own), the partial sums added (what the all-reduce does), then the bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, parts: list[int]):
        super().__init__()
        columns = weight.split(parts, dim=1)
        self.parts = parts
        self.ranks = torch.nn.ModuleList(
            Int8ActLinear(_linear(w.contiguous(), None)) for w in columns
        )
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = (rank(p) for rank, p in zip(self.ranks, x.split(self.parts, dim=-1)))
        y = first + second
        return y if self.bias is None else y + self.bias


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


def test_two_w8a8_ranks_follow_one_rank_that_quantizes_each_ranks_inputs_apart(hf, tmp_path):
    """w8a8 scales each row of a layer's inputs as a whole, so a row-parallel layer's rank
    scales its own part of each row: two ranks are one rank whose output projections and down
    projections run each rank's part on its own (`_RanksParts`), up to where the partial sums
    are added (fp32, all-reduced)."""
    one = int8_model(hf.config, hf.state_dict().items(), SINGLE_RANK, W8A8)
    state = hf.state_dict()
    parts = {  # SHAPE's splits over two ranks: query heads for o_proj, groups of 32 for down_proj
        "o_proj": [n * SHAPE["head_dim"] for n in split_sizes(SHAPE["num_attention_heads"], 2, "")],
        "down_proj": split_sizes(SHAPE["intermediate_size"], 2, "", unit=GROUP_SIZE),
    }
    assert parts == {"o_proj": [64, 64], "down_proj": [96, 64]}
    replaced = 0
    for name, module in one.named_modules():
        kind = name.rpartition(".")[2]
        if kind in parts:
            assert type(module.kernel) is Int8ActLinear  # the one-rank layer, replaced
            module.kernel = _RanksParts(state[f"{name}.weight"], state[f"{name}.bias"], parts[kind])
            replaced += 1
    assert replaced == 2 * SHAPE["num_hidden_layers"]
    first, second = (rank["generated"] for rank in spawn_two_ranks(hf, tmp_path, "w8a8"))
    for got, other, alone in zip(first, second, kvray_greedy(one, prompts(128))):
        assert got[0] == other[0]
        assert_follows(got, alone, atol=1e-4)


def test_each_rank_quantizes_its_shard_to_the_one_rank_layers_values(one_rank, two_ranks):
    """Column-parallel layers keep whole output rows; row-parallel ones split their inputs at
    group boundaries (`Placement.split_unit`), so every group, and its scale, is the same."""
    whole = int8_layers(one_rank)
    assert {name.rpartition(".")[2] for name in whole} == set(SPLIT)
    for name, (_, weight) in whole.items():
        parts = [rank["layers"][name][1] for rank in two_ranks]
        if name.endswith(("o_proj", "down_proj")):  # inputs split
            expected = list(weight.tensor_split([parts[0].shape[1]], dim=1))
        else:  # outputs split, each part of a fused layer on its own
            expected = [torch.cat(rows) for rows in zip(*(
                section.split(sizes) for section, sizes in _column_parts(name, weight)
            ))]  # fmt: skip
        for part, want in zip(parts, expected):
            assert torch.equal(part, want), name


def _column_parts(name: str, weight: torch.Tensor) -> list[tuple[torch.Tensor, list[int]]]:
    """The parts of a column-parallel layer's one-rank weight, each with its rank split."""
    if name.endswith("qkv_proj"):  # 2 query heads and 1 key/value head a rank
        return list(zip(weight.split([128, 64, 64]), [[64, 64], [32, 32], [32, 32]]))
    if name.endswith("gate_up_proj"):
        return [(part, [96, 64]) for part in weight.chunk(2)]
    return [(weight, [64, 64])]  # the vocabulary


def test_each_rank_holds_half_of_the_int8_bytes_of_the_split_layers(one_rank, two_ranks):
    whole = int8_layers(one_rank)
    for name, (size, _) in whole.items():
        if ".mlp." in name:  # 160 intermediate features: 96 and 64, whole groups each
            assert [rank["layers"][name][0] for rank in two_ranks] != [size // 2] * 2
            assert sum(rank["layers"][name][0] for rank in two_ranks) == size
            continue
        for rank in two_ranks:
            assert rank["layers"][name][0] * 2 == size, name


def test_int8_splits_intermediate_features_in_whole_groups():
    assert split_sizes(160, 2, "intermediate_size", unit=GROUP_SIZE) == [96, 64]
    assert split_sizes(1536, 2, "intermediate_size", unit=GROUP_SIZE) == [768, 768]  # SmolLM2
    assert split_sizes(95, 2, "intermediate_size", unit=GROUP_SIZE) == [48, 47]  # no groups
