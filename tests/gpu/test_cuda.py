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


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_family_forward_logits_equal_transformers_bitwise(arch, dtype):
    from tests.unit.test_llama_family import check_logits_equal_transformers

    check_logits_equal_transformers(arch, dtype, "cuda")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_cuda_own_model_layer_follows_transformers(arch, monkeypatch):
    """kvray's own model layer (workers/models, the one tensor parallelism shards) at one rank
    on CUDA, fp32, through the paged cache: HF's greedy tokens and log-probabilities (HF's on
    the CPU: CUDA's fp32 kernels differ in the last bits, hence 1e-4)."""
    from kvray.workers.models import load_model
    from kvray.workers.models.layers import Placement
    from kvray.workers.models.parallel import SINGLE_RANK
    from tests.unit import test_tp_models as tp

    cuda = torch.device("cuda")
    monkeypatch.setattr(tp, "CPU", cuda)  # kvray_greedy builds its cache and runner there
    hf = tp.build_hf(arch)
    refs = [tp.hf_greedy(hf, prompt) for prompt in tp.prompts(hf.config.vocab_size)]
    model = load_model(
        hf.config, hf.state_dict().items(), Placement(SINGLE_RANK, torch.float32, cuda)
    )
    for (tokens, logprobs), ref in zip(
        tp.kvray_greedy(model, tp.prompts(hf.config.vocab_size)), refs
    ):
        tp.assert_follows((tokens, [lp.cpu() for lp in logprobs]), ref, atol=1e-4)


@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_varlen_prompt_attention_matches_fp32_per_prompt_sdpa(window, dtype, monkeypatch):
    """Prompt chunks (fresh, and over cached context) beside decodes: one variable-length flash
    attention gives what one fp32 SDPA per chunk gives, to the dtype's rounding."""
    from types import SimpleNamespace

    from kvray.workers import attention
    from kvray.workers.attention import AttentionMetadata, PrefillSeq, paged_attention_forward

    if attention._varlen_attn is None:
        pytest.skip("this torch has no variable-length flash attention: prompts keep SDPA")
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, bs, region = 8, 2, 64, 16, 64  # each sequence owns 4 blocks
    decodes, chunks = [9, 20], [(0, 5), (7, 6), (0, 33), (20, 17)]  # contexts; (cached, new)
    num_slots = region * (len(decodes) + len(chunks))
    k_cache = torch.randn(num_slots, kv_heads, dim, generator=g)
    v_cache = torch.randn(num_slots, kv_heads, dim, generator=g)
    slot_mapping = [j * region + n - 1 for j, n in enumerate(decodes)]
    prefills, row = [], len(decodes)
    for j, (cached, new) in enumerate(chunks, start=len(decodes)):
        slots = torch.arange(j * region, j * region + cached + new)
        slot_mapping += slots[cached:].tolist()
        prefills.append(PrefillSeq(row, new, cached, slots.cuda() if cached else None))
        row += new
    q = torch.randn(1, heads, row, dim, generator=g)
    k = torch.randn(1, kv_heads, row, dim, generator=g)
    v = torch.randn(1, kv_heads, row, dim, generator=g)
    block_ids = torch.arange(len(decodes) * region // bs)  # the decodes' 4 blocks each

    def attend(dt: torch.dtype) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping).cuda(), block_size=bs,
            num_decodes=len(decodes), decode_block_ids=block_ids.cuda(),
            decode_positions=torch.tensor(decodes).cuda() - 1, prefills=prefills,
            kv_caches=[(k_cache.to("cuda", dt), v_cache.to("cuda", dt))],
        )  # fmt: skip
        with attention.attention_context(meta):
            out, _ = paged_attention_forward(
                SimpleNamespace(layer_idx=0), q.to("cuda", dt), k.to("cuda", dt),
                v.to("cuda", dt), None, scaling=dim**-0.5, sliding_window=window,
            )  # fmt: skip
        return out[0].float()

    expected = attend(torch.float32)  # fp32: one SDPA per chunk
    calls = []
    varlen = attention._varlen_attn
    monkeypatch.setattr(
        attention, "_varlen_attn", lambda *a, **kw: calls.append(1) or varlen(*a, **kw)
    )
    got = attend(dtype)
    assert calls, "the variable-length kernel did not run"
    tolerance = 0.05 if dtype == torch.bfloat16 else 0.01
    error = (got - expected).abs().max().item()
    assert error < tolerance, f"max error {error:.4f}"
    # a wrong mask (a window ignored, a chunk blind to its cached context) errs by ~0.5
