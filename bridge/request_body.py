"""Reads a request body as a JSON object, with the 415 / 413 / 400 answers when it is not one."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .errors import ApiError
from .params import json_type


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json_object(request: web.Request, any_content_type: bool = False) -> dict[str, Any]:
    """The body as a dict; the size limit is the app's `client_max_size`. `any_content_type`: JSON
    whatever the Content-Type says (Ollama's API reads it so; `curl -d` sends a form type)."""
    if not any_content_type and request.content_type != "application/json" \
            and not request.content_type.endswith("+json"):
        raise ApiError(415, f"expected Content-Type: application/json, got {request.content_type!r}",
                       code="unsupported_media_type")
    limit = request.client_max_size
    if request.content_length is not None and limit and request.content_length > limit:
        raise _too_large(request.content_length, limit)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise _too_large(None, limit) from exc
    if not raw.strip():
        raise ApiError(400, "empty request body; expected a JSON object", code="invalid_json")
    try:
        # NaN and Infinity are not JSON; Python's parser accepts them unless told not to.
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"request body is not UTF-8: {exc}", code="invalid_json") from exc
    except ValueError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {json_type(data)}", code="invalid_json")
    return data


def _too_large(size: int | None, limit: int) -> ApiError:
    what = f"{size} bytes" if size is not None else "larger than that"
    return ApiError(413, f"request body is {what}; the bridge accepts at most {limit} bytes",
                    code="request_too_large")
