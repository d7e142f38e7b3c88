"""On a CUDA GPU: greedy parity in fp32, a bf16 run, and a KV cache sized from device memory."""

from __future__ import annotations

import pytest
import torch

from kvray import LLM, SamplingParams
from tests.helpers import hf_greedy

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.mark.parametrize("arch", ["tiny", "tiny-qwen2", "tiny-gpt2"])
def test_cuda_fp32_greedy_matches_hf_generate(arch, model_cache_dir):
    from transformers import AutoModelForCausalLM

    llm = LLM(arch, cache_dir=model_cache_dir, device="cuda", dtype="float32", max_model_len=512)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (1, 9, 33, 120, 200)]
    outputs = llm.generate(prompts, GREEDY)
    model = AutoModelForCausalLM.from_pretrained(llm.engine.info.model, dtype=torch.float32).cuda()
    model.generation_config.eos_token_id = None
    for p, out in zip(prompts, outputs):
        ref = hf_greedy(model, p, 32)
        assert out.token_ids == ref, f"{len(p)} tokens:\n kvray: {out.token_ids}\n    hf: {ref}"


def test_cuda_bf16_defaults_and_memory_sized_cache(model_cache_dir):
    llm = LLM("tiny", cache_dir=model_cache_dir)
    info = llm.engine.info
    assert info.dtype == "torch.bfloat16"
    # Sized from free device memory, far beyond the CPU cap of max_num_seqs full sequences.
    assert info.num_kv_blocks > 128 * (info.max_model_len // info.block_size)
    outputs = llm.generate(["Hello"] * 8, SamplingParams(temperature=0.8, seed=1, max_tokens=16))
    assert all(len(o.token_ids) == 16 or o.finish_reason == "stop" for o in outputs)
    assert llm.engine.block_manager.num_free_blocks == info.num_kv_blocks


def test_cuda_refuses_int8_with_a_message(model_cache_dir):
    with pytest.raises(ValueError, match="quantization int8 runs on CPU only"):
        LLM("tiny", cache_dir=model_cache_dir, quantization="int8")


@pytest.mark.parametrize("case", ["gqa3_d64_fp32", "gqa4_d128_bf16_tile16", "gqa3_d64_bf16_strided_q",
                                  "gqa4_d64_bf16_window20_block8_int32"])  # fmt: skip
def test_cuda_triton_decode_attention_matches_reference(case, monkeypatch):
    from kvray.workers import triton_attention
    from tests.unit.test_triton_attention import CASES, TOLERANCE, _run_case

    monkeypatch.setattr(triton_attention, "_TILE", triton_attention._TILE)  # a case may set it
    result = _run_case(**CASES[case], device="cuda")
    assert result["max_err"] <= TOLERANCE[CASES[case]["dtype"]], result


@pytest.mark.parametrize("arch", ["tiny", "tiny-qwen2"])
def test_cuda_decode_graphs_replay_the_eager_step(arch, model_cache_dir):
    """bf16 greedy tokens with decode steps replayed as CUDA graphs equal the eager steps'."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (1, 9, 33, 120, 200)]
    outputs = {}
    for mode in ("off", "on"):
        # NOTE: a small cache: the first engine's stays allocated while the second loads.
        llm = LLM(arch, cache_dir=model_cache_dir, dtype="bfloat16", decode_graphs=mode,
                  max_model_len=512, num_kv_blocks=256)  # fmt: skip
        # One at a time (batch 1) and all together (batch 5, padded to 8).
        outputs[mode] = [llm.generate(prompts[:1], GREEDY)[0].token_ids] + [
            o.token_ids for o in llm.generate(prompts, GREEDY)
        ]
        graphs = llm.worker.runner.graphs
        if mode == "on":
            assert graphs is not None and graphs.num_replays >= 2 * 31, "no step was replayed"
        else:
            assert graphs is None
    for off, on in zip(outputs["off"], outputs["on"]):
        assert on[:16] == off[:16]
