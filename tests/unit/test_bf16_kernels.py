"""The bf16 CPU paths: prepacked linear layers (kvray's kernel and oneDNN's) and the one-token
decode attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvray.workers import cpu_kernels, packed_linear
from kvray.workers.attention import _attend_one_token
from kvray.workers.device import cpu_flags
from kvray.workers.packed_linear import PackedLinear, can_pack, pack_linears

needs_onednn_bf16 = pytest.mark.skipif(
    not can_pack(torch.device("cpu"), torch.bfloat16), reason="needs oneDNN with bf16 on CPU"
)


def kvray_kernel_or_skip() -> cpu_kernels.Bf16Linear:
    kernel = cpu_kernels.bf16_linear() if can_pack(torch.device("cpu"), torch.bfloat16) else None
    if kernel is None:
        pytest.skip("needs kvray's CPU kernels built for AVX512-BF16")
    return kernel


@pytest.fixture
def onednn_only(monkeypatch):
    monkeypatch.setattr(packed_linear, "_kvray_kernel", lambda in_features: None)


@needs_onednn_bf16
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_a_onednn_packed_linear_gives_the_plain_linear_results_bit_for_bit(rows, onednn_only):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 160, bias=True).to(torch.bfloat16)
    layer = PackedLinear(linear)
    assert layer.kernel == "oneDNN"
    x = torch.randn(2, rows, 96, dtype=torch.bfloat16)
    assert torch.equal(layer(x), linear(x))
    assert torch.equal(layer.weight, linear.weight)


# Shapes that end mid-panel (100, 7) and row counts that end mid-tile (13, 300): the kernel
# multiplies 32 features by up to 12 rows at a time.
@pytest.mark.parametrize(
    ("out_features", "in_features", "bias"),
    [(160, 96, True), (100, 96, False), (7, 64, True), (1536, 576, False)],
)
@pytest.mark.parametrize("rows", [1, 2, 12, 13, 300])
def test_kvrays_bf16_linear_is_the_fp32_product_rounded_once(
    out_features, in_features, bias, rows, monkeypatch
):
    kvray_kernel_or_skip()
    # NOTE: on AMX CPUs the layers go to oneDNN; the kernel is tested there all the same.
    monkeypatch.setattr(packed_linear, "cpu_flags", lambda: cpu_flags() - {"amx_bf16"})
    torch.manual_seed(rows)
    linear = torch.nn.Linear(in_features, out_features, bias=bias).to(torch.bfloat16)
    layer = PackedLinear(linear)
    assert layer.kernel == "kvray"
    assert torch.equal(layer.weight, linear.weight)  # the packing loses nothing
    x = torch.randn(3, rows, in_features, dtype=torch.bfloat16)
    got = layer(x)
    assert got.shape == (3, rows, out_features) and got.dtype == torch.bfloat16
    exact = F.linear(
        x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float()
    )
    # One rounding to bf16 (half an ulp: 2^-9 relative) of sums that differ from exact ones by
    # fp32 error only.
    torch.testing.assert_close(got.float(), exact, rtol=2**-8, atol=1e-4)
    # And the same bits as F.linear but for rare last-bit roundings (both sum in input order).
    assert (got != linear(x)).sum() <= max(1, got.numel() // 100)


def test_kvrays_kernel_is_left_to_onednn_on_amx_and_for_odd_widths(monkeypatch):
    kvray_kernel_or_skip()
    assert PackedLinear(torch.nn.Linear(9, 8).to(torch.bfloat16)).kernel == "oneDNN"
    monkeypatch.setattr(packed_linear, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16"}))
    assert PackedLinear(torch.nn.Linear(8, 8).to(torch.bfloat16)).kernel == "oneDNN"


def test_kvrays_bf16_linear_refuses_mismatched_inputs():
    kernel = kvray_kernel_or_skip()
    packed = kernel.pack(torch.zeros(40, 16, dtype=torch.bfloat16))  # two panels
    with pytest.raises(RuntimeError, match="x has 8 features, weight expects 16"):
        kernel.linear(torch.zeros(1, 8, dtype=torch.bfloat16), packed, 40, None)
    with pytest.raises(RuntimeError, match="does not match 2 panels"):
        kernel.linear(torch.zeros(1, 16, dtype=torch.bfloat16), packed, 20, None)
    with pytest.raises(RuntimeError, match="in_features must be even"):
        kernel.pack(torch.zeros(4, 5, dtype=torch.bfloat16))


@needs_onednn_bf16
def test_packing_swaps_bf16_linears_only():
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8).to(torch.bfloat16), torch.nn.ReLU(), torch.nn.Linear(8, 8)
    )
    assert sum(pack_linears(model).values()) == 1
    assert isinstance(model[0], PackedLinear) and isinstance(model[2], torch.nn.Linear)
    assert not can_pack(torch.device("cpu"), torch.float32)


def test_bf16_decode_attention_matches_fp32_sdpa_within_bf16_rounding():
    torch.manual_seed(0)
    n, heads, kv_heads, context, dim = 5, 6, 2, 40, 32
    q = torch.randn(n, heads, dim)
    k, v = torch.randn(n, kv_heads, context, dim), torch.randn(n, kv_heads, context, dim)
    lengths = torch.tensor([1, 9, 17, 33, 40])
    mask = (torch.arange(context)[None, :] < lengths[:, None])[:, None, None, :]
    expected = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, enable_gqa=True)[
        :, :, 0
    ]
    got = _attend_one_token(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, None)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=3e-2, rtol=3e-2)
    # A masked-out slot holding garbage changes nothing: sequence 0 sees one token only.
    k[0, :, 1:] = 1e4
    again = _attend_one_token(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, None)
    assert torch.equal(again[0], got[0])


class ScaledHead(torch.nn.Linear):
    """A subclass with its own forward, as some models' routers and output heads are."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


@needs_onednn_bf16
def test_subclasses_keep_their_forward_and_a_shared_layer_is_packed_once():
    shared = torch.nn.Linear(8, 8).to(torch.bfloat16)
    head = ScaledHead(8, 8).to(torch.bfloat16)
    model = torch.nn.ModuleDict({"a": shared, "b": torch.nn.Sequential(shared), "head": head})
    assert sum(pack_linears(model).values()) == 1
    assert model["a"] is model["b"][0] and model["head"] is head
    assert torch.equal(model["a"].weight, shared.weight)  # unpacked on request, bit for bit
