"""Sibling projections fused into one matmul: same outputs, no held activations, safe fallback."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from kvray.workers.fused_projections import ProjectionSlice, SharedInputProjection, fuse_projections


def tiny_llama() -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_a_fused_model_computes_what_the_original_does():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        expected = model(ids).logits
        assert fuse_projections(model) == 4  # q/k/v and gate/up in each of 2 layers
        got = model(ids).logits
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.q_proj, ProjectionSlice)
    assert attention.k_proj.weight.shape == (32, 64)  # what model code may read
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_the_shared_output_is_released_once_every_sibling_has_read_it():
    shared = SharedInputProjection(torch.nn.Linear(8, 6), [2, 4])
    x = torch.randn(3, 8)
    assert shared.part(0, x).shape == (3, 2) and shared._output is not None
    assert shared.part(1, x).shape == (3, 4) and shared._output is None


def test_a_sibling_called_with_another_input_gets_its_own_result():
    linear = torch.nn.Linear(8, 6)
    shared = SharedInputProjection(linear, [2, 4])
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    shared.part(0, x)
    torch.testing.assert_close(shared.part(1, y), linear(y)[:, 2:])


def test_other_architectures_keep_their_layers():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2))
    assert fuse_projections(model) == 0
