"""Where checkpoints come from: GGUF files are converted once into the cache, other names pass
through to from_pretrained unchanged (the conversion itself runs in the real-model test)."""

from __future__ import annotations

from pathlib import Path

from kvray.workers import checkpoints, gguf


def test_a_gguf_file_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    calls: list[tuple[Path, Path]] = []

    def fake_convert(source: Path, out: Path) -> None:
        calls.append((source, out))
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gguf, "convert_gguf", fake_convert)
    model = tmp_path / "model.Q4_0.gguf"
    model.write_bytes(b"GGUF")
    first = checkpoints.resolve_model(str(model), cache_dir=tmp_path / "cache")
    again = checkpoints.resolve_model(str(model), cache_dir=tmp_path / "cache")
    assert first == again and Path(first).parent == tmp_path / "cache" / "models"
    assert (Path(first) / "config.json").exists()
    assert [source for source, _ in calls] == [model]  # the second start reuses it


def test_a_changed_gguf_file_is_converted_again(tmp_path, monkeypatch):
    monkeypatch.setattr(
        gguf, "convert_gguf", lambda src, out: (out / "config.json").write_text("{}")
    )
    model = tmp_path / "m.gguf"
    model.write_bytes(b"v1")
    first = checkpoints.resolve_model(str(model), cache_dir=tmp_path)
    model.write_bytes(b"version 2")
    assert checkpoints.resolve_model(str(model), cache_dir=tmp_path) != first


def test_other_names_pass_through(tmp_path):
    for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", "/models/llama", "missing.gguf"):
        assert checkpoints.resolve_model(name, cache_dir=tmp_path) == name
