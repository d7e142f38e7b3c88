"""Host (CPU) memory: zero-filled tensors whose pages become resident only once written (the
CPU KV cache), and handing the free pages that malloc keeps back to the operating system.

Nothing here speaks to a GPU; both helpers are no-ops or plain torch where the OS lacks them.
"""

from __future__ import annotations

import ctypes
import math
import mmap

import torch


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of zeros that costs resident memory only where it has been written.

    Backed by a private anonymous mapping: the kernel hands out a zeroed page on a page's first
    touch, so a KV cache sized for the most sequences the settings allow holds only the blocks
    that requests have used. `torch.zeros` writes (and so commits) every page at once.
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    flags = getattr(mmap, "MAP_PRIVATE", None)
    if nbytes == 0 or flags is None:  # an empty tensor, or no POSIX mmap (Windows)
        return torch.zeros(shape, dtype=dtype)
    buffer = mmap.mmap(-1, nbytes, flags=flags | mmap.MAP_ANONYMOUS)
    # NOTE: the tensor keeps `buffer` alive; the mapping goes when the tensor does.
    return torch.frombuffer(buffer, dtype=dtype).view(shape)


def release_free_memory() -> None:
    """Return the free pages glibc's malloc keeps in its heaps to the OS (`malloc_trim(0)`).

    Loading frees the checkpoint's originals once they are converted (fused, packed,
    quantized), and a forward frees its activations, in pieces small enough to come from the
    heap; glibc keeps such pages for reuse, and they count in the process's RSS until trimmed.
    A no-op where the C library has no malloc_trim (macOS, musl).
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)
