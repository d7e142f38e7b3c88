"""The execution plan: decided once at load from the settings, the model and the device, and
what the runner and the worker follow (not their own probes)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from kvray.workers import cpu_kernels
from kvray.workers import execution_plan as plans
from kvray.workers.attention import register as register_attention
from kvray.workers.config import EngineConfig, WorkerConfig
from kvray.workers.kv_cache import KVCache, KVCacheSpec
from kvray.workers.llama_family import FamilyForward, can_use_cpu_ops
from kvray.workers.model_runner import ModelRunner, ScheduledSeq
from kvray.workers.models import load_model
from kvray.workers.models.layers import Placement
from kvray.workers.models.parallel import SINGLE_RANK
from kvray.workers.quantization import Int8Linear
from kvray.workers.w8a8 import Int8ActLinear, quantize_linears_w8a8

CPU = torch.device("cpu")
SHAPE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip


def llama(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**SHAPE), attn_implementation=register_attention()
    )
    return model.to(dtype).eval()


def cache_of(model: torch.nn.Module, dtype: torch.dtype) -> KVCache:
    spec = KVCacheSpec.from_model_config(model.config, dtype)
    return KVCache(spec, num_blocks=8, block_size=4, device=CPU)


def test_fp32_llama_runs_kvrays_forward_on_torch_kernels():
    plan = plans.decide_plan(llama(), device=CPU, dtype=torch.float32, settings=WorkerConfig())
    assert plan.implementation == plans.FAMILY_FORWARD
    assert plan.description == "transformers LlamaForCausalLM, kvray's forward"
    assert (plan.linear, plan.attention, plan.decode) == ("torch", "torch", "per-layer")
    assert not plan.fuses_projections and not plan.decode_graphs
    assert plan.as_dict()["decode_graphs"] == "false"
    assert (plan.tensor_parallel_size, plan.tensor_rank) == (1, 0)


def test_int8_settings_plan_int8_layers_and_prepare_model_quantizes_them():
    model = llama(torch.bfloat16)
    settings = WorkerConfig(quantization="int8")
    plan = plans.decide_plan(model, device=CPU, dtype=torch.bfloat16, settings=settings)
    panels = cpu_kernels.int8_panel() is not None
    assert plan.linear == (plans.INT8_PANELS if panels else plans.INT8_ROWS)
    assert plan.fuses_projections
    plans.prepare_model(model, plan)
    layer = model.model.layers[0].self_attn.fused_q_k_v.fused
    assert type(layer) is Int8Linear and layer.layout == ("panels" if panels else "rows")
    kernel = cpu_kernels.paged_decode_attention() is not None
    assert plan.attention == (plans.KVRAY_CPU_ATTENTION if kernel else plans.TORCH_ATTENTION)
    stack = kernel and panels and cpu_kernels.decode_layers() is not None
    assert plan.decode == (plans.ONE_CALL if stack else plans.PER_LAYER)


@pytest.mark.parametrize("flags", [{"avx2", "fma"}, {"avx2", "fma", "avx512f"}])
def test_int8_rows_without_avx512_warn_that_w8a8_is_the_fast_choice(monkeypatch, caplog, flags):
    monkeypatch.setattr(plans, "cpu_flags", lambda: frozenset(flags))
    model = llama(torch.float32)  # fp32: the row layout on every CPU
    plan = plans.decide_plan(
        model, device=CPU, dtype=torch.float32, settings=WorkerConfig(quantization="int8")
    )
    assert plan.linear == plans.INT8_ROWS
    with caplog.at_level("WARNING", logger=plans.__name__):
        plans.prepare_model(model, plan)
    warned = plans.INT8_WITHOUT_AVX512 in caplog.text
    assert warned == ("avx512f" not in flags)


def test_w8a8_settings_plan_w8a8_layers_and_prepare_model_quantizes_them():
    model = llama(torch.bfloat16)
    settings = WorkerConfig(quantization="w8a8")
    plan = plans.decide_plan(model, device=CPU, dtype=torch.bfloat16, settings=settings)
    assert plan.linear == plans.W8A8 and plan.fuses_projections
    kernels = cpu_kernels.paged_decode_attention() is not None and cpu_kernels.w8a8() is not None
    stack = kernels and cpu_kernels.decode_layers() is not None
    assert plan.decode == (plans.ONE_CALL if stack else plans.PER_LAYER)
    plans.prepare_model(model, plan)
    assert type(model.model.layers[0].self_attn.fused_q_k_v.fused) is Int8ActLinear
    assert type(model.lm_head) is Int8ActLinear
    assert plans.decide_plan(model, device=CPU, dtype=torch.bfloat16).linear == plans.W8A8


def test_own_model_with_w8a8_quantizes_its_shards_as_transformers_layers_are():
    """kvray's own model at one rank (fused q/k/v and gate/up: per-row weights and the same
    activations) gives the logits of transformers' model with `quantize_linears_w8a8`."""
    hf = llama()
    placement = Placement(SINGLE_RANK, torch.float32, CPU)
    own = load_model(hf.config, hf.state_dict().items(), placement)
    settings = WorkerConfig(quantization="w8a8")
    plan = plans.decide_plan(own, device=CPU, dtype=torch.float32, settings=settings)
    assert plan.is_own_model and plan.linear == plans.W8A8
    plans.prepare_model(own, plan)
    kernels = [m.kernel for m in own.modules() if getattr(m, "kernel", None) is not None]
    assert len(kernels) == 2 * 4 + 1 and all(type(k) is Int8ActLinear for k in kernels)
    reference = AutoModelForCausalLM.from_config(hf.config, attn_implementation="sdpa").eval()
    reference.load_state_dict(hf.state_dict())
    quantize_linears_w8a8(reference)
    ids = list(range(3, 20))
    cache = KVCache(own.kv_cache_spec(torch.float32), num_blocks=8, block_size=4, device=CPU)
    runner = ModelRunner(own, cache, CPU)
    got = runner.execute(runner.prepare([ScheduledSeq(ids, list(range(5)), 0, len(ids))]))
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0, -1:]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_other_architectures_plan_transformers_forward():
    gpt2 = AutoModelForCausalLM.from_config(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2))
    plan = plans.decide_plan(gpt2, device=CPU, dtype=torch.float32, settings=WorkerConfig())
    assert plan.implementation == plans.TRANSFORMERS
    assert plan.description == "transformers GPT2LMHeadModel"


