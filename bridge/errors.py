"""HTTP errors in OpenAI's shape, and the mapping from gRPC status codes to HTTP statuses.

Every error the bridge answers, on /v1/* and /api/* alike, has the body
`{"error": {"message", "type", "param", "code"}}`.

The server names what went wrong in the standard rich error details (a google.rpc.Status in
`grpc-status-details-bin`: ErrorInfo with a stable reason and the field at fault); the bridge maps
those to OpenAI's `code` and `param`, never reading the human message.

FAILED_PRECONDITION (the server has the model but cannot load it) maps to 503: the request
was well formed and the cause is on the server, which retries a failed load on the next
request, so "unavailable, try later" describes it better than 409 ("your request conflicts
with the resource's state").
"""

from __future__ import annotations

from typing import Any

import grpc
from aiohttp import web
from google.rpc import error_details_pb2, status_pb2

# gRPC code -> (HTTP status, OpenAI error type, OpenAI error code)
_STATUS: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", None),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error", None),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.FAILED_PRECONDITION: (503, "server_error", "model_unavailable"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", None),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "server_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error", None),
    grpc.StatusCode.CANCELLED: (499, "server_error", "cancelled"),
}
_UPSTREAM_FAILURE = (502, "server_error", "upstream_error")  # UNKNOWN, INTERNAL, DATA_LOSS, ...

# The server's ErrorInfo reasons that have an OpenAI error code of their own.
_REASON_CODES = {
    "CONTEXT_LENGTH_EXCEEDED": "context_length_exceeded",
    "KV_BUDGET_EXCEEDED": "kv_budget_exceeded",
    "MODEL_NOT_FOUND": "model_not_found",
    "CHAT_NOT_FOUND": "chat_not_found",
    "MESSAGE_NOT_FOUND": "message_not_found",
    "REPLY_FINISHED": "reply_finished",
    "REPLY_ON_ANOTHER_SERVER": "reply_on_another_server",
    "QUEUE_FULL": "rate_limit_exceeded",
    "MODEL_BUSY": "rate_limit_exceeded",
    "MODEL_LOAD_FAILED": "model_unavailable",
    "MODEL_TOO_LARGE": "model_unavailable",
    "API_KEY_INVALID": "invalid_api_key",
    "ADMIN_KEY_REQUIRED": "admin_key_required",
    "SERVER_DRAINING": "server_draining",
    "MODEL_UNLOADING": "model_unloading",
    "CONSTRAINT_INVALID": "invalid_response_format",
    "CHAT_TOO_LARGE": "chat_too_large",
    "STORE_UNAVAILABLE": "store_unavailable",
    "REPLY_NOT_STORED": "reply_not_stored",
    "PROMPT_TOO_LARGE": "request_too_large",
    "IMAGE_TOO_LARGE": "image_too_large",
    "IMAGE_INVALID": "invalid_image",
}
# ...and those with an HTTP status of their own.
# A reply that is no longer being written: 409, the message's state (read it with GET /api/chats/{id}).
_REASON_STATUS = {"IMAGE_TOO_LARGE": 413, "REPLY_FINISHED": 409, "KV_BUDGET_EXCEEDED": 400}
_DETAILS_KEY = "grpc-status-details-bin"

# How grpc describes a server it cannot connect to (as opposed to a status the server sent).
_CONNECT_FAILURE = ("failed to connect", "connection refused", "dns resolution failed", "socket closed",
                    "connection reset", "no route to host", "unreachable")


class ApiError(Exception):
    """An error answer; raise it anywhere in a handler and the error middleware renders it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # OpenAI calls the field "type"
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def invalid_param(param: str, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# How grpc describes a stream cut by the transport rather than failed by the server.
_STREAM_BROKEN = ("stream removed", "rst_stream", "socket closed", "connection reset", "received http2 header with "
                  "status: 50", "goaway")


def from_rpc_error(exc: grpc.aio.AioRpcError, target: str, retry_after_s: int) -> ApiError:
    """The HTTP error for a failed gRPC call."""
    code = exc.code()
    details = exc.details() or code.name
    status, err_type, err_code = _STATUS.get(code, _UPSTREAM_FAILURE)
    reason, param = error_reason(exc)
    err_code = _REASON_CODES.get(reason, err_code)
    if reason in _REASON_STATUS:
        status, err_type = _REASON_STATUS[reason], "invalid_request_error"
    headers: dict[str, str] = {}
    message = details
    if code == grpc.StatusCode.UNAVAILABLE and any(s in details.lower() for s in _CONNECT_FAILURE):
        message = f"the model server is unreachable at {target}: is `tokenwire serve` running? ({details})"
    elif code == grpc.StatusCode.UNAVAILABLE:
        message = f"the model server at {target} is unavailable: {details}"
        if _retry_after(exc) is not None:  # draining, a model unloading, the chat database busy
            headers["Retry-After"] = str(_retry_after(exc))
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and not reason:
        # Not the server's refusal (which names a reason) but this side's gRPC limits, e.g. a
        # reply over the message size: a fault between the two, not the client's rate.
        status, err_type, err_code = _UPSTREAM_FAILURE
        message = (f"the model server failed (RESOURCE_EXHAUSTED without a reason: a gRPC limit such as the "
                   f"message size, not a refusal): {details}")
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        headers["Retry-After"] = str(_retry_after(exc) or retry_after_s)
    elif status == 502 and any(s in details.lower() for s in _STREAM_BROKEN):
        # Not the server's error: the connection to it broke (a replica behind a router stopped).
        message = (f"the connection to the model server broke ({code.name}: {details}); the server may have "
                   "stopped: a retry goes to another replica where there is one")
    elif status == 502:
        # UNKNOWN / INTERNAL carry the server's exception text: it stays in the server's log.
        message = f"the model server failed ({code.name}); its log says why"
    return ApiError(status, message, type=err_type, param=param, code=err_code, headers=headers)


def error_reason(exc: grpc.aio.AioRpcError) -> tuple[str, str | None]:
    """(reason, field) from the call's google.rpc.ErrorInfo; ("", None) when it has none."""
    for key, value in exc.trailing_metadata() or ():
        if key.lower() != _DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except Exception:  # noqa: BLE001 - a malformed trailer is no reason to fail the answer
            return "", None
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return info.reason, info.metadata.get("field") or None
    return "", None


def _retry_after(exc: grpc.aio.AioRpcError) -> int | None:
    """A `retry-after` trailer (seconds), if the server sent one."""
    for key, value in exc.trailing_metadata() or ():
        if key.lower() == "retry-after":
            try:
                return max(0, int(float(value)))
            except (TypeError, ValueError):
                return None
    return None


def from_http_exception(exc: web.HTTPException) -> ApiError:
    """aiohttp's own errors (unknown route, wrong method, body too large) in the OpenAI shape."""
    status = exc.status
    headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
    if status == 404:
        return ApiError(404, "no such endpoint; see /openapi.json", code="not_found")
    if status == 405:
        return ApiError(405, f"method not allowed; allowed: {headers.get('Allow', '')}",
                        code="method_not_allowed", headers=headers)
    if status == 413:
        return ApiError(413, exc.text or "request body too large", code="request_too_large")
    err_type = "server_error" if status >= 500 else "invalid_request_error"
    return ApiError(status, exc.reason or exc.text or str(status), type=err_type, headers=headers)
