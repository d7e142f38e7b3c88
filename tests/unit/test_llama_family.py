"""kvray's own Llama-family forward gives bitwise the logits of transformers' forward, for each
architecture it covers, in fp32 and in bf16 with the worker's fused, packed, int8 or w8a8 layers."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from kvray.workers import cpu_kernels
from kvray.workers.attention import attention_context
from kvray.workers.attention import register as register_attention
from kvray.workers.device import cpu_flags
from kvray.workers.fused_projections import fuse_projections
from kvray.workers.kv_cache import KVCache, KVCacheSpec
from kvray.workers.llama_family import (
    DecodeStack,
    FamilyForward,
    family_forward,
    transformers_forward,
)
from kvray.workers.model_runner import ModelRunner, ScheduledSeq
from kvray.workers.packed_linear import can_pack, pack_linears
from kvray.workers.quantization import quantize_linears
from kvray.workers.w8a8 import quantize_linears_w8a8

SHAPE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SHAPE, head_dim=64),  # the rotary op's vectors
    # windows shorter than the prompts, so the masks matter
    "mistral": lambda: transformers.MistralConfig(**SHAPE, sliding_window=8),
    "qwen2": lambda: transformers.Qwen2Config(
        **SHAPE, use_sliding_window=True, sliding_window=8, max_window_layers=1
    ),
    "qwen3": lambda: transformers.Qwen3Config(**SHAPE, head_dim=16),  # q/k norms
}
BLOCK = 4


def build(arch: str, dtype: str, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        CONFIGS[arch](), attn_implementation=register_attention()
    )
    with torch.no_grad():  # the norms start at ones, which would hide their arithmetic
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model = model.to(device)
    if dtype == "float32":
        return model.eval()
    model = model.to(torch.bfloat16).eval()
    fuse_projections(model)  # as the worker prepares each (workers/worker.py)
    if dtype == "bfloat16-int8":
        quantize_linears(model)
    elif dtype == "bfloat16-w8a8":
        quantize_linears_w8a8(model)
    elif can_pack(torch.device(device), torch.bfloat16):  # as the worker decides
        pack_linears(model)
    return model


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "bfloat16-int8", "bfloat16-w8a8"])
def test_logits_equal_transformers_bitwise(arch, dtype):
    check_logits_equal_transformers(arch, dtype, "cpu")


def check_logits_equal_transformers(arch: str, dtype: str, device: str) -> None:
    """Two prompts in two chunks each (the second attends over cached context, past the
    window where there is one), then decodes: kvray's forward's logits equal transformers'."""
    model = build(arch, dtype, device)
    spec = KVCacheSpec.from_model_config(model.config, next(model.parameters()).dtype)
    cache = KVCache(spec, num_blocks=64, block_size=BLOCK, device=torch.device(device))
    runner = ModelRunner(model, cache, torch.device(device))
    assert isinstance(runner.forward, FamilyForward)
    ops = device == "cpu" and dtype != "float32" and cpu_kernels.rotary_embedding() is not None
    if ops:  # the C++ ops are what run
        assert runner.forward.layers[0].rotate is cpu_kernels.rotary_embedding()
        assert runner.forward.norm.__name__ == "fused"
    else:
        assert runner.forward.norm.__name__ == "_norm"
    # decode steps of layers in kvray's panels run as one C++ call where the kernels are built:
    # int8 or w8a8 panels, or bf16 ones where there is no AMX (there oneDNN's layout runs, a
    # layer a call); bf16 and int8 panels need AVX512-BF16, w8a8's AVX2
    if dtype == "bfloat16-w8a8":
        panels = cpu_kernels.w8a8() is not None
    elif dtype == "bfloat16-int8":
        panels = cpu_kernels.int8_panel() is not None
    else:
        panels = cpu_kernels.bf16_linear() is not None and "amx_bf16" not in cpu_flags()
    stacked = ops and panels and cpu_kernels.decode_layers() is not None
    assert (runner.forward.stack is not None) == stacked
    stack_calls = 0
    if stacked:
        stack = runner.forward.stack
        op = stack.op

        def counted(*args):
            nonlocal stack_calls
            stack_calls += 1
            return op(*args)

        stack.op = counted
    theirs = transformers_forward(model)
    g = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (11, 19)]
    blocks = [list(range(0, 64, 2)), list(range(1, 64, 2))]  # interleaved in the pool
    computed = [0, 0]
    for chunk in (6, None, 1, 1, 1):
        seqs = []
        for i, ids in enumerate(tokens):
            n = len(ids) - computed[i] if chunk is None or chunk == 1 else chunk
            seqs.append(ScheduledSeq(ids, blocks[i], computed[i], n, num_prompt_logits=0))
        step = runner.prepare(seqs)
        keep = torch.cat([step.sample_rows, step.prompt_rows])
        if keep.numel() == 0:
            keep = keep.new_zeros(1)
        with torch.inference_mode(), attention_context(step.metadata):
            expected = theirs(step.input_ids, step.positions, keep)
        with torch.inference_mode(), attention_context(step.metadata):
            got = runner.forward(step.input_ids, step.positions, keep)
        assert got.dtype == expected.dtype and torch.equal(got, expected), (
            (got - expected).abs().max()
        )
        for i, seq in enumerate(seqs):
            computed[i] += seq.num_tokens
            if seq.samples:
                row = step.order.index(i)
                tokens[i].append(int(got[0, row].argmax()))
    assert stack_calls == (3 if stacked else 0)  # the three decode steps, not the prompts


