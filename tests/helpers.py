"""Test helpers: drive an EngineCore against a worker, synchronously or with a step in flight."""

from __future__ import annotations

from collections import defaultdict

from kvray.cluster.engine import CompletionChunk, EngineCore


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Hugging Face `generate(do_sample=False)` on one prompt: the reference for greedy parity."""
    import torch

    ids = torch.tensor([prompt], device=model.device)
    with torch.no_grad():
        # NOTE: an explicit mask, or generate() treats prompt tokens equal to pad as padding.
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def drive(engine: EngineCore, worker, *, pipelined: bool = False, max_steps: int = 10_000):
    """Run until every request finishes. Returns {(request_id, index): [chunks]}.

    With `pipelined`, the next step is scheduled before the previous step's output is applied,
    as the cluster's step loop does.
    """
    chunks: dict[tuple[str, int], list[CompletionChunk]] = defaultdict(list)

    def record(out):
        for c in engine.process(out):
            chunks[(c.request_id, c.index)].append(c)

    in_flight = None
    for _ in range(max_steps):
        if in_flight is None and not engine.has_unfinished():
            return dict(chunks)
        out = worker.step(engine.schedule()) if engine.has_unfinished() else None
        if not pipelined:
            record(out)
            continue
        if in_flight is not None:
            record(in_flight)
        in_flight = out
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def tokens_of(chunks: list[CompletionChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def text_of(chunks: list[CompletionChunk]) -> str:
    return "".join(c.text for c in chunks)
