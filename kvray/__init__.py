"""kvray: a Ray-actor LLM serving cluster with a paged KV cache, continuous batching and gRPC streaming.

`from kvray import LLM, SamplingParams` gives the offline engine; the cluster, client and
worker live in `kvray.cluster`, `kvray.client` and `kvray.workers`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "RequestOutput", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from kvray.cluster.llm import LLM, RequestOutput
    from kvray.workers.protocol import SamplingParams


def __getattr__(name: str) -> Any:
    # Lazy, so `import kvray` stays cheap and does not pull torch into the router or client.
    if name in ("LLM", "RequestOutput"):
        from kvray.cluster import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from kvray.workers.protocol import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'kvray' has no attribute {name!r}")
