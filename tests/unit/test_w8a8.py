"""int8 weights times int8 activations (`quantization: w8a8`): the activations' rounding, the
kernel against its torch reference, the layer swap, refusals and a served tiny model."""

from __future__ import annotations

import pytest
import torch

from kvray.workers import cpu_kernels
from kvray.workers.device import cpu_flags
from kvray.workers.w8a8 import (
    Int8ActLinear,
    from_panels,
    hadamard32,
    quantize_linears_w8a8,
    quantize_rows,
    reference_linear,
    to_panels,
)


def kernel() -> cpu_kernels.W8a8:
    ops = cpu_kernels.w8a8()
    if ops is None:
        pytest.skip("needs kvray's CPU kernels built for AVX2 (csrc/w8a8_linear.cpp)")
    return ops


def test_the_build_takes_the_vnni_and_amx_paths_where_the_cpu_has_them():
    flags = cpu_flags()
    expected = "avx512-vnni" if "avx512_vnni" in flags else "avx2"
    if "amx_int8" in flags and "avx512f" in flags:  # Linux grants the tile state by default
        expected += "+amx-int8"
    assert kernel().isa == expected


def test_the_rotation_is_the_symmetric_hadamard_matrix_and_its_own_inverse_over_32():
    """hadamard32 multiplies each block of 32 by H[i, j] = (-1)^popcount(i & j) (Sylvester's,
    symmetric), so H H = 32 I: the layer's rotated weights W H / 32 times rotated inputs H x
    give W x."""
    i = torch.arange(32)
    bits = (i[:, None] & i[None, :]).tolist()
    expected = torch.tensor([[(-1.0) ** bin(b).count("1") for b in row] for row in bits])
    assert torch.equal(hadamard32(torch.eye(32)), expected)
    x = torch.randn(3, 96)
    torch.testing.assert_close(hadamard32(hadamard32(x)) / 32, x)


def test_activations_round_to_the_nearest_step_of_their_rotated_row():
    x = torch.randn(3, 96) * torch.linspace(0.01, 10, 96)  # inputs of very different sizes
    x[1] = 0  # an all-zero row: zeros and a zero scale, no division by zero
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and q.shape == (3, 128) and q.abs().max() == 127
    assert torch.all(q[:, 96:] == 0)  # padded to whole tile products (64)
    assert scale.dtype == torch.float32 and scale.shape == (3,)
    z = hadamard32(x)
    assert torch.all((q[:, :96].float() * scale[:, None] - z).abs() <= scale[:, None] / 2 * 1.0001)
    assert torch.all(q[1] == 0) and scale[1] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_quantizes_activations_bit_for_bit_as_torch(dtype):
    ops = kernel()
    torch.manual_seed(0)
    for rows in (1, 5, 33):
        x = (torch.randn(rows, 576) * torch.rand(rows, 1) * 10).to(dtype)
        x[0] = 0
        x[-1, :] = 0
        x[-1, ::32] = 0.5  # rotated: every value of the row exactly at amax
        q, scale = ops.quantize(x)
        expected_q, expected_scale = quantize_rows(x)
        assert torch.equal(q, expected_q) and torch.equal(scale, expected_scale)


