"""The Triton paged decode attention against a gather-and-softmax reference, on CPU.

Triton's interpreter (TRITON_INTERPRET=1) runs the kernel on CPU tensors. The variable must be set
before triton decorates the kernel, and other tests may import triton first, so every case runs
in one child process, whose results the parametrized tests below check one by one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

LENS = [1, 5, 16, 17, 40]
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}

# tile=16 forces several loop steps per sequence (the default tile covers 40 positions in one).
CASES: dict[str, dict[str, Any]] = {
    "gqa3_d64_fp32": dict(heads=9, kv_heads=3, head_dim=64, block_size=16, dtype="float32"),
    "gqa3_d64_fp32_tile16": dict(
        heads=9, kv_heads=3, head_dim=64, block_size=16, dtype="float32", tile=16
    ),
    "mha_d128_fp32_tile16": dict(
        heads=2, kv_heads=2, head_dim=128, block_size=16, dtype="float32", tile=16
    ),
    "gqa4_d128_bf16_tile16": dict(
        heads=8, kv_heads=2, head_dim=128, block_size=16, dtype="bfloat16", tile=16
    ),
    "gqa8_d64_fp16_block8": dict(heads=8, kv_heads=1, head_dim=64, block_size=8, dtype="float16"),
    "gqa3_d64_fp32_window7_tile16": dict(
        heads=9, kv_heads=3, head_dim=64, block_size=16, dtype="float32", window=7, tile=16
    ),
    "gqa4_d64_bf16_window20_block8_int32": dict(
        heads=4, kv_heads=1, head_dim=64, block_size=8, dtype="bfloat16", window=20, int32=True
    ),
    "gqa3_d64_bf16_strided_q": dict(
        heads=9, kv_heads=3, head_dim=64, block_size=16, dtype="bfloat16", strided_q=True
    ),
}


def _reference(q, k_cache, v_cache, block_table, lens, block_size, scale, window):
    """Gather each sequence's rows by position, then plain fp32 softmax attention."""
    out = []
    for i, length in enumerate(lens):
        pos = torch.arange(max(0, length - window) if window else 0, length)
        slots = block_table[i, pos // block_size].long() * block_size + pos % block_size
        group = q.shape[1] // k_cache.shape[1]
        k = k_cache[slots].float().repeat_interleave(group, dim=1)  # [positions, heads, dim]
        v = v_cache[slots].float().repeat_interleave(group, dim=1)
        probs = (torch.einsum("hd,phd->hp", q[i].float(), k) * scale).softmax(dim=-1)
        out.append(torch.einsum("hp,phd->hd", probs, v))
    return torch.stack(out)


def _run_case(
    heads, kv_heads, head_dim, block_size, dtype, window=0, tile=None, device="cpu", **flags
):
    """One case; CPU tensors run in the interpreter, `device="cuda"` on a GPU (tests/gpu)."""
    from kvray.workers import triton_attention

    if tile is not None:
        triton_attention._TILE = tile
    dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    num_blocks, width = 32, 8  # 8 table columns: wider than the 3 blocks of the longest (40)
    shape = (num_blocks * block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    # Blocks out of order, and garbage (not even valid ids) past each context and before its window.
    block_table = torch.randint(10**6, 10**7, (len(LENS), width), generator=gen)
    for i, length in enumerate(LENS):
        first = max(0, length - window) // block_size if window else 0
        used = range(first, -(-length // block_size))
        block_table[i, first : used.stop] = torch.randperm(num_blocks, generator=gen)[: len(used)]
    if flags.get("int32"):
        block_table = block_table.int()
    if flags.get("strided_q"):  # attention.py hands over a slice of a transposed tensor
        q = torch.randn(heads, len(LENS) + 2, head_dim, generator=gen).to(dtype).transpose(0, 1)
        q = q[: len(LENS)]
    else:
        q = torch.randn(len(LENS), heads, head_dim, generator=gen).to(dtype)
    context_lens = torch.tensor(LENS)
    scale = head_dim**-0.5
    on = [t.to(device) for t in (q, k_cache, v_cache, block_table, context_lens)]
    out = triton_attention.paged_decode_attention(*on, block_size, scale, window).cpu()
    ref = _reference(q, k_cache, v_cache, block_table, LENS, block_size, scale, window)
    return {
        "dtype": str(out.dtype),
        "shape": list(out.shape),
        "max_err": (out.float() - ref).abs().max().item(),
    }


def _patch_interpreter() -> None:
    """Two gaps of triton 3.6's interpreter, patched here (GPUs never run this path):
    - it turns a loop bound into int with int(array of shape [1]), which numpy >= 2.4 refuses
      (triton-lang/triton#9171, fixed after 3.6);
    - tl.dot multiplies bf16 operands as their raw uint16 bits: widen them to fp32 first, as a
      GPU's bf16 MMA does (products exact, fp32 accumulation)."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched_tensor

    builder = interpreter.InterpreterBuilder
    create_dot = builder.create_dot

    def widen(handle):
        if handle.dtype.scalar != interpreter.tl.bfloat16:
            return handle
        bits = handle.data.astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), interpreter.tl.float32)

    def patched_dot(self, a, b, d, *args):
        return create_dot(self, widen(a), widen(b), d, *args)

    builder.create_dot = patched_dot


def _run_all() -> dict[str, Any]:
    _patch_interpreter()
    from kvray.workers import triton_attention

    assert triton_attention.available()
    default_tile = triton_attention._TILE
    results: dict[str, Any] = {"probe": triton_attention.works(torch.device("cpu"), torch.float32)}
    for name, case in CASES.items():
        triton_attention._TILE = default_tile
        try:
            results[name] = _run_case(**case)
        except Exception as e:
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    return results


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    pytest.importorskip("triton")
    script = (
        "import json\nfrom tests.unit.test_triton_attention import _run_all\n"
        "print('RESULTS ' + json.dumps(_run_all()))"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULTS "))
    return json.loads(line.removeprefix("RESULTS "))


def test_the_probe_runs_the_kernel(results: dict[str, Any]) -> None:
    assert results["probe"] is True


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(results: dict[str, Any], name: str) -> None:
    result = results[name]
    assert "error" not in result, result.get("error")
    dtype = CASES[name]["dtype"]
    assert result["dtype"] == f"torch.{dtype}"
    assert result["shape"] == [len(LENS), CASES[name]["heads"], CASES[name]["head_dim"]]
    assert result["max_err"] <= TOLERANCE[dtype], result


def test_imports_without_triton() -> None:
    script = (
        "import sys\nsys.modules['triton'] = None  # import triton now raises ImportError\n"
        "import torch\nfrom kvray.workers import triton_attention as t\nassert not t.available()\n"
        "assert not t.works(torch.device('cpu'), torch.float32)\n"
        "try:\n    t.paged_decode_attention(*[None] * 8)\nexcept RuntimeError:\n    pass\n"
        "else:\n    raise AssertionError('no error without triton')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_kernel_that_cannot_run_sends_decodes_to_the_torch_path(monkeypatch, caplog) -> None:
    from kvray.workers import triton_attention

    def no_compiler(*args):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(triton_attention, "available", lambda: True)
    monkeypatch.setattr(triton_attention, "paged_decode_attention", no_compiler)
    assert not triton_attention.works.__wrapped__(torch.device("cpu"), torch.bfloat16)
    assert "Failed to find C compiler" in caplog.text
