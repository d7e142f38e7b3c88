"""kvray's C++ kernels for CPU, compiled on first use and cached on disk.

`paged_decode_attention()`, `int8_linear()`, `int8_dequantize()`, `bf16_linear()`,
`rotary_embedding()`, `rms_norm()`, `decode_layers()`, `int8_panel()`, `w8a8()` and
`argmax_rows()` return the compiled ops (`torch.ops.kvray.*`), or None where they cannot be
built (no C++ compiler, for `bf16_linear` a CPU without AVX512-BF16, for `w8a8` one without
AVX2) or are turned off (the worker's `cpu_kernels` setting, passed to `set_enabled`); callers
then keep their torch path, which gives the same results (or, for bf16, oneDNN's) more slowly.
The build goes through `torch.utils.cpp_extension`: it takes ~40 s (2 cores) once per machine
and source version, then loads from `TORCH_EXTENSIONS_DIR` (default
`~/.cache/torch_extensions`) in well under a second. Workers build it while loading or warming
up, so no step waits for a compiler.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from kvray.workers.device import cpu_flags

logger = logging.getLogger(__name__)

_SOURCES = [
    Path(__file__).parent / "csrc" / name
    for name in (
        "paged_attention.cpp",
        "int8_linear.cpp",
        "bf16_linear.cpp",
        "rotary.cpp",
        "rms_norm.cpp",
        "decode_layers.cpp",
        "int8_panel.cpp",
        "w8a8_linear.cpp",
        "argmax.cpp",
    )
]


# NOTE: one switch per process, as the build is: ModelWorker sets it from its config's
# `cpu_kernels` before it loads a model, so every op asked for while loading and warming up
# follows the worker's setting.
_enabled = True


def set_enabled(on: bool) -> None:
    """Allow kvray's CPU kernels in this process (the `cpu_kernels` setting), or not: while off,
    every function here returns None. Ops handed out before stay with their holders."""
    global _enabled
    _enabled = on


def enabled() -> bool:
    return _enabled


def paged_decode_attention() -> Callable[..., torch.Tensor] | None:
    """`paged_decode_attention(query, key_cache, value_cache, block_table, context_lens,
    block_size, scale, window)`, see csrc/paged_attention.cpp; or None."""
    return torch.ops.kvray.paged_decode_attention if _ready() else None


def int8_linear() -> Callable[..., torch.Tensor] | None:
    """`int8_linear(x, weight, scale, group_size, bias)`, see csrc/int8_linear.cpp; or None."""
    return torch.ops.kvray.int8_linear if _ready() else None


def int8_dequantize() -> Callable[..., torch.Tensor] | None:
    """`int8_dequantize(weight, scale, group_size, dtype)`, see csrc/int8_linear.cpp; or None."""
    return torch.ops.kvray.int8_dequantize if _ready() else None


def rotary_embedding() -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """`rotary_embedding(q, k, cos, sin)`, bf16, bitwise transformers' `apply_rotary_pos_emb`;
    see csrc/rotary.cpp; or None."""
    return torch.ops.kvray.rotary_embedding if _ready() else None


def rms_norm() -> Callable[..., torch.Tensor] | None:
    """`rms_norm(x, weight, eps)`, bf16, bitwise transformers' `LlamaRMSNorm.forward`; see
    csrc/rms_norm.cpp; or None."""
    return torch.ops.kvray.rms_norm if _ready() else None


def argmax_rows() -> Callable[..., torch.Tensor] | None:
    """`argmax_rows(x)`: torch.argmax(x, dim=-1) of a contiguous fp32 [rows, n] (first index of
    the maximum, or of the first NaN), see csrc/argmax.cpp; or None."""
    return torch.ops.kvray.argmax_rows if _ready() else None


def decode_layers() -> Callable[..., torch.Tensor] | None:
    """`decode_layers(h, cos, sin, slot_mapping, block_table, context_lens, weights, caches,
    sizes, floats)`: a decode step's Llama-family layers in one call, see
    csrc/decode_layers.cpp; or None (also where the build has neither AVX512-BF16, for bf16 and
    int8 panels, nor AVX2 + FMA, for w8a8's)."""
    if not _ready() or not hasattr(torch.ops.kvray, "decode_layers"):
        return None
    return torch.ops.kvray.decode_layers


class Int8Panel(NamedTuple):
    """csrc/int8_panel.cpp, for int8 weights in bf16_linear's panels and bf16 activations:
    `linear(x, packed, scales, group_size, out_features, bias)` and
    `dequantize(packed, scales, group_size)` (bf16 panels, for `Bf16Linear.unpack`)."""

    linear: Callable[..., torch.Tensor]
    dequantize: Callable[..., torch.Tensor]


def int8_panel() -> Int8Panel | None:
    """The ops, or None where they were not built or the build does not target AVX512-BF16."""
    if not _ready() or not hasattr(torch.ops.kvray, "int8_panel_linear"):
        return None
    return Int8Panel(torch.ops.kvray.int8_panel_linear, torch.ops.kvray.int8_panel_dequantize)


class W8a8(NamedTuple):
    """csrc/w8a8_linear.cpp, rotated int8 weights times activations rotated and quantized to
    int8 on the fly, one scale a row: `linear(x, packed, scales, out_features, bias)` (weights
    in its panels, see workers/w8a8.py `to_panels`), `quantize(x)` (the activations as it
    quantizes them) and `isa`, the paths this build runs ("avx512-vnni" or "avx2", with
    "+amx-int8" where the tile unit takes inputs of 16+ rows)."""

    linear: Callable[..., torch.Tensor]
    quantize: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    isa: str


def w8a8() -> W8a8 | None:
    """The ops, or None where they were not built or the build does not target AVX2 + FMA."""
    if not _ready() or not hasattr(torch.ops.kvray, "w8a8_linear"):
        return None
    ops = torch.ops.kvray
    return W8a8(ops.w8a8_linear, ops.w8a8_quantize, ops.w8a8_isa())


class Bf16Linear(NamedTuple):
    """The prepacked bf16 linear layer of csrc/bf16_linear.cpp: `pack(weight)` once, then
    `linear(x, packed, out_features, bias)` per call; `unpack(packed, out_features)` inverts."""

    pack: Callable[..., torch.Tensor]
    linear: Callable[..., torch.Tensor]
    unpack: Callable[..., torch.Tensor]


def bf16_linear() -> Bf16Linear | None:
    """The ops, or None where they were not built or the build does not target AVX512-BF16."""
    if not _ready() or not hasattr(torch.ops.kvray, "bf16_linear"):
        return None
    ops = torch.ops.kvray
    return Bf16Linear(ops.bf16_pack, ops.bf16_linear, ops.bf16_unpack)


def _ready() -> bool:
    """Whether the ops may be used here: allowed, and built (the first call builds them)."""
    return _enabled and _build()


@functools.cache
def _build() -> bool:
    """Compile (or load the cached build of) every kernel once per process; False if not."""
    try:
        from torch.utils.cpp_extension import load
    except ImportError as e:  # pragma: no cover - torch always ships it
        logger.warning("no torch.utils.cpp_extension (%s): kvray's CPU kernels are off", e)
        return False
    _put_ninja_on_path()
    started = time.perf_counter()
    name = f"kvray_cpu_kernels_{_machine_tag()}"
    try:
        directory = _build_directory(name)
        with _build_lock(directory):
            load(
                name=name,
                sources=[str(p) for p in _SOURCES],
                # NOTE: -march=native is safe: every machine compiles for itself, under a name
                # that includes its CPU's flags, so a shared cache never hands one CPU another's
                # build.
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(directory),
                is_python_module=False,  # the library registers torch.ops.kvray.*
                verbose=False,
            )
    except Exception as e:  # a missing compiler or ninja, a full disk: slower, never broken
        logger.warning(
            "kvray's CPU kernels did not build (%s: %s); decode attention and bf16 and int8 "
            "layers take the slower torch path. Install a C++ compiler, or turn the setting "
            "cpu_kernels off (KVRAY_CPU_KERNELS=0, --no-cpu-kernels) to skip.",
            type(e).__name__,
            str(e).strip().splitlines()[-1] if str(e).strip() else "",
        )
        return False
    _register_fakes()
    logger.info("kvray CPU kernels ready in %.1f s", time.perf_counter() - started)
    return True


def _build_directory(name: str) -> Path:
    """Where the build of `name` lives: under $TORCH_EXTENSIONS_DIR, else torch's default
    root (~/.cache/torch_extensions)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    directory = Path(root) / name
    directory.mkdir(parents=True, exist_ok=True)
    return directory


# torch's own lock: a file that the building process creates and deletes when it is done.
_TORCH_LOCK = "lock"


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Hold the build of `directory` against every other kvray process on this machine.

    torch's `load` waits, without end, while its lock file exists; a build that was killed (a
    Ctrl-C during the first start, an OOM kill) leaves that file behind, and every later start
    would hang there. An flock goes away with its process: whoever holds it is the only process
    that can be building here, so a torch lock file found then was left by a dead one."""
    with open(directory / "kvray.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            stale = directory / _TORCH_LOCK
            if stale.exists():
                logger.warning("removing %s, left by a kernel build that did not finish", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _register_fakes() -> None:
    """Each op's output shape, for torch.compile, which traces with tensors that hold no data
    (the compiled decode steps of workers/decode_graphs.py)."""
    fake = torch.library.register_fake
    fake("kvray::paged_decode_attention")(lambda query, *_: query.new_empty(query.shape))
    fake("kvray::int8_linear")(lambda x, weight, *_: x.new_empty((x.shape[0], weight.shape[0])))
    fake("kvray::bf16_pack")(
        lambda weight: weight.new_empty((-(-weight.shape[0] // 32), weight.shape[1] // 2, 32, 2))
    )
    fake("kvray::bf16_unpack")(
        lambda packed, out_features: packed.new_empty((out_features, packed.shape[1] * 2))
    )
    if hasattr(torch.ops.kvray, "bf16_linear"):  # the AVX512-BF16 ops
        fake("kvray::bf16_linear")(
            lambda x, packed, out_features, bias: x.new_empty((x.shape[0], out_features))
        )
        fake("kvray::int8_panel_linear")(
            lambda x, packed, scales, group, out_features, bias: x.new_empty(
                (x.shape[0], out_features)
            )
        )
        fake("kvray::int8_panel_dequantize")(
            lambda packed, scales, group: packed.new_empty(packed.shape, dtype=torch.bfloat16)
        )
    fake("kvray::rotary_embedding")(
        lambda q, k, cos, sin: tuple(
            x.new_empty((x.shape[0], x.shape[2], x.shape[1], x.shape[3])).transpose(1, 2)
            for x in (q, k)
        )
    )
    fake("kvray::argmax_rows")(lambda x: x.new_empty(x.shape[:1], dtype=torch.long))
    if hasattr(torch.ops.kvray, "w8a8_linear"):  # the AVX2 (or AVX512-VNNI) ops
        fake("kvray::w8a8_linear")(
            lambda x, packed, scales, out_features, bias: x.new_empty((x.shape[0], out_features))
        )
    if hasattr(torch.ops.kvray, "decode_layers"):  # AVX512-BF16 or AVX2 builds
        fake("kvray::decode_layers")(lambda h, *_: torch.empty_like(h))
    fake("kvray::rms_norm")(lambda x, weight, eps: torch.empty_like(x))
    fake("kvray::int8_dequantize")(
        lambda weight, scale, group_size, dtype: weight.new_empty(weight.shape, dtype=dtype)
    )


def _put_ninja_on_path() -> None:
    """torch looks for `ninja` on PATH; the pip package's copy is there only in an activated
    virtual environment. (PATH is one of the other programs' variables kvray may read and
    write; docs/architecture.md lists them.)"""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


def _machine_tag() -> str:
    """A short digest of the CPU's feature flags, the compiler target, the Python and the torch
    build."""
    flags = " ".join(sorted(cpu_flags()))
    key = f"{platform.machine()}|{flags}|{platform.python_version()}|{torch.__version__}"
    return hashlib.sha256(key.encode()).hexdigest()[:10]
