"""Answers only requests addressed to this bridge (DNS rebinding), and sends the page's security
headers with every response.

A foreign `Host` or a cross-origin `Origin` gets 403 before any handler runs (tokenwire.hosts
holds the policy, shared with the server's metrics listener). Every response carries
X-Frame-Options: DENY, a Content-Security-Policy that allows only this origin (no framing,
images and media also from data:/blob: URLs) and X-Content-Type-Options: nosniff.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from tokenwire.hosts import HostPolicy

from .errors import ApiError

POLICY = web.AppKey("host_policy", HostPolicy)

SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
                                "frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
}


@web.middleware
async def host_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    why = request.app[POLICY].refusal(request.headers.get("Host"), request.headers.get("Origin"))
    if why:
        code = "origin_not_allowed" if "origin" in why.split(":", 1)[0] else "host_not_allowed"
        raise ApiError(403, why, type="permission_error", code=code)
    return await handler(request)


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def install(app: web.Application, policy: HostPolicy) -> None:
    app[POLICY] = policy
    app.on_response_prepare.append(add_security_headers)