def _decode_stack(dtype: str) -> tuple[Any, DecodeStack]:
    model = build("llama", dtype)
    spec = KVCacheSpec.from_model_config(model.config, torch.bfloat16)
    cache = KVCache(spec, num_blocks=8, block_size=BLOCK, device=torch.device("cpu"))
    stack = ModelRunner(model, cache, torch.device("cpu")).forward.stack
    if stack is None:
        pytest.skip("needs kvray's CPU kernels (the one-call decode op)")
    return model, stack


def test_the_stack_leaves_batches_int8_layers_widen_for_to_them():
    """int8 layers on AMX CPUs widen their weights for oneDNN from some number of rows; the
    one-call op runs the panels' kernels only, so those batches run a layer a call."""
    model, stack = _decode_stack("bfloat16-int8")
    assert stack.max_rows == model.model.layers[0].mlp.down_proj.widen_from  # None: no AMX
    stack.max_rows = 4  # the AMX rule, on any CPU
    step = SimpleNamespace(prefills=0, decode_kernel=stack.kernel)
    assert stack.takes(SimpleNamespace(**vars(step), num_decodes=3))
    assert not stack.takes(SimpleNamespace(**vars(step), num_decodes=4))


def test_the_stack_takes_every_batch_of_w8a8_layers():
    """w8a8 layers run their kernel at every size (no widening), so the op takes any batch."""
    _, stack = _decode_stack("bfloat16-w8a8")
    assert stack.max_rows is None
    step = SimpleNamespace(prefills=0, decode_kernel=stack.kernel)
    assert stack.takes(SimpleNamespace(**vars(step), num_decodes=4096))


def test_other_architectures_keep_transformers_forward():
    gpt2 = AutoModelForCausalLM.from_config(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2))
    assert family_forward(gpt2) is None
    runner_forward = ModelRunner(gpt2, _cache(gpt2), torch.device("cpu")).forward
    assert not isinstance(runner_forward, FamilyForward)


class LlamaMLP(torch.nn.Module):  # a look-alike: transformers' name, someone else's code
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_modules_it_does_not_mirror_keep_transformers_forward():
    model = build("llama", "float32")
    assert family_forward(model) is not None
    model.model.layers[1].mlp = torch.nn.Identity()  # not LlamaMLP: unknown arithmetic
    assert family_forward(model) is None
    model.model.layers[1].mlp = LlamaMLP()  # the name alone does not pass (remote code)
    assert family_forward(model) is None


