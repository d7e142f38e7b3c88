"""The benchmark scripts import and parse their arguments (they are not run in CI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize(
    "script",
    sorted(
        p.name for p in BENCH.glob("*.py") if p.name not in ("clients.py", "common.py", "load.py")
    ),
)
def test_bench_script_shows_its_help(script):
    result = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
