"""Requests whose bytes are not their message type answer INVALID_ARGUMENT, not UNKNOWN.

grpc parses a request before any servicer runs; when the bytes do not parse (corrupt wire format,
a string field that is not UTF-8), grpc.aio answers UNKNOWN with the DecodeError's text and logs a
traceback for every such call: a client's bad bytes would read as a server fault, and flood the log.
This interceptor gives every method a deserializer that hands such a request to the method as a
`Malformed` marker instead, and a method in front that answers the marker with INVALID_ARGUMENT
(reason MALFORMED_REQUEST). Streamed requests are checked one by one as the method reads them.
Found by tests/api/test_fuzz_grpc.py.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from tokenwire.server.engine.requests import InvalidRequest

from .errors import abort_for


@dataclass(frozen=True)
class Malformed:
    """A request that did not parse; `why` is the parser's message (no bytes of it)."""

    method: str
    why: str


def _refusal(marker: Malformed) -> InvalidRequest:
    return InvalidRequest(f"the request is not a valid message for {marker.method}: {marker.why}", "",
                          "MALFORMED_REQUEST")


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Wraps every method's handler so that unparsable requests answer INVALID_ARGUMENT."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return tolerant(handler, handler_call_details.method)


def tolerant(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """`handler` with a deserializer that never raises and a method that refuses what did not parse."""
    parse = handler.request_deserializer

    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw)
        except DecodeError as exc:
            return Malformed(method, str(exc))

    streaming_in, streaming_out = handler.request_streaming, handler.response_streaming
    behavior = {
        (False, False): handler.unary_unary, (False, True): handler.unary_stream,
        (True, False): handler.stream_unary, (True, True): handler.stream_stream,
    }[(streaming_in, streaming_out)]

    async def requests(iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for request in iterator:
            if isinstance(request, Malformed):
                await abort_for(context, _refusal(request))
            yield request

    def argument(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return requests(request, context) if streaming_in else request

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await abort_for(context, _refusal(request))
        result = behavior(argument(request, context), context)
        return await result if inspect.isawaitable(result) else result

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, Malformed):
            await abort_for(context, _refusal(request))
        result = behavior(argument(request, context), context)
        if hasattr(result, "__aiter__"):
            async for response in result:
                yield response
        else:
            for response in result:
                yield response

    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler,
    }[(streaming_in, streaming_out)]
    # A streaming method either yields its answers (wrap it in a generator) or is a coroutine that
    # writes them with context.write (grpc.aio's health Watch): await it like a unary one.
    yields = inspect.isasyncgenfunction(behavior) or inspect.isgeneratorfunction(behavior)
    return factory(stream if streaming_out and yields else unary, request_deserializer=deserialize,
                   response_serializer=handler.response_serializer)
