"""The serving benchmarks' clients: the same requests through kvray's gRPC client, through the
OpenAI-compatible HTTP API with the `openai` client, and with a bare SSE reader. Each returns
(per-request results, seconds) from `load.drive`."""

from __future__ import annotations

import json

from load import RequestResult, RequestSpec, drive


async def run_against_server(
    target: str, specs, *, concurrency
) -> tuple[list[RequestResult], float]:
    from kvray.client import AsyncKvrayClient

    async with AsyncKvrayClient(target, max_retries=0) as client:

        async def send(spec: RequestSpec):
            async for chunk in client.stream(
                spec.prompt, temperature=0, max_tokens=spec.max_tokens, ignore_eos=True
            ):
                if chunk.token_ids:
                    yield len(chunk.token_ids)

        # Warm the connection and the replica once.
        await client.generate([1, 2, 3], max_tokens=2)
        return await drive(specs, send, concurrency=concurrency)


async def run_against_openai(
    base_url: str, model: str, specs, *, concurrency
) -> tuple[list[RequestResult], float]:
    """The same requests through the OpenAI-compatible HTTP API (streamed completions)."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)

    async def send(spec: RequestSpec):
        stream = await client.completions.create(
            model=model, prompt=spec.prompt, max_tokens=spec.max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        seen = 0
        async for event in stream:
            if event.choices and event.choices[0].text:
                seen += 1  # one event per step's tokens; usage settles the exact count
                yield 1
            elif event.usage is not None and event.usage.completion_tokens > seen:
                yield event.usage.completion_tokens - seen

    try:
        await client.completions.create(model=model, prompt=[1, 2, 3], max_tokens=2)  # warm up
        return await drive(specs, send, concurrency=concurrency)
    finally:
        await client.close()


async def run_against_sse(
    base_url: str, model: str, specs, *, concurrency
) -> tuple[list[RequestResult], float]:
    """The same requests through the HTTP API with a bare SSE reader (aiohttp): what the server
    adds, without the `openai` client's own parsing."""
    import aiohttp

    async with aiohttp.ClientSession() as session:

        async def send(spec: RequestSpec):
            body = {"model": model, "prompt": spec.prompt, "max_tokens": spec.max_tokens,
                    "temperature": 0, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            seen = 0
            async with session.post(f"{base_url}/completions", json=body) as resp:
                resp.raise_for_status()
                async for line in resp.content:
                    if line.startswith(b'data: {"id"') and b'"choices":[]' not in line:
                        seen += 1  # one event per step's tokens; usage settles the count
                        yield 1
                    elif b'"usage":{' in line:
                        tokens = json.loads(line[6:])["usage"]["completion_tokens"]
                        if tokens > seen:
                            yield tokens - seen

        await send(RequestSpec([1, 2, 3], 2, 0.0)).__anext__()  # warm up the connection
        return await drive(specs, send, concurrency=concurrency)
