"""The bf16 CPU paths: prepacked linear layers and the one-token decode attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvray.workers.attention import _attend_one_token
from kvray.workers.packed_linear import PackedLinear, can_pack, pack_linears


@pytest.mark.skipif(
    not can_pack(torch.device("cpu"), torch.bfloat16), reason="needs oneDNN with bf16 on CPU"
)
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_a_packed_linear_gives_the_plain_linear_results_bit_for_bit(rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 160, bias=True).to(torch.bfloat16)
    x = torch.randn(2, rows, 96, dtype=torch.bfloat16)
    assert torch.equal(PackedLinear(linear)(x), linear(x))


@pytest.mark.skipif(
    not can_pack(torch.device("cpu"), torch.bfloat16), reason="needs oneDNN with bf16 on CPU"
)
def test_packing_swaps_bf16_linears_only():
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8).to(torch.bfloat16), torch.nn.ReLU(), torch.nn.Linear(8, 8)
    )
    assert pack_linears(model) == 1
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


@pytest.mark.skipif(
    not can_pack(torch.device("cpu"), torch.bfloat16), reason="needs oneDNN with bf16 on CPU"
)
def test_subclasses_keep_their_forward_and_a_shared_layer_is_packed_once():
    shared = torch.nn.Linear(8, 8).to(torch.bfloat16)
    head = ScaledHead(8, 8).to(torch.bfloat16)
    model = torch.nn.ModuleDict({"a": shared, "b": torch.nn.Sequential(shared), "head": head})
    assert pack_linears(model) == 1
    assert model["a"] is model["b"][0] and model["head"] is head
    assert torch.equal(model["a"].weight, shared.weight)  # unpacked on request, bit for bit
