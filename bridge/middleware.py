"""One middleware: turns every failure into an OpenAI-shaped JSON error and logs one line per request."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from aiohttp.typedefs import Handler

from .errors import ApiError, from_http_exception
from .relay import LOG_FIELDS

log = logging.getLogger("tokenwire.bridge")


@web.middleware
async def errors_and_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except ApiError as exc:
        status = exc.status
        fields = request.setdefault(LOG_FIELDS, {})
        fields["error"] = exc.code or exc.type
        response = exc.response()
        if "id" in fields:
            response.headers["X-Request-Id"] = str(fields["id"])
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            status = exc.status
            raise
        error = from_http_exception(exc)
        status = error.status
        return error.response()
    except asyncio.CancelledError:
        status = 499  # the client closed the connection (nginx's code for it)
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        # The details are in the log; a response never carries exception text.
        error = ApiError(500, "internal bridge error (see the bridge's log)", type="server_error",
                         code="internal_error")
        return error.response()
    finally:
        fields = " ".join(f"{k}={v}" for k, v in request.get(LOG_FIELDS, {}).items())
        # The path without its query: a search's words (?q=) stay out of the log.
        log.info("%s %s %d %.0fms%s", request.method, request.path, status,
                 (time.perf_counter() - started) * 1000, f" {fields}" if fields else "")
