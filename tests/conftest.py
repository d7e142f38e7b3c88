"""Shared fixtures: tiny models built once per session into a private cache (never downloaded)."""

from __future__ import annotations

import os

import pytest

# NOTE: tests never reach a model hub (the built-in smollm2 then comes from PyPI's GGUF).
os.environ["HF_HUB_OFFLINE"] = "1"

ARCH_NAMES = ["tiny", "tiny-qwen2", "tiny-gpt2"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import importlib.util

    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_cuda = torch.cuda.is_available()
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A cache folder for built-in tiny models, private to this test session."""
    return str(tmp_path_factory.mktemp("kvray-cache"))


@pytest.fixture(scope="session")
def tiny_model_path(model_cache_dir: str) -> str:
    from kvray.workers.checkpoints import resolve_model

    return resolve_model("tiny", cache_dir=model_cache_dir)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)
