"""Router stream helpers: chunks that pile up for a slow consumer merge without losing anything."""

from __future__ import annotations

from kvray.cluster.chunks import CompletionChunk
from kvray.cluster.sequence import FinishReason
from kvray.cluster.streams import coalesce as _coalesce
from kvray.workers.protocol import Logprobs


def chunk(index, tokens, text, *, finish=None, lp=False):
    logprobs = [Logprobs(t, -1.0, [t], [-1.0]) for t in tokens] if lp else None
    return CompletionChunk(
        "r", index, tokens, text, logprobs, finish_reason=finish, num_output_tokens=len(tokens)
    )


def test_consecutive_chunks_of_one_sample_merge_in_order():
    merged = _coalesce(
        [
            chunk(0, [1], "a", lp=True),
            chunk(0, [2], "b", lp=True),
            chunk(0, [3], "c", finish=FinishReason.LENGTH, lp=True),
        ]
    )
    assert len(merged) == 1
    (m,) = merged
    assert m.token_ids == [1, 2, 3] and m.text == "abc" and m.finish_reason is FinishReason.LENGTH
    assert [lp.token_id for lp in m.logprobs] == [1, 2, 3]


def test_samples_and_errors_are_not_merged_across():
    err = RuntimeError("boom")
    items = [chunk(0, [1], "a"), chunk(1, [7], "x"), chunk(0, [2], "b"), err]
    assert _coalesce(items) == items


def test_nothing_merges_after_a_finished_chunk():
    done = chunk(0, [1], "a", finish=FinishReason.STOP)
    later = chunk(0, [2], "b")
    assert _coalesce([done, later]) == [done, later]


def test_a_reused_request_id_never_touches_the_newer_request():
    import asyncio

    from tests.local_router import GREEDY, LocalRouter, collect, expected, settle

    async def main() -> None:
        local = LocalRouter()
        router = local.router
        await router.pool.launch()
        local.step_gate.set()
        old = router.generate([1, 2], GREEDY, request_id="same")
        first = [await anext(old)]
        while first[-1].finish_reason is None:  # read to the last chunk, but do not close it
            first.append(await anext(old))
        newer = router.submit([3, 4], GREEDY, request_id="same")  # the id is free again
        await old.aclose()  # the old reader's cleanup runs now
        await settle()
        assert [t for c in first for t in c.token_ids] == expected([1, 2])
        assert await collect(router, newer) == expected([3, 4])  # not aborted by the old one
        await router.shutdown()

    asyncio.run(main())


def test_a_merged_first_chunk_keeps_the_prompt_logprobs():
    first = chunk(0, [1], "a")
    first.prompt_logprobs = [None, Logprobs(7, -0.5, [7], [-0.5])]
    (m,) = _coalesce([first, chunk(0, [2], "b")])
    assert m.prompt_logprobs == first.prompt_logprobs and m.token_ids == [1, 2]
