"""Relays one Generate stream to an SSE response, whatever the event format.

The HTTP response starts with the first gRPC message or, if none comes within the heartbeat
interval (queued, model loading), with the first heartbeat. A gRPC error before that is a
plain HTTP JSON error; after it, the translator writes it as an event into the stream.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Protocol

from aiohttp import web

from tokenwire.v1 import inference_pb2 as pb

from .errors import ApiError
from .sse import SSEWriter
from .upstream import HEARTBEAT, GenerateCall

log = logging.getLogger("tokenwire.bridge")

LOG_FIELDS = "tokenwire.log_fields"  # request key: extra fields for the one log line per request


class StreamTranslator(Protocol):
    async def started(self, sse: SSEWriter, started: pb.Started) -> None: ...
    async def queued(self, sse: SSEWriter, position: int) -> None: ...
    async def token(self, sse: SSEWriter, token: pb.TokenDelta) -> None: ...
    async def finished(self, sse: SSEWriter, finished: pb.Finished) -> bool | None: ...
    async def failed(self, sse: SSEWriter, error: ApiError) -> None: ...


def note(request: web.Request, **fields: object) -> None:
    """Adds fields to the request's log line."""
    request.setdefault(LOG_FIELDS, {}).update(fields)


async def relay_stream(
    request: web.Request,
    call: GenerateCall,
    translator: StreamTranslator,
    headers: dict[str, str] | None = None,
) -> web.StreamResponse:
    sse: SSEWriter | None = None
    try:
        async for item in call:
            if sse is None:
                sse = await SSEWriter.start(request, headers)
            if item is HEARTBEAT:
                await sse.comment("keep-alive")
                continue
            sse.event_id = item.event_id or None  # a chat reply's events are numbered (resumable)
            kind = item.WhichOneof("event")
            if kind == "started":
                await translator.started(sse, item.started)
            elif kind == "queued":
                await translator.queued(sse, item.queued.position)
            elif kind == "token":
                await translator.token(sse, item.token)
            elif kind == "tool_call" and hasattr(translator, "tool_call"):  # requests with tools
                await translator.tool_call(sse, item.tool_call)
            elif kind == "chat" and hasattr(translator, "chat"):  # streams of a stored chat start so
                await translator.chat(sse, item.chat)
            elif kind == "finished":
                # A request of n choices has n; the translator says when the stream is over.
                if await translator.finished(sse, item.finished) is not False:
                    await call.drain()
                    return sse.response
        raise ApiError(502, "the model server ended the stream without a finish event",
                       type="server_error", code="upstream_error")
    except ApiError as exc:
        if sse is None:
            raise
        note(request, stream_error=exc.code or exc.status)
        sse.event_id = None  # the error is no event of the reply's
        with contextlib.suppress(ConnectionResetError):
            await translator.failed(sse, exc)
        return sse.response
    except ConnectionResetError:
        # The client went away mid-stream; `finally` cancels the gRPC call (which stops a
        # stateless generation, and only detaches a chat's reply: the server keeps writing it).
        note(request, client="gone")
        if sse is None:
            raise
        return sse.response
    finally:
        await call.close()
