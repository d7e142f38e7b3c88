"""A CPU replica's resident memory: the KV cache is sized by max_num_seqs x max_model_len under
its budget and costs pages only where written; loading keeps no originals of converted layers;
a GGUF is converted in another process."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kvray.workers import gguf
from kvray.workers.config import EngineConfig
from kvray.workers.fused_projections import fuse_projections
from kvray.workers.host_memory import lazy_zeros, release_free_memory
from kvray.workers.kv_cache import KVCache, KVCacheSpec
from kvray.workers.quantization import quantize_linears
from kvray.workers.worker import ModelWorker

MIB = 2**20


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_lazy_zeros_are_zero_and_cost_no_memory_until_written():
    before = rss_bytes()
    t = lazy_zeros((64 * MIB // 4,), torch.float32)
    assert t.shape == (16 * MIB,) and t.dtype == torch.float32
    # Reading zero pages commits none. `t.any()` would compare into a 16 MiB bool tensor first,
    # which glibc may serve from (and leave in) its heap once its mmap threshold has grown.
    assert t.max().item() == 0 and t.min().item() == 0
    assert rss_bytes() - before < 16 * MIB
    t.fill_(1.5)
    assert rss_bytes() - before > 48 * MIB
    assert t.sum().item() == 1.5 * 16 * MIB


def test_lazy_zeros_outlive_every_other_reference():
    t = lazy_zeros((4, 1024), torch.bfloat16)[1:]  # a view: the mapping must stay
    gc.collect()
    t[2, 7] = 3.0
    assert t[2, 7].item() == 3.0 and t.sum().item() == 3.0


def test_release_free_memory_keeps_live_tensors():
    kept = [torch.full((1000,), float(i)) for i in range(100)]
    freed = [torch.ones(10_000) for _ in range(100)]
    del freed
    release_free_memory()
    assert [t[0].item() for t in kept] == [float(i) for i in range(100)]


def test_the_cpu_kv_cache_is_resident_only_where_written():
    spec = KVCacheSpec(num_layers=4, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16)
    before = rss_bytes()
    cache = KVCache(spec, num_blocks=4096, block_size=16, device=torch.device("cpu"))
    assert cache.num_bytes == 128 * MIB
    assert rss_bytes() - before < 16 * MIB
    key, value = cache.layers[0]
    assert key.shape == (4097 * 16, 2, 64) and not key.any() and not value.any()
    cache.copy_blocks([(0, 1)])  # a copy-on-write between zero blocks
    assert not key[:32].any()


def worker_config(model_cache_dir: str, **options: object) -> EngineConfig:
    return EngineConfig.from_kwargs(
        model="tiny", dtype="float32", cache_dir=model_cache_dir, **options
    )


def test_the_default_cpu_kv_cache_holds_max_num_seqs_full_sequences_and_no_more(model_cache_dir):
    config = worker_config(model_cache_dir, max_num_seqs=3, max_model_len=100, block_size=16)
    info = ModelWorker(config).warmup()
    assert info.num_kv_blocks == 3 * 7  # 100 tokens in 7 blocks of 16, for 3 sequences


def test_the_cpu_kv_budget_bounds_the_cache_below_that(model_cache_dir, tiny_model_path):
    spec = KVCacheSpec.from_model_config(AutoConfig.from_pretrained(tiny_model_path), torch.float32)
    block_bytes = spec.bytes_per_block(16)
    budget_gib = 10.5 * block_bytes / 2**30
    config = worker_config(
        model_cache_dir, max_model_len=64, block_size=16, cpu_kv_cache_gib=budget_gib
    )
    info = ModelWorker(config).warmup()
    assert info.num_kv_blocks == 10
    assert info.kv_cache_bytes == 10 * block_bytes


def tiny_model(tiny_model_path: str, dtype: torch.dtype) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=dtype)


def test_fusing_keeps_no_original_projection_weight(tiny_model_path):
    model = tiny_model(tiny_model_path, torch.bfloat16)
    attention = model.model.layers[0].self_attn
    originals = [weakref.ref(attention.q_proj.weight), weakref.ref(attention.v_proj.weight)]
    assert fuse_projections(model) > 0
    gc.collect()
    assert [ref() for ref in originals] == [None, None]


def test_quantizing_keeps_no_original_weight(tiny_model_path):
    model = tiny_model(tiny_model_path, torch.float32)
    mlp = model.model.layers[0].mlp
    originals = [weakref.ref(mlp.down_proj.weight), weakref.ref(mlp.gate_proj.weight)]
    assert quantize_linears(model) > 0
    gc.collect()
    assert [ref() for ref in originals] == [None, None]


def test_a_failed_gguf_conversion_raises_with_the_child_process_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(RuntimeError, match=r"converting broken\.gguf failed: .+"):
        gguf.convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()
