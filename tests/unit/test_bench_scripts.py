"""The benchmark scripts import and parse their arguments (they are not run in CI), and
engine_throughput's pieces that decide what a run prints and how big its baselines are."""

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


@pytest.fixture(scope="module")
def engine_throughput():
    sys.path.insert(0, str(BENCH))
    try:
        import engine_throughput
    finally:
        sys.path.remove(str(BENCH))
    return engine_throughput


def kvray_and(baseline: str, ratio: float) -> dict[str, dict]:
    return {"kvray": {"tokens_per_s": ratio}, baseline: {"tokens_per_s": 1.0}}


def test_targets_are_not_judged_off_the_full_workload(engine_throughput, capsys):
    engine_throughput.print_targets("uniform", kvray_and("hf-cb", 0.5), num_requests=4)
    out = capsys.readouterr().out
    assert "MISSES" not in out and "meets" not in out
    assert out.count("\n") == 1 and "set for 64 requests" in out and "has 4" in out


def test_targets_are_judged_on_the_full_workload(engine_throughput, capsys):
    engine_throughput.print_targets("uniform", kvray_and("hf-cb", 0.5), num_requests=64)
    assert "target kvray >= 3.0x hf-cb: 0.50x (MISSES)" in capsys.readouterr().out


def test_quick_runs_the_uniform_workload_only(engine_throughput, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(engine_throughput, "bench_model", lambda name: Path(name))
    monkeypatch.setattr(engine_throughput, "linear_weight_count", lambda model_dir: 1)
    monkeypatch.setattr(
        engine_throughput, "run_workload", lambda args, w, d: ran.append((w, args)) or []
    )
    monkeypatch.setattr(sys, "argv", ["engine_throughput.py", "--quick", "--systems", "hf-cb"])
    assert engine_throughput.main() == 0
    assert [(w, args.num_requests) for w, args in ran] == [("uniform", 4)]


def test_hf_cb_cache_holds_every_request_and_no_more(engine_throughput):
    from transformers import ContinuousBatchingConfig

    reqs = [engine_throughput.BenchRequest([1] * 500, 256)] * 64  # mixed's longest, 64 times
    config = engine_throughput.hf_cb_config(reqs)
    assert ContinuousBatchingConfig().page_size == 256
    assert config.num_blocks == 64 * 3 + 1  # 756 tokens in 3 pages each, and a spare page
    assert config.max_batch_tokens == engine_throughput.MAX_BATCHED_TOKENS
    assert config.max_requests_per_batch == 64


def test_hf_cb_runs_every_request_to_its_length(engine_throughput, tiny_model_path):
    model = engine_throughput.load_hf(Path(tiny_model_path), "cpu", "float32")
    reqs = [engine_throughput.BenchRequest([5, 6, 7], 4), engine_throughput.BenchRequest([8], 9)]
    assert engine_throughput.run_hf_cb(model, reqs) == 13


def test_shaped_model_tokenizer_decodes_every_token_id(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        from common import make_vocab_tokenizer
    finally:
        sys.path.remove(str(BENCH))
    from transformers import AutoTokenizer

    make_vocab_tokenizer(100).save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.decode(list(range(100))).split() == [f"t{i}" for i in range(100)]
