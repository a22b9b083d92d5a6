"""Passes the HTTP caller's `Authorization: Bearer <key>` on to the gRPC server with every call.

A middleware puts the header into a context variable for the request's task; Upstream reads
it for each call it makes. The bridge itself checks nothing: the server decides (401 from its
UNAUTHENTICATED), so the bridge needs no keys of its own.
"""

from __future__ import annotations

import contextvars

from aiohttp import web
from aiohttp.typedefs import Handler

from .errors import ApiError

_AUTHORIZATION: contextvars.ContextVar[str] = contextvars.ContextVar("tokenwire_authorization", default="")


def grpc_metadata() -> tuple[tuple[str, str], ...]:
    """Call metadata for the current request: its Authorization header, if it sent one."""
    value = _AUTHORIZATION.get()
    return (("authorization", value),) if value else ()


@web.middleware
async def forward_credentials(request: web.Request, handler: Handler) -> web.StreamResponse:
    value = request.headers.get("Authorization", "").strip()
    if value and not (value.isascii() and value.isprintable()):
        # gRPC metadata is ASCII: such a header can hold no key of ours, and must not reach grpc.
        raise ApiError(401, "the Authorization header must be printable ASCII (Bearer <key>)",
                       type="authentication_error", code="invalid_api_key")
    token = _AUTHORIZATION.set(value)
    try:
        return await handler(request)
    finally:
        _AUTHORIZATION.reset(token)
