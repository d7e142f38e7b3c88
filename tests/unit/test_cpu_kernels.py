"""kvray's compiled CPU decode attention against an fp64 reference, and its torch fallback."""

from __future__ import annotations

import pytest
import torch

from kvray.workers import cpu_kernels
from kvray.workers.attention import (
    AttentionMetadata,
    PrefillSeq,
    _decode_attention,
    _paged_prompts_apply,
    _prefill_each,
    _prefill_paged,
    decode_kernel,
)

BLOCK = 16


def built(op):
    """The op, or a failure: the suite's machines have a compiler; say so loudly where one
    does not."""
    if op is None:
        pytest.fail("kvray's CPU kernels did not build (see the warning above)")
    return op


@pytest.fixture(scope="module")
def kernel():
    return built(cpu_kernels.paged_decode_attention())


def paged_case(num_seqs, heads, kv_heads, dim, lengths, dtype, seed=0):
    """Random caches, block tables padded with block 0 and scattered over the pool."""
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // BLOCK) for n in lengths)
    num_blocks = num_seqs * width + 3
    k = torch.randn(num_blocks * BLOCK, kv_heads, dim, generator=g).to(dtype)
    v = torch.randn(num_blocks * BLOCK, kv_heads, dim, generator=g).to(dtype)
    order = torch.randperm(num_blocks - 1, generator=g) + 1
    table = torch.zeros(num_seqs, width, dtype=torch.long)
    used = 0
    for i, n in enumerate(lengths):
        count = -(-n // BLOCK)
        table[i, :count] = order[used : used + count]
        used += count
    q = torch.randn(num_seqs, heads, dim, generator=g).to(dtype)
    return q, k, v, table, torch.tensor(lengths)


def reference(q, k, v, table, lengths, scale, window):
    """fp64: gather each sequence's tokens, softmax over the visible ones."""
    n, heads, dim = q.shape
    kv_heads = k.shape[1]
    out = torch.empty(n, heads, dim, dtype=torch.float64)
    for i, length in enumerate(lengths.tolist()):
        slots = (table[i][:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:length]
        first = max(0, length - window) if window else 0
        keys, values = k[slots[first:]].double(), v[slots[first:]].double()
        for h in range(heads):
            kv = h // (heads // kv_heads)
            probs = (keys[:, kv] @ q[i, h].double() * scale).softmax(0)
            out[i, h] = probs @ values[:, kv]
    return out


@pytest.mark.parametrize(
    "num_seqs,heads,kv_heads,dim,window",
    [
        (1, 9, 3, 64, 0),  # one sequence: one kv head per work item
        (7, 9, 3, 64, 0),  # enough sequences: all kv heads per item
        (5, 8, 8, 128, 0),  # no GQA
        (6, 4, 1, 32, 20),  # MQA with a sliding window
        # groups of 7 (Qwen2-0.5B's): past the 4 output rows in registers (AVX2: 3 + 3 + 1 heads)
        (3, 14, 2, 64, 0),
        # groups of 4 at head_dim 128 (Llama-3-8B's): 2 rows at a time (AVX2: 3 + 1 heads)
        (4, 8, 2, 128, 0),
        (5, 9, 3, 64, 30),  # a sliding window on the vdpbf16ps path
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_kernel_equals_attention_over_the_gathered_blocks(
    kernel, num_seqs, heads, kv_heads, dim, window, dtype
):
    lengths = [1, 16, 17, 45, 80, 3, 33][:num_seqs]
    q, k, v, table, lens = paged_case(num_seqs, heads, kv_heads, dim, lengths, dtype)
    scale = dim**-0.5
    got = kernel(q, k, v, table, lens, BLOCK, scale, window)
    assert got.dtype == dtype and got.shape == q.shape
    expected = reference(q, k, v, table, lens, scale, window)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: the output's own rounding
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)


def test_slots_past_a_sequence_length_are_never_read(kernel):
    q, k, v, table, lens = paged_case(3, 6, 2, 64, [5, 20, 31], torch.bfloat16)
    before = kernel(q, k, v, table, lens, BLOCK, 0.125, 0)
    for i, n in enumerate(lens.tolist()):  # poison the tail of each last block
        last = int(table[i, (n - 1) // BLOCK])
        k[last * BLOCK + n % BLOCK : (last + 1) * BLOCK] = float("nan")
        v[last * BLOCK + n % BLOCK : (last + 1) * BLOCK] = float("nan")
    assert torch.equal(kernel(q, k, v, table, lens, BLOCK, 0.125, 0), before)


def test_bad_shapes_are_refused_with_a_message(kernel):
    q, k, v, table, lens = paged_case(2, 6, 2, 64, [5, 9], torch.bfloat16)
    with pytest.raises(RuntimeError, match="share a dtype"):
        kernel(q.float(), k, v, table, lens, BLOCK, 0.125, 0)
    with pytest.raises(RuntimeError, match="int64"):
        kernel(q, k, v, table.int(), lens, BLOCK, 0.125, 0)


def test_the_decode_path_uses_the_kernel_for_bf16_on_cpu_only_and_both_paths_agree(kernel):
    cpu = torch.device("cpu")
    assert decode_kernel(torch.bfloat16, cpu, 64) is kernel
    assert decode_kernel(torch.float32, cpu, 64) is None  # fp32 stays on SDPA: exactness tests
    assert decode_kernel(torch.bfloat16, cpu, 72) is None  # head_dim not a multiple of 16

    lengths = [3, 40, 17, 64, 1]
    q, k, v, table, lens = paged_case(5, 9, 3, 64, lengths, torch.bfloat16)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(5, dtype=torch.long),
        block_size=BLOCK,
        num_decodes=5,
        decode_block_ids=table.flatten(),
        decode_positions=lens - 1,
        prefills=[],
        kv_caches=[(k, v)],
    )
    torch_path = _decode_attention(q, k, v, meta, None, None)
    meta.decode_kernel, meta.decode_context_lens = kernel, lens  # as the model runner sets them
    kernel_path = _decode_attention(q, k, v, meta, None, None)
    torch.testing.assert_close(kernel_path.float(), torch_path.float(), atol=2e-2, rtol=2e-2)


def slots_of(blocks, length):
    return (torch.tensor(blocks)[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:length]


@pytest.mark.parametrize("window", [None, 20])
def test_prompt_rows_through_the_kernel_equal_one_sdpa_a_prompt(kernel, window):
    """A whole prompt, a chunk over 30 cached tokens and a short prompt in one step: each
    prompt row as a decode query over its chunk's blocks, up to its own position."""
    g = torch.Generator().manual_seed(5)
    k_cache = torch.randn(12 * BLOCK, 3, 64, generator=g).to(torch.bfloat16)
    v_cache = torch.randn(12 * BLOCK, 3, 64, generator=g).to(torch.bfloat16)
    whole = slots_of([5, 2, 9], 37)
    cached = slots_of([1, 7, 3, 11], 50)
    short = slots_of([4], 5)
    slot_mapping = torch.cat([whole, cached[30:], short])
    prefills = [
        PrefillSeq(start=0, num_tokens=37, num_computed=0, slots=None),
        PrefillSeq(start=37, num_tokens=20, num_computed=30, slots=cached),
        PrefillSeq(start=57, num_tokens=5, num_computed=0, slots=None),
    ]
    rows = slot_mapping.numel()
    q = torch.randn(rows, 9, 64, generator=g).to(torch.bfloat16)
    k, v = k_cache[slot_mapping], v_cache[slot_mapping]  # this step's keys, in the cache
    meta = AttentionMetadata(
        slot_mapping=slot_mapping,
        block_size=BLOCK,
        num_decodes=0,
        decode_block_ids=None,
        decode_positions=None,
        prefills=prefills,
        kv_caches=[(k_cache, v_cache)],
        decode_kernel=kernel,
    )
    assert _paged_prompts_apply(q, meta) == ("avx512_bf16" in cpu_kernels.cpu_flags())
    expected = _prefill_each(q, k, v, k_cache, v_cache, meta, None, window)
    got = _prefill_paged(q, k, v, k_cache, v_cache, meta, None, window)
    assert got.shape == expected.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)
    table, lens = meta.prompt_tables()
    assert lens.tolist() == [*range(1, 38), *range(31, 51), *range(1, 6)]
    assert table[40, :4].tolist() == [1, 7, 3, 11] and table[0, :3].tolist() == [5, 2, 9]


def test_kernels_can_be_turned_off():
    assert cpu_kernels.paged_decode_attention() is not None
    cpu_kernels.set_enabled(False)
    try:
        assert cpu_kernels.paged_decode_attention() is None
        assert cpu_kernels.bf16_linear() is None and cpu_kernels.int8_panel() is None
    finally:
        cpu_kernels.set_enabled(True)
    assert cpu_kernels.paged_decode_attention() is not None


def test_cpu_kernels_is_a_setting_the_worker_config_carries(caplog):
    from kvray.cluster.config import load
    from kvray.cluster.worker_actor import worker_factory
    from kvray.workers.config import WorkerConfig

    with caplog.at_level("WARNING"):
        config = load({}, environ={"KVRAY_CPU_KERNELS": "0"})
    assert config.engine.worker.cpu_kernels is False
    assert "KVRAY_CPU_KERNELS" not in caplog.text  # a setting, not an ignored variable
    assert load({"cpu_kernels": "true"}, environ={}).engine.worker.cpu_kernels is True
    assert worker_factory(config).args == (config.engine,)  # what a Ray worker is built from
    with pytest.raises(TypeError, match="cpu_kernels must be True or False"):
        WorkerConfig(cpu_kernels="false")


@pytest.mark.parametrize("on", [True, False])
def test_the_worker_passes_its_cpu_kernels_setting(on, model_cache_dir):
    from kvray.workers.config import EngineConfig
    from kvray.workers.worker import ModelWorker

    config = EngineConfig.from_kwargs(
        model="tiny",
        dtype="bfloat16",
        cpu_kernels=on,
        num_kv_blocks=16,
        max_model_len=64,
        cache_dir=model_cache_dir,
    )
    try:
        worker = ModelWorker(config)
        worker.warmup()
        assert worker.runner is not None
        assert (worker.runner.decode_kernel is not None) == on
    finally:
        cpu_kernels.set_enabled(True)


# ---------------------------------------------------------------------- int8 linear


@pytest.fixture(scope="module")
def int8_kernel():
    return built(cpu_kernels.int8_linear())


def int8_case(rows, in_features, out_features, group, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=g)
    scale = (torch.rand(out_features, in_features // group, generator=g) / 100).bfloat16()
    bias = torch.randn(out_features, generator=g).to(dtype)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    return x, weight, scale, bias


def dequantized(weight, scale, group, dtype):
    """What every path multiplies by: dtype(weight * scale), the product exact in fp32."""
    w = weight.float().view(weight.shape[0], -1, group) * scale.float()[:, :, None]
    return w.view(weight.shape).to(dtype).double()


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 32, 40])  # one-feature path up to 8, blocks past
@pytest.mark.parametrize("in_features,out_features,group", [(96, 13, 32), (128, 40, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_int8_kernel_equals_the_dequantized_product(
    int8_kernel, rows, in_features, out_features, group, dtype
):
    x, weight, scale, bias = int8_case(rows, in_features, out_features, group, dtype, rows)
    expected = x.double() @ dequantized(weight, scale, group, dtype).T + bias.double()
    got = int8_kernel(x, weight, scale, group, bias)
    assert got.dtype == dtype and got.shape == (rows, out_features)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: the output's own rounding
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)
    no_bias = int8_kernel(x, weight, scale, group, None)
    torch.testing.assert_close(no_bias.double(), expected - bias.double(), atol=tol, rtol=tol)


def test_the_int8_kernel_refuses_mismatched_shapes(int8_kernel):
    x, weight, scale, _ = int8_case(2, 64, 8, 32, torch.float32, 0)
    with pytest.raises(RuntimeError, match="features"):
        int8_kernel(x[:, :32], weight, scale, 32, None)
    with pytest.raises(RuntimeError, match="int8"):
        int8_kernel(x, weight.float(), scale, 32, None)
    with pytest.raises(RuntimeError, match="group_size must be a multiple of 32"):
        int8_kernel(x, weight, scale, 48, None)
    with pytest.raises(RuntimeError, match="scale must be bf16"):
        int8_kernel(x, weight, scale.float(), 32, None)


@pytest.fixture(scope="module")
def argmax_rows():
    return built(cpu_kernels.argmax_rows())


@pytest.mark.parametrize("n", [1, 7, 16, 17, 49152, 49155])  # under, at and past 16 lanes
def test_argmax_rows_is_torch_argmax(argmax_rows, n):
    """First index of the maximum, ties in every lane and across lanes, -inf rows (masked
    logits), and NaN where torch counts it the largest (the first NaN wins)."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(12, n, generator=g)
    x[1] = 0.0  # all tied: index 0
    x[2] = float("-inf")  # everything masked: index 0
    x[3, n // 2 :] = 9.0  # a tie from the middle: its first index
    x[4, -1] = 9.0  # the maximum in the tail past the last whole 16
    x[5, n // 3] = float("nan")
    x[6, -1] = float("nan")  # a NaN in the tail only
    x[7, :] = float("nan")
    x[8, n // 2] = float("inf")
    x[9, 0] = 9.0
    x[10] = torch.randint(0, 3, (n,), generator=g).float()  # many ties at the top value
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    assert torch.equal(argmax_rows(x[:1]), x[:1].argmax(dim=-1))  # one row


def test_argmax_rows_refuses_what_it_does_not_read(argmax_rows):
    with pytest.raises(RuntimeError, match="contiguous fp32"):
        argmax_rows(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="contiguous fp32"):
        argmax_rows(torch.randn(8, 2).t())


def test_the_sampler_takes_the_kernels_argmax_on_cpu(argmax_rows):
    """A greedy batch's tokens through the op equal torch's; a non-contiguous batch (which the
    op refuses) falls back to torch."""
    from kvray.workers.sampler import Sampler

    calls = []

    def counted(x):
        calls.append(x.shape)
        return argmax_rows(x)

    sampler = Sampler(counted)
    logits = torch.randn(5, 300)
    assert torch.equal(sampler._greedy(logits), logits.argmax(-1)) and calls == [(5, 300)]
    wide = torch.randn(300, 5).t()
    assert torch.equal(sampler._greedy(wide), wide.argmax(-1)) and len(calls) == 1


def test_a_build_lock_left_by_a_killed_build_is_cleared(tmp_path):
    """torch's `load` waits for as long as its lock file exists; a build killed mid-way leaves
    one behind. Holding kvray's flock proves no other process is building, so the file goes."""
    (tmp_path / "lock").write_text("")
    with cpu_kernels._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()


def test_the_build_lock_is_held_while_building(tmp_path):
    """Another process's flock stays until it lets go; the lock file it may have is its own."""
    import fcntl

    with (
        cpu_kernels._build_lock(tmp_path),
        open(tmp_path / "kvray.lock", "a") as other,
        pytest.raises(BlockingIOError),
    ):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / "kvray.lock", "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on leaving
