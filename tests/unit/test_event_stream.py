"""A streamed HTTP response releases what it holds (the token's slot, the requests) however
it ends, even when the client leaves before the first event."""

from __future__ import annotations

import asyncio

from kvray.cluster.http_server import EventStream


def run_response(events, receive_messages, send_delay_s: float = 0.0) -> list[str]:
    released: list[str] = []
    sent: list[dict] = []

    async def release() -> None:
        released.append("released")

    async def receive() -> dict:
        if receive_messages:
            return receive_messages.pop(0)
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await asyncio.sleep(send_delay_s)
        sent.append(message)

    scope = {"type": "http", "asgi": {"spec_version": "2.3"}, "method": "GET", "path": "/"}
    asyncio.run(EventStream(events, release)(scope, receive, send))
    return released


def test_a_client_gone_before_the_first_event_still_releases():

    async def events():
        yield "data: 1\n\n"

    released = run_response(events(), [{"type": "http.disconnect"}], send_delay_s=0.05)
    assert released == ["released"]


def test_a_finished_stream_releases_once():
    async def events():
        for i in range(3):
            yield f"data: {i}\n\n"

    assert run_response(events(), []) == ["released"]