# SmolLM2-135M's shapes (out, in): fused q/k/v, o, k or v alone, fused gate/up, down; widths
# whose last panel (32 features) holds 1 (its second slice all padding) and 24; a small width
# (inputs padded to 64).
SHAPES = [
    (960, 576),
    (576, 576),
    (192, 576),
    (3072, 576),
    (576, 1536),
    (577, 64),
    (600, 64),
    (64, 32),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_kernel_equals_the_torch_reference_bit_for_bit(shape, dtype):
    """The int32 dots are exact on every path and the scaling is the same fp32 operations, so
    the kernel gives the reference's bits. The rows cover whole tiles and every remainder
    (AVX512-VNNI and AVX2: 4 rows; AMX, from 16 rows: blocks of 32), the shapes whole panels
    and padded ones."""
    ops = kernel()
    torch.manual_seed(shape[0] + shape[1])
    out_features, in_features = shape
    weight, scale = quantize_rows(torch.randn(out_features, in_features) * 0.05, weights=True)
    bias = torch.randn(out_features)
    for rows in (1, 2, 3, 7, 16, 17, 33, 48, 128):
        x = torch.randn(rows, in_features).to(dtype)
        for b in (None, bias):
            got = ops.linear(x, *to_panels(weight, scale), out_features, b)
            assert got.dtype == dtype and got.shape == (rows, out_features)
            assert torch.equal(got, reference_linear(x, weight, scale, b)), f"{rows} rows"


@pytest.mark.parametrize("rows", [5, 40])  # the VNNI (or AVX2) path and the tile unit's
def test_the_largest_products_neither_saturate_nor_overflow(rows):
    """Weights at +-127 (the AVX2 path's s16 pairs at their bound, the VNNI path's unsigned
    operand at 255), and one row and feature where every product is +127^2: an input of 1 at
    the start of each block rotates to a block of ones, quantized to 127 throughout."""
    ops = kernel()
    g = torch.Generator().manual_seed(4)
    weight = (torch.randint(0, 2, (48, 1536), generator=g).to(torch.int8) * 2 - 1) * 127
    weight[0] = 127
    scale = torch.full((48,), 0.01)
    x = torch.randn(rows, 1536, generator=g)
    x[0] = 0
    x[0, ::32] = 1.0
    got = ops.linear(x, *to_panels(weight, scale), 48, None)
    assert torch.equal(got, reference_linear(x, weight, scale, None))
    expected = 1536 * 127 * 127 * (1 / 127) * 0.01  # scale 1 / 127 (amax 1)
    assert got[0, 0].item() == pytest.approx(expected, rel=1e-6)


def test_the_reference_is_the_float_product_to_within_the_rounding_of_both():
    torch.manual_seed(2)
    w = torch.randn(64, 128) * 0.05
    x, bias = torch.randn(5, 128), torch.randn(64)
    got = reference_linear(x, *quantize_rows(w, weights=True), bias)
    exact = x @ w.T + bias
    # Two 8-bit roundings per product: ~1% of a typical output's size here.
    assert (got - exact).abs().max() < 0.02 * exact.abs().max()
    assert not torch.equal(got, exact)  # the activations were quantized


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_gives_the_same_output_alone_and_in_a_batch(dtype):
    """Bit for bit, whichever path each size takes (on AMX CPUs 40 rows take the tile unit and
    one row the VNNI path: the same operations on the same exact sums)."""
    layer = Int8ActLinear(torch.nn.Linear(576, 1539).to(dtype))  # an odd, padded last panel
    x = torch.randn(40, 576).to(dtype)
    x[3] = 0  # an all-zero row: its outputs are the bias, bit for bit on both paths
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    batch = layer(x).view(bits)
    assert all(torch.equal(layer(x[i : i + 1])[0].view(bits), batch[i]) for i in range(40))


def test_plain_linears_are_swapped_and_a_tied_layer_is_quantized_once():
    shared = torch.nn.Linear(64, 64)
    model = torch.nn.ModuleDict(
        {
            "a": shared,
            "b": torch.nn.Sequential(shared, torch.nn.ReLU()),
            "c": torch.nn.Linear(32, 4, bias=False),
            "odd": torch.nn.Linear(40, 4),  # 40 inputs are no whole blocks: left as it is
        }
    )
    assert quantize_linears_w8a8(model) == 2
    assert isinstance(model["a"], Int8ActLinear) and model["a"] is model["b"][0]
    assert isinstance(model["c"], Int8ActLinear) and type(model["odd"]) is torch.nn.Linear
    y = model["c"](torch.randn(2, 3, 32))
    assert y.shape == (2, 3, 4)


def test_the_weight_property_rotates_the_weights_back():
    """For model code that reads a linear layer's weight: the dequantized rotated rows times H
    (`(W H / 32) H = W`), within the rotated rows' rounding (half a step each, 32 per input)."""
    torch.manual_seed(7)
    linear = torch.nn.Linear(96, 40)
    layer = Int8ActLinear(linear)
    weight = layer.weight
    assert weight.shape == (40, 96) and weight.dtype == torch.float32
    _, scale = layer.rows()
    bound = 32 * scale[:, None] / 2
    assert torch.all((weight - linear.weight.detach()).abs() <= bound)
    assert (weight - linear.weight.detach()).abs().max() < 0.1 * linear.weight.abs().max()


def test_panels_hold_the_same_weights_as_rows():
    weight, scale = quantize_rows(torch.randn(577, 64), weights=True)  # a padded last panel
    packed, packed_scale = to_panels(weight, scale)
    assert packed.shape == (19, 16, 32, 4) and packed_scale.shape == (19, 1, 32)
    assert torch.equal(packed[1, 2, 3], weight[32 + 3, 8:12])  # panel 1, inputs 8-11, feature 3
    assert torch.equal(packed[1, 2, 19], weight[32 + 19, 8:12])  # its second slice
    assert torch.equal(packed_scale[1, 0, 19], scale[32 + 19])
    assert torch.all(packed[18, :, 1:] == 0)  # the padding
    got_weight, got_scale = from_panels(packed, packed_scale, 577)
    assert torch.equal(got_weight, weight) and torch.equal(got_scale, scale)


def test_the_layer_falls_back_to_the_reference_without_the_kernel(monkeypatch):
    torch.manual_seed(3)
    linear = torch.nn.Linear(96, 40)
    with_kernel = Int8ActLinear(linear)
    monkeypatch.setattr(cpu_kernels, "w8a8", lambda: None)
    layer = Int8ActLinear(linear)
    x = torch.randn(2, 5, 96)
    weight, scale = quantize_rows(linear.weight.detach(), weights=True)
    expected = reference_linear(x.view(10, 96), weight, scale, linear.bias)
    assert torch.equal(layer(x), expected.view(2, 5, 40))
    assert torch.equal(layer.weight, with_kernel.weight)
    assert torch.equal(with_kernel(x), layer(x))


def test_widths_not_divisible_by_32_are_refused_by_name():
    with pytest.raises(ValueError, match="w8a8 needs in_features divisible by 32, got 40"):
        Int8ActLinear(torch.nn.Linear(40, 8))


def test_layers_off_the_cpu_are_refused_by_name():
    with pytest.raises(ValueError, match="w8a8 layers run on CPU only, got a layer on meta"):
        Int8ActLinear(torch.nn.Linear(64, 8, device="meta"))


def test_the_mode_is_a_known_quantization():
    from kvray.workers.config import WorkerConfig

    assert WorkerConfig(quantization="w8a8").quantization == "w8a8"
    with pytest.raises(ValueError, match="quantization must be int8, w8a8 or none, got 'w4a8'"):
        WorkerConfig(quantization="w4a8")


def test_a_tiny_model_served_with_w8a8_generates_as_hf_with_the_same_layers(tiny_model_path):
    """The engine's greedy tokens equal HF `generate` over the same model with its linear
    layers swapped for `Int8ActLinear` (each row is quantized on its own, so batching and the
    paged attention's fp32 rounding are the only differences)."""
    from transformers import AutoModelForCausalLM

    from kvray import LLM, SamplingParams
    from tests.helpers import hf_greedy

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # the engine runs with ignore_eos
    assert quantize_linears_w8a8(model) > 0
    g = torch.Generator().manual_seed(5)
    prompts = [
        torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (3, 40)
    ]
    refs = [hf_greedy(model, p, 16) for p in prompts]
    llm = LLM(tiny_model_path, max_model_len=128, quantization="w8a8")
    assert any(isinstance(m, Int8ActLinear) for m in llm.worker.model.modules())
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outputs = [o.token_ids for o in llm.generate(prompts, params)]
    for p, out, ref in zip(prompts, outputs, refs):
        assert out == ref, f"prompt of {len(p)} tokens:\n kvray: {out}\n    hf: {ref}"