def test_own_model_plans_kvray_and_no_graphs():
    hf = llama()
    own = load_model(hf.config, hf.state_dict().items(), Placement(SINGLE_RANK, torch.float32, CPU))
    settings = WorkerConfig(decode_graphs="on")
    plan = plans.decide_plan(own, device=CPU, dtype=torch.float32, settings=settings)
    assert plan.is_own_model and plan.description == "kvray LlamaForCausalLM"
    assert not plan.decode_graphs  # NOTE: graphs trace transformers' forward


def test_the_runner_follows_the_plan_not_the_model():
    model = llama()
    plan = plans.decide_plan(model, device=CPU, dtype=torch.float32, settings=WorkerConfig())
    assert isinstance(ModelRunner(model, cache_of(model, torch.float32), CPU, plan).forward,
                      FamilyForward)  # fmt: skip
    forced = dataclasses.replace(plan, implementation=plans.TRANSFORMERS)
    runner = ModelRunner(model, cache_of(model, torch.float32), CPU, forced)
    assert not isinstance(runner.forward, FamilyForward)


@pytest.mark.parametrize("quantization", [None, "int8", "w8a8"])
def test_the_worker_reports_its_plan(quantization, model_cache_dir):
    from kvray.workers.worker import ModelWorker

    config = EngineConfig.from_kwargs(
        model="tiny", dtype="bfloat16", quantization=quantization, num_kv_blocks=16,
        max_model_len=64, cache_dir=model_cache_dir,
    )  # fmt: skip
    worker = ModelWorker(config)
    info = worker.warmup()
    assert info.execution_plan == worker.plan.as_dict()
    assert info.implementation == worker.plan.description
    assert info.execution_plan["linear"].startswith(quantization or "")
    assert info.execution_plan["dtype"] == "torch.bfloat16"
    assert worker.runner is not None and worker.runner.plan is worker.plan


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_own_models_cpu_ops_give_bitwise_the_torch_logits(arch):
    """bf16 on CPU: kvray's model with the C++ norm and rotary ops (the plan's `cpu_ops`) gives
    the same bits as without, over prompt chunks and decode steps (Qwen3: q/k norms)."""
    if not can_use_cpu_ops(torch.bfloat16, CPU):
        pytest.skip("kvray's CPU kernels are not built here")
    config = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config}[arch](
        **{**SHAPE, "head_dim": 16}
    )
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    placement = Placement(SINGLE_RANK, torch.bfloat16, CPU)
    models = [load_model(hf.config, hf.state_dict().items(), placement) for _ in range(2)]
    plan = plans.decide_plan(models[0], device=CPU, dtype=torch.bfloat16, settings=WorkerConfig())
    assert plan.cpu_ops and plan.decode == plans.PER_LAYER
    plans.prepare_model(models[0], plan)
    assert models[0].model.norm.op is cpu_kernels.rms_norm()
    runs = [_greedy_logits(model) for model in models]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def _greedy_logits(model: torch.nn.Module) -> list[torch.Tensor]:
    """Each step's logits: two prompts in two chunks, then three decode steps."""
    cache = KVCache(model.kv_cache_spec(torch.bfloat16), num_blocks=32, block_size=4, device=CPU)
    runner = ModelRunner(model, cache, CPU)
    tokens = [list(range(3, 14)), list(range(20, 39))]
    blocks, computed, steps = [list(range(0, 32, 2)), list(range(1, 32, 2))], [0, 0], []
    for step in range(5):
        seqs = [
            ScheduledSeq(ids, blocks[i], computed[i], 6 if step == 0 else len(ids) - computed[i])
            for i, ids in enumerate(tokens)
        ]
        logits = runner.execute(runner.prepare(seqs))
        steps.append(logits)
        for i, seq in enumerate(seqs):
            computed[i] += seq.num_tokens
        if logits.shape[0] == len(tokens):  # both sampled: decode one more each
            for i, row in enumerate(logits):
                tokens[i].append(int(row.argmax()))
    return steps


def test_a_one_call_plan_the_layers_cannot_take_falls_back_to_a_call_a_layer(caplog):
    model = llama()  # fp32, plain torch layers: no panels for the one-call stack
    plan = plans.decide_plan(model, device=CPU, dtype=torch.float32, settings=WorkerConfig())
    forced = dataclasses.replace(plan, decode=plans.ONE_CALL)
    runner = ModelRunner(model, cache_of(model, torch.float32), CPU, forced)
    assert isinstance(runner.forward, FamilyForward) and runner.forward.stack is None
    assert runner.plan.decode == plans.PER_LAYER
    assert "cannot run in one call" in caplog.text
