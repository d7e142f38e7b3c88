"""kvray: a Ray-actor LLM serving cluster with a paged KV cache, continuous batching and gRPC streaming.

`from kvray import LLM, SamplingParams` gives the offline engine, which returns `Completion`s
(and streams `GenerationChunk`s), as the gRPC client does; `GrammarSpec` is a structured
output (`SamplingParams.structured_output`, the clients' `structured_output=`); the cluster, client and worker live
in `kvray.cluster`, `kvray.client` and `kvray.workers`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "Completion",
    "GenerationChunk",
    "GrammarSpec",
    "SamplingParams",
    "__version__",
]

if TYPE_CHECKING:
    from kvray.cluster.llm import LLM
    from kvray.outputs import Completion, GenerationChunk
    from kvray.workers.grammar_spec import GrammarSpec
    from kvray.workers.protocol import SamplingParams


def __getattr__(name: str) -> Any:
    # Lazy, so `import kvray` stays cheap and does not pull torch into the router or client.
    if name == "LLM":
        from kvray.cluster.llm import LLM

        return LLM
    if name in ("Completion", "GenerationChunk"):
        from kvray import outputs

        return getattr(outputs, name)
    if name == "SamplingParams":
        from kvray.workers.protocol import SamplingParams

        return SamplingParams
    if name == "GrammarSpec":
        from kvray.workers.grammar_spec import GrammarSpec

        return GrammarSpec
    raise AttributeError(f"module 'kvray' has no attribute {name!r}")
