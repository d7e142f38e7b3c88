"""The committed generated protobuf code matches the .proto files, and every field has a comment."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_current():
    pytest.importorskip("grpc_tools")
    result = subprocess.run(
        [sys.executable, "protos/generate.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_proto_field_has_a_comment():
    text = (ROOT / "protos/kvray/v1/generation.proto").read_text().splitlines()
    field = re.compile(r"^\s*(optional |repeated )?[\w.]+ \w+ = \d+;")
    missing = []
    for i, line in enumerate(text):
        if field.match(line) and "//" not in line:
            above = text[i - 1].strip()
            # A comment line above, or a field sharing the comment of the one just above it.
            if not above.startswith("//") and not field.match(text[i - 1]):
                missing.append(line.strip())
    assert not missing, missing
