"""A real local Ray started by kvray leaves its token readable by this user alone."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ray

START_LOCAL_RAY = """
import os
os.umask(0o022)  # the usual one, under which Ray 2.60 writes the token 0644
from kvray.cluster.config import load
from kvray.cluster.launcher import init_ray
init_ray(load({}, environ={}))
import ray
ray.shutdown()
"""


def test_a_local_rays_token_file_is_0600_in_a_0700_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # Ray's defaults
    result = subprocess.run(
        [sys.executable, "-c", START_LOCAL_RAY],
        env={**env, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    token = tmp_path / ".ray" / "auth_token"
    assert len(token.read_text().strip()) == 64  # Ray wrote its token there
    assert stat.S_IMODE((tmp_path / ".ray").stat().st_mode) == 0o700
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