def test_other_attention_or_hooks_keep_transformers_forward():
    model = build("llama", "float32")
    model.config._attn_implementation = "sdpa"  # kvray's forward always pages its attention
    assert family_forward(model) is None
    model = build("llama", "float32")
    model.model.layers[0].mlp.register_forward_hook(lambda *args: None)  # `forward` skips it
    assert family_forward(model) is None


def _cache(model: torch.nn.Module) -> KVCache:
    spec = KVCacheSpec.from_model_config(model.config, torch.float32)
    return KVCache(spec, num_blocks=4, block_size=BLOCK, device=torch.device("cpu"))


@pytest.mark.parametrize("head_dim", [16, 64, 80, 128])  # the vector loop, its tail, both
@pytest.mark.parametrize("tokens", [1, 37])
def test_the_rotary_kernel_equals_transformers_bitwise(head_dim, tokens):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from kvray.workers import cpu_kernels

    op = cpu_kernels.rotary_embedding()
    if op is None:
        pytest.skip("kvray's CPU kernels are not built here (no compiler)")
    g = torch.Generator().manual_seed(head_dim + tokens)

    def heads(n: int) -> torch.Tensor:  # [1, n, tokens, dim] as the model's transposed views
        x = torch.randn(1, tokens, n, head_dim, generator=g) * 4
        return x.to(torch.bfloat16).transpose(1, 2)

    q, k = heads(6), heads(2)
    angles = torch.rand(1, tokens, head_dim, generator=g) * 100
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    expected = apply_rotary_pos_emb(q, k, cos, sin)
    got = op(q, k, cos, sin)
    for g_, e in zip(got, expected):
        assert g_.shape == e.shape and torch.equal(g_, e)
    # its fake (for torch.compile) gives the real op's shapes and strides
    torch.library.opcheck(op, (q, k, cos, sin), test_utils=("test_faketensor",))


# whole vectors, tails, fewer than 4 vectors, and widths whose sums pass through ATen's cascade
# levels (the kernel repeats ATen's order of additions there, see csrc/rms_norm.cpp)
@pytest.mark.parametrize(
    "rows,dim", [(1, 576), (37, 576), (5, 72), (3, 8), (2, 48), (4, 1600), (2, 4160), (1, 8192)]
)
def test_the_rms_norm_kernel_equals_transformers_bitwise(rows, dim):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from kvray.workers import cpu_kernels

    op = cpu_kernels.rms_norm()
    if op is None:
        pytest.skip("kvray's CPU kernels are not built here (no compiler)")
    g = torch.Generator().manual_seed(rows * dim)
    norm = LlamaRMSNorm(dim, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(dim, generator=g) * 2)
    x = (torch.randn(1, rows, dim, generator=g) * 3).to(torch.bfloat16)
    with torch.no_grad():
        expected = norm(x)
    got = op(x, norm.weight, norm.variance_epsilon)
    assert got.shape == expected.shape and torch.equal(got, expected)
    torch.library.opcheck(op, (x, norm.weight.detach(), 1e-5), test_utils=("test_faketensor",))


@pytest.mark.parametrize("dim", [576, 2048, 4096])
def test_the_rms_norm_kernel_sums_in_its_own_loop_not_atens(dim):
    """x86 ATen sums fp32 rows in 16-lane or 8-lane vectors (which one depends on its dispatch,
    not only on the CPU: a Zen 4 EPYC with AVX-512 sums in 8); the kernel repeats either order,
    so real models' widths take no ATen reduction (the fallback costs ~25 us a norm)."""
    op = cpu_kernels.rms_norm()
    if op is None or "avx2" not in cpu_kernels.cpu_flags():
        pytest.skip("needs kvray's CPU kernels built for x86 with AVX2")
    x = torch.randn(3, dim).to(torch.bfloat16)
    weight = torch.rand(dim).to(torch.bfloat16)
    op(x, weight, 1e-5)  # the first call at a width checks the order against ATen's
    with torch.profiler.profile() as prof:
        op(x, weight, 1e-5)
    reductions = [e.name for e in prof.events() if e.name in ("aten::mean", "aten::sum")]
    assert reductions == []
