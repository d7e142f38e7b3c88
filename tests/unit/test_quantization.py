"""Weight-only int8: the rounding, the layer swap, and the layer's two paths."""

from __future__ import annotations

import pytest
import torch

from kvray.workers import cpu_kernels, quantization
from kvray.workers.quantization import Int8Linear, quantize_int8, quantize_linears


def test_each_weight_is_within_half_a_step_of_its_groups_int8_value():
    w = torch.randn(64, 96) * torch.linspace(0.01, 10, 96)  # groups of very different sizes
    w[3, 32:64] = 0  # an all-zero group gets a harmless scale, not a division by zero
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert scale.dtype == torch.bfloat16 and scale.shape == (64, 96 // quantization.GROUP_SIZE)
    step = scale.float().repeat_interleave(quantization.GROUP_SIZE, dim=1)
    assert torch.all((q.float() * step - w).abs() <= step / 2 + 1e-6)
    assert torch.all(q[3, 32:64] == 0)


def test_plain_linears_are_swapped_and_a_tied_layer_is_quantized_once():
    shared = torch.nn.Linear(64, 64)
    model = torch.nn.ModuleDict(
        {
            "a": shared,
            "b": torch.nn.Sequential(shared, torch.nn.ReLU()),
            "c": torch.nn.Linear(32, 4),
            "odd": torch.nn.Linear(40, 4),  # 40 inputs are no whole groups: left as it is
        }
    )
    assert quantize_linears(model) == 2
    assert isinstance(model["a"], Int8Linear) and model["a"] is model["b"][0]
    assert isinstance(model["c"], Int8Linear) and type(model["odd"]) is torch.nn.Linear
    assert model["c"].weight.shape == (4, 32)  # the dequantized weight, for code that reads it


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_kernel_path_and_the_widened_path_agree(dtype, monkeypatch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40).to(dtype)
    layer = Int8Linear(linear)
    x = torch.randn(2, 5, 96).to(dtype)  # 10 rows: the kernel's path
    via_kernel = layer(x)
    widened = torch.nn.functional.linear(x, layer.dequantized(dtype), layer.bias)
    assert via_kernel.shape == widened.shape == (2, 5, 40)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(via_kernel.float(), widened.float(), atol=tol, rtol=tol)
    if layer.layout == "rows":  # past KERNEL_MAX_ROWS rows, the layer widens its weights
        monkeypatch.setattr(quantization, "KERNEL_MAX_ROWS", 0)
        assert torch.equal(layer(x), widened)
    # And both are the layer's own output to within the int8 rounding of its weights.
    torch.testing.assert_close(widened.float(), linear(x).float(), atol=0.05, rtol=0.05)


def test_an_unknown_quantization_is_refused_by_name():
    from kvray.workers.config import WorkerConfig

    with pytest.raises(ValueError, match="quantization must be int8, w8a8 or none, got 'int4'"):
        WorkerConfig(quantization="int4")


def test_the_compiled_dequantization_equals_the_torch_one():
    layer = Int8Linear(torch.nn.Linear(96, 24))
    assert layer._dequantize is not None  # the kernels build on the suite's machines
    for dtype in (torch.bfloat16, torch.float32):
        compiled = layer.dequantized(dtype)
        kernel, layer._dequantize = layer._dequantize, None  # the torch path
        assert compiled.dtype == dtype
        assert torch.equal(compiled, layer.dequantized(dtype))
        layer._dequantize = kernel


def test_panels_hold_the_same_weights_as_rows():
    """A bf16 layer keeps its int8 weights in panels (csrc/int8_panel.cpp): its rows, its
    dequantized weight and its outputs are those of the row layout's."""
    torch.manual_seed(1)
    if cpu_kernels.int8_panel() is None:
        pytest.skip("needs kvray's CPU kernels built for AVX512-BF16 (csrc/int8_panel.cpp)")
    linear = torch.nn.Linear(96, 40).to(torch.bfloat16)  # 40 features: a padded second panel
    layer = Int8Linear(linear)
    assert layer.layout == "panels"  # the panel kernel is built: a bf16 layer takes it
    weight, scale = quantize_int8(linear.weight.detach())
    got_weight, got_scale = layer.rows()
    assert torch.equal(got_weight, weight) and torch.equal(got_scale, scale)
    panel_kernel, layer._panel = layer._panel, None  # the row layout's paths from here
    layer.weight_int8, layer.scale = weight, scale
    # 3 rows: widened in registers; 30: each panel widened once for several tiles of rows
    xs = [torch.randn(n, 96).to(torch.bfloat16) for n in (3, 30)]
    expected_weight, expected = layer.dequantized(torch.bfloat16), [layer(x) for x in xs]
    layer._panel = panel_kernel
    layer.weight_int8, layer.scale = quantization.to_panels(weight, scale)
    assert torch.equal(layer.dequantized(torch.bfloat16), expected_weight)
    for x, e in zip(xs, expected):  # both sum bf16(weight * scale) * x in fp32, in two orders
        torch.testing.assert_close(layer(x).float(), e.float(), atol=2e-2, rtol=2e-2)


def test_panels_widen_for_onednn_from_amx_min_rows_where_there_is_amx():
    """On AMX CPUs a panel layer's prompt-sized inputs take one oneDNN matmul of the widened
    weights; fewer rows, and every input elsewhere, stay on the panel kernel."""
    if cpu_kernels.int8_panel() is None:
        pytest.skip("needs kvray's CPU kernels built for AVX512-BF16 (csrc/int8_panel.cpp)")
    torch.manual_seed(2)
    layer = Int8Linear(torch.nn.Linear(96, 40).to(torch.bfloat16))
    has_amx = "amx_bf16" in quantization.cpu_flags()
    assert layer.widen_from == (quantization.AMX_MIN_ROWS if has_amx else None)
    layer.widen_from = quantization.AMX_MIN_ROWS  # the AMX rule, on any CPU
    weight = layer.dequantized(torch.bfloat16)
    many = torch.randn(quantization.AMX_MIN_ROWS, 96).to(torch.bfloat16)
    assert torch.equal(layer(many), torch.nn.functional.linear(many, weight, layer.bias))
    few = many[: quantization.AMX_MIN_ROWS - 1]
    assert torch.equal(
        layer(few),
        layer._panel.linear(few, layer.weight_int8, layer.scale, 32, 40, layer.bias),
    )


@pytest.mark.parametrize("out_features", [20, 40])  # one panel, or two with padding
@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16, torch.float32])
def test_from_panels_inverts_to_panels(dtype, out_features):
    weight = torch.randint(-127, 128, (out_features, 96), dtype=torch.int8).to(dtype)
    scale = torch.ones(out_features, 3, dtype=torch.bfloat16)
    packed, _ = quantization.to_panels(weight, scale)
    assert torch.equal(quantization.from_panels(packed, out_features), weight)
