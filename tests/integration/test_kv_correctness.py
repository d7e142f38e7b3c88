"""KV cache correctness: logits from prefill + N decode steps through the paged cache equal the
logits of one full forward over the same tokens (no cache): in fp32 to 1e-4; in bf16 (packed
linear layers, the compiled paged decode attention) to bf16's rounding."""

from __future__ import annotations

import pytest
import torch

from kvray.workers.config import EngineConfig
from kvray.workers.model_runner import ScheduledSeq
from kvray.workers.quantization import Int8Linear
from kvray.workers.worker import ModelWorker
from tests.conftest import ARCH_NAMES

NUM_DECODES = 12


# (dtype, quantization) -> (atol, rtol) of the logits against an fp32 forward (with int8, of
# the same int8 weights). bf16: its 8-bit mantissa over two layers; a wrong block or mask is
# off by whole units.
TOLERANCE = {
    ("float32", None): (1e-4, 1e-4),
    ("bfloat16", None): (0.25, 0.05),
    ("bfloat16", "int8"): (0.25, 0.05),
}


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.parametrize("dtype,quantization", sorted(TOLERANCE, key=str))
def test_prefill_plus_decode_logits_match_full_forward(
    arch, chunk, dtype, quantization, model_cache_dir
):
    worker = ModelWorker(
        EngineConfig.from_kwargs(
            model=arch,
            dtype=dtype,
            quantization=quantization,
            block_size=4,
            num_kv_blocks=128,
            max_model_len=256,
            cache_dir=model_cache_dir,
        )
    )
    worker.warmup()
    # bf16 decodes on CPU go through the compiled paged attention, fp32 through SDPA.
    assert (worker.runner.decode_kernel is not None) == (dtype == "bfloat16")
    g = torch.Generator().manual_seed(0)
    # Two sequences share every step, with block tables that interleave in the pool.
    seqs = [torch.randint(0, 500, (n + NUM_DECODES,), generator=g).tolist() for n in (23, 41)]
    prompt_lens = [23, 41]
    blocks = [list(range(0, 128, 2)), list(range(1, 128, 2))]
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(worker.model_path, dtype=torch.float32)
    if quantization == "int8":  # the weights the worker multiplies by, in fp32
        for module in list(reference.modules()):
            if isinstance(module, torch.nn.Linear):
                layer = Int8Linear(module.to(getattr(torch, dtype)))  # from the bf16 weights
                module.weight = torch.nn.Parameter(layer.dequantized(getattr(torch, dtype)).float())
                module.float()
    with torch.no_grad():
        full = [reference(torch.tensor([s])).logits[0] for s in seqs]  # [len, vocab]

    computed = [0, 0]
    got: list[list[torch.Tensor]] = [[], []]
    while computed[0] < len(seqs[0]) or computed[1] < len(seqs[1]):
        batch, owners = [], []
        for i, s in enumerate(seqs):
            if computed[i] >= len(s):
                continue
            remaining = prompt_lens[i] - computed[i]
            n = 1 if remaining <= 0 else (remaining if chunk is None else min(chunk, remaining))
            # The worker sees the tokens known so far: prompt, then one more per decode step.
            known = s[: max(prompt_lens[i], computed[i] + 1)]
            batch.append(ScheduledSeq(known, blocks[i], computed[i], n))
            owners.append(i)
        model_input = worker.runner.prepare(batch)
        logits = worker.runner.execute(model_input)
        sampled = [owners[k] for k in model_input.order if batch[k].samples]
        for row, i in enumerate(sampled):
            got[i].append(logits[row])
        for k, i in enumerate(owners):
            computed[i] += batch[k].num_tokens

    for i, s in enumerate(seqs):
        positions = range(prompt_lens[i] - 1, len(s))
        expected = torch.stack([full[i][p] for p in positions])
        actual = torch.stack(got[i]).float()
        atol, rtol = TOLERANCE[dtype, quantization]
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
