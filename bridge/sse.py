"""Server-sent events over an aiohttp StreamResponse; every write is sent at once."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # nginx buffers proxied responses unless told not to, which would defeat token streaming.
    "X-Accel-Buffering": "no",
}


def _json(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)  # NaN is not JSON


class SSEWriter:
    """Writes events; a write to a client that has gone raises ConnectionResetError.

    While `event_id` is set, every event written carries it as its `id:` (a chat reply's event
    number, which a client sends back as Last-Event-ID to resume after it)."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response
        self.event_id: int | None = None

    @classmethod
    async def start(cls, request: web.Request, headers: dict[str, str] | None = None) -> SSEWriter:
        response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **(headers or {})})
        await response.prepare(request)
        return cls(response)

    async def event(self, name: str, data: Any) -> None:
        """`event: NAME` with a JSON payload (the bridge's own /api stream)."""
        await self._send(f"{self._id()}event: {name}\ndata: {_json(data)}\n\n")

    async def data(self, data: Any) -> None:
        """A bare `data:` line: a JSON object, or a literal string such as "[DONE]" (OpenAI streams)."""
        text = data if isinstance(data, str) else _json(data)
        await self._send(f"{self._id()}data: {text}\n\n")

    async def comment(self, text: str) -> None:
        """A comment line; clients ignore it, proxies see traffic."""
        await self._send(f": {text}\n\n")

    def _id(self) -> str:
        return f"id: {self.event_id}\n" if self.event_id is not None else ""

    async def _send(self, text: str) -> None:
        # StreamResponse.write hands the bytes to the transport at once (no app-level buffer);
        # awaiting it also applies back-pressure from a slow client.
        await self.response.write(text.encode("utf-8"))
