"""The container image: built from k8s/Dockerfile, it serves one streamed Generate on CPU.

Slow (a few minutes) and needs a Docker daemon; without one it is skipped with the reason.
With no image registry, a Debian base made by `debootstrap` stands in for BASE_IMAGE (the
Dockerfile only needs `python` with pip); the host's CA bundle and pip's configured wheelhouse
(if any) are passed in so the build works behind the same proxy as the host.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from kvray.client import KvrayClient
from tests.helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
BASE_TAG = "kvray-base:local"
IMAGE_TAG = "kvray:test"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def docker(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def base_image(tmp_path_factory) -> str:
    if shutil.which("docker") is None or docker("info").returncode != 0:
        pytest.skip("no Docker daemon (install docker.io and start dockerd)")
    if docker("image", "inspect", BASE_TAG).returncode == 0:
        return BASE_TAG
    if shutil.which("debootstrap") is None:
        pytest.skip("no debootstrap to build a stand-in base image")
    rootfs = tmp_path_factory.mktemp("base") / "rootfs"
    subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=python3,python3-pip,python3-venv,ca-certificates",
         "bookworm", str(rootfs), "http://deb.debian.org/debian"],
        check=True, capture_output=True, timeout=1200,
    )  # fmt: skip
    (rootfs / "usr/local/bin/python").symlink_to("/usr/bin/python3")
    if CA_BUNDLE.exists():  # trust what the host trusts (a TLS-inspecting proxy, say)
        shutil.copyfile(CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
    archive = rootfs.parent / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(rootfs, arcname=".")
    changes = ["ENV PIP_BREAK_SYSTEM_PACKAGES=1", "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
               "ENV PATH=/usr/local/bin:/usr/bin:/bin"]  # fmt: skip
    args = [arg for change in changes for arg in ("--change", change)]
    assert docker("import", *args, str(archive), BASE_TAG).returncode == 0
    return BASE_TAG


@contextlib.contextmanager
def wheelhouse():
    """pip's configured find-links folder served over HTTP (None if pip has none)."""
    found = subprocess.run(
        ["pip", "config", "get", "global.find-links"], capture_output=True, text=True
    )
    folder = Path(found.stdout.strip()) if found.returncode == 0 else None
    if folder is None or not folder.is_dir():
        yield None
        return
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # one line per wheel otherwise
        pass


def test_image_builds_and_serves_a_streamed_generate(base_image):
    with wheelhouse() as links:
        build_args = [
            "--build-arg",
            f"BASE_IMAGE={base_image}",
            "--build-arg",
            "TORCH_INDEX=https://pypi.org/simple",
        ]
        if links:
            build_args += ["--build-arg", f"PIP_FIND_LINKS={links}"]
        build = docker("build", "--network", "host", "-f", "k8s/Dockerfile", *build_args, "-t", IMAGE_TAG, ".",
                       cwd=ROOT, timeout=3000)  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    port = free_port()
    run = docker("run", "-d", "--network", "host", "--shm-size=2g", IMAGE_TAG,
                 "kvray", "serve", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "256")  # fmt: skip
    assert run.returncode == 0, run.stderr
    container = run.stdout.strip()
    try:
        with KvrayClient(f"127.0.0.1:{port}") as client:
            client.wait_until_serving(timeout=300)
            chunks = list(
                client.stream(
                    "Hello from a container", temperature=0, max_tokens=12, ignore_eos=True
                )
            )
        assert sum(len(c.token_ids) for c in chunks) == 12
        assert chunks[-1].finish_reason == "length"
    finally:
        docker("stop", "-t", "30", container)
        logs = docker("logs", container)
        docker("rm", container)
    assert "serving tiny" in logs.stdout + logs.stderr
