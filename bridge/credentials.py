"""Passes the HTTP caller's `Authorization: Bearer <key>` on to the gRPC server with every call.

A middleware puts the header into a context variable for the request's task; Upstream reads
it for each call it makes. The bridge itself checks nothing: the server decides (401 from its
UNAUTHENTICATED), so the bridge needs no keys of its own.
"""

from __future__ import annotations

import contextvars

from aiohttp import web
from aiohttp.typedefs import Handler

_AUTHORIZATION: contextvars.ContextVar[str] = contextvars.ContextVar("tokenwire_authorization", default="")


def grpc_metadata() -> tuple[tuple[str, str], ...]:
    """Call metadata for the current request: its Authorization header, if it sent one."""
    value = _AUTHORIZATION.get()
    return (("authorization", value),) if value else ()


@web.middleware
async def forward_credentials(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = _AUTHORIZATION.set(request.headers.get("Authorization", "").strip())
    try:
        return await handler(request)
    finally:
        _AUTHORIZATION.reset(token)
