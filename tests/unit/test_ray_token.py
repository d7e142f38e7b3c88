"""The token a local Ray generates stays with this user: `~/.ray` 0700 before Ray writes the
token into it, the token file 0600 after (Ray writes them with the umask: 0755 and 0644)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kvray.cluster.config import load
from kvray.cluster.launcher import init_ray, keep_ray_token_private


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    umask = os.umask(0o022)  # the usual one, under which Ray writes 0644
    yield tmp_path
    os.umask(umask)


def write_token_as_ray_does() -> None:
    """What Ray 2.60's ray.init does for a local cluster without a token
    (`authentication_token_setup.generate_and_save_token`)."""
    path = Path.home() / ".ray" / "auth_token"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write("0" * 64)


def test_a_local_rays_token_is_written_into_a_private_folder_and_made_0600(home, monkeypatch):
    import ray

    folder_mode_when_written: list[int] = []

    def local_ray_init(**options) -> None:
        assert options["address"] == "local"
        folder_mode_when_written.append(mode(home / ".ray"))
        write_token_as_ray_does()

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", local_ray_init)
    init_ray(load({}, environ={}))
    assert folder_mode_when_written == [0o700]
    assert mode(home / ".ray") == 0o700
    assert mode(home / ".ray" / "auth_token") == 0o600


def test_a_token_left_readable_by_an_earlier_run_is_tightened(home):
    write_token_as_ray_does()
    assert mode(home / ".ray" / "auth_token") == 0o644
    keep_ray_token_private()
    assert (mode(home / ".ray"), mode(home / ".ray" / "auth_token")) == (0o700, 0o600)


def test_permissions_are_only_taken_away(home):
    write_token_as_ray_does()
    (home / ".ray" / "auth_token").chmod(0o400)
    (home / ".ray").chmod(0o500)
    try:
        keep_ray_token_private()
        assert (mode(home / ".ray"), mode(home / ".ray" / "auth_token")) == (0o500, 0o400)
    finally:
        (home / ".ray").chmod(0o700)  # so that pytest can remove it
