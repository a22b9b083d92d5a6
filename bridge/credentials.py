"""Passes the HTTP caller's `Authorization: Bearer <key>` on to the gRPC server with every call,
and its `X-Tokenwire-Affinity` (see tokenwire.affinity), when it names its conversation itself.

A middleware puts the header into a context variable for the request's task; Upstream reads
it for each call it makes. The bridge itself checks nothing: the server decides (401 from its
UNAUTHENTICATED), so the bridge needs no keys of its own.
"""

from __future__ import annotations

import contextvars

from aiohttp import web
from aiohttp.typedefs import Handler

from tokenwire import affinity

from .errors import ApiError, invalid_param

_AUTHORIZATION: contextvars.ContextVar[str] = contextvars.ContextVar("tokenwire_authorization", default="")
_AFFINITY: contextvars.ContextVar[str] = contextvars.ContextVar("tokenwire_affinity", default="")


def grpc_metadata(affinity_key: str = "") -> tuple[tuple[str, str], ...]:
    """Call metadata for the current request: its Authorization header, if it sent one, and the
    affinity key (the caller's own, else `affinity_key`) a router in front of the servers hashes."""
    value = _AUTHORIZATION.get()
    metadata = (("authorization", value),) if value else ()
    key = _AFFINITY.get() or affinity_key
    return (*metadata, (affinity.HEADER, key)) if key else metadata


@web.middleware
async def forward_credentials(request: web.Request, handler: Handler) -> web.StreamResponse:
    value = request.headers.get("Authorization", "").strip()
    if value and not (value.isascii() and value.isprintable()):
        # gRPC metadata is ASCII: such a header can hold no key of ours, and must not reach grpc.
        raise ApiError(401, "the Authorization header must be printable ASCII (Bearer <key>)",
                       type="authentication_error", code="invalid_api_key")
    key = request.headers.get(affinity.HEADER, "").strip()
    if key and not affinity.valid(key):
        raise invalid_param(affinity.HEADER, f"the {affinity.HEADER} header must be 1 to 128 printable ASCII "
                                             "characters")
    token, affinity_token = _AUTHORIZATION.set(value), _AFFINITY.set(key)
    try:
        return await handler(request)
    finally:
        _AUTHORIZATION.reset(token)
        _AFFINITY.reset(affinity_token)
