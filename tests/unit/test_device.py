"""dtype `auto`: bf16 on CUDA; on CPU bf16 only for half-precision checkpoints on a CPU that
multiplies bf16 in hardware."""

from __future__ import annotations

import pytest
import torch

from kvray.workers import device as devices

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("native", "checkpoint", "expected"),
    [
        (True, torch.bfloat16, torch.bfloat16),
        (True, torch.float16, torch.bfloat16),
        (True, torch.float32, torch.float32),
        (True, None, torch.float32),
        (False, torch.bfloat16, torch.float32),
    ],
)
def test_auto_on_cpu_follows_the_checkpoint_and_the_hardware(
    monkeypatch, native, checkpoint, expected
):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    assert devices.resolve_dtype("auto", CPU, checkpoint_dtype=checkpoint) == expected


def test_an_explicit_dtype_wins_and_a_bad_one_is_named():
    assert devices.resolve_dtype("bf16", CPU, checkpoint_dtype=torch.float32) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of auto"):
        devices.resolve_dtype("int4", CPU)
