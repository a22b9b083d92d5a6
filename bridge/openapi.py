"""The OpenAPI 3.1 description of the bridge's endpoints, served at /openapi.json.

Hand-written to match the handlers; a test checks that its paths and methods are exactly the
app's routes.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tokenwire.bridge.fields import NUM as _NUM
from tokenwire.bridge.routes.audio import add_audio_docs
from tokenwire.bridge.routes.chats_openapi import add_chat_docs
from tokenwire.bridge.routes.embeddings import add_embedding_docs
from tokenwire.bridge.routes.openai_request import CHAT_FIELDS, COMPLETION_FIELDS
from tokenwire.bridge.routes.stream import GENERATE_FIELDS

from .openapi_parts import REQUEST_ID_HEADER, _errors, _json, _ref, _request, sse_event

_OPENAI_USAGE = {"type": "object", "properties": {
    **{k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
    "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": {"type": "integer"}}}}}
_FINISH = {"enum": ["stop", "length"]}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
    },
    "ModelInfo": {
        "type": "object",
        "properties": {
            "id": {"type": "string"}, "architecture": {"type": "string"}, "parameter_count": {"type": "integer"},
            "precision": {"type": "string"}, "context_length": {"type": "integer"},
            "state": {"enum": ["available", "loading", "loaded", "failed"]}, "loaded": {"type": "boolean"},
            "size_bytes": {"type": "integer"}, "is_default": {"type": "boolean"},
            "aliases": {"type": "array", "items": {"type": "string"}}, "error_message": {"type": "string"},
            "memory_bytes": {"type": "integer", "description": "Held while loaded: resident growth measured at "
                             "load plus the KV cache held now; 0 when not loaded."},
            "kv_cache_bytes": {"type": "integer"}, "last_used_unix_ms": {"type": "integer"},
            "load_time_ms": _NUM, "load_count": {"type": "integer"},
            "expires_unix_ms": {"type": "integer", "description": "When keep-alive unloads it; 0: not set."},
            "active_requests": {"type": "integer"},
            "kind": {"enum": ["generate", "embedding", "speech", "ocr"],
                     "description": "What the model does: chat and completions, embeddings, speech to text, or "
                                    "reading the text of images in chat messages."},
        },
    },
    "GenerateRequest": _request(
        GENERATE_FIELDS,
        description="Exactly one of prompt (raw text) and messages (rendered with the model's chat template).",
        oneOf=[{"required": ["prompt"], "properties": {"prompt": {"type": "string"}, "messages": {"type": "null"}}},
               {"required": ["messages"], "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}}}],
    ),
    "Usage": {
        "type": "object",
        "properties": {
            "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
            "cached_prompt_tokens": {"type": "integer"},
            "time_to_first_token_ms": _NUM, "decode_tokens_per_second": _NUM,
            "total_time_ms": _NUM, "queue_time_ms": _NUM,
        },
    },
    "QueuedEvent": {"type": "object", "properties": {"position": {"type": "integer", "minimum": 1}}},
    "TokenEvent": {"type": "object", "required": ["text", "token_id", "index"], "properties": {
        "text": {"type": "string", "description": "May be empty (a character split over tokens, held-back stop text)."},
        "token_id": {"type": "integer"}, "index": {"type": "integer"}, "logprob": _NUM,
        "reasoning": {"type": "string", "description": "A reasoning model's thinking (its <think> block), "
                                                       "present when the token is part of it."}}},
    "ToolCallEvent": {"type": "object", "required": ["index"], "properties": {
        "index": {"type": "integer", "minimum": 0}, "id": {"type": "string"}, "name": {"type": "string"},
        "arguments": {"type": "string", "description": "A fragment of the call's arguments (JSON text); the first "
                                                       "event of a call has its id and name instead."}}},
    "DoneEvent": {"type": "object", "required": ["finish_reason", "usage", "model"], "properties": {
        "finish_reason": {"enum": ["stop", "length", "cancelled", "error", "tool_calls"]},
        "usage": _ref("Usage"), "model": {"type": "string"},
        "matched_stop": {"type": "string", "description": "Present when a stop string ended the generation."},
        "error_message": {"type": "string", "description": "Present when finish_reason is error."},
        "tool_calls": {"type": "array", "description": "The reply's calls of the request's tools, whole.",
                       "items": {"type": "object", "properties": {
                           "id": {"type": "string"}, "type": {"const": "function"},
                           "function": {"type": "object", "properties": {
                               "name": {"type": "string"}, "arguments": {"type": "string"}}}}}}}},
    "ChatCompletionRequest": _request(CHAT_FIELDS, "messages"),
    "CompletionRequest": _request(COMPLETION_FIELDS, "prompt"),
    "ChatCompletion": {"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^chatcmpl-"}, "object": {"const": "chat.completion"},
        "created": {"type": "integer"}, "model": {"type": "string"}, "system_fingerprint": {"type": "string"},
        "choices": {"type": "array", "items": {"type": "object", "properties": {
            "index": {"type": "integer"}, "finish_reason": _FINISH, "logprobs": {"type": ["object", "null"]},
            "message": {"type": "object", "properties": {"role": {"const": "assistant"},
                                                         "content": {"type": "string"}}}}}},
        "usage": _OPENAI_USAGE}},
    "ChatCompletionChunk": {"type": "object", "properties": {
        "id": {"type": "string"}, "object": {"const": "chat.completion.chunk"}, "created": {"type": "integer"},
        "model": {"type": "string"}, "choices": {"type": "array", "items": {"type": "object", "properties": {
            "index": {"type": "integer"}, "delta": {"type": "object"}, "logprobs": {"type": ["object", "null"]},
            "finish_reason": {"type": ["string", "null"]}}}},
        "usage": {"oneOf": [_OPENAI_USAGE, {"type": "null"}]}}},
    "Completion": {"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^cmpl-"}, "object": {"const": "text_completion"},
        "created": {"type": "integer"}, "model": {"type": "string"},
        "choices": {"type": "array", "items": {"type": "object", "properties": {
            "index": {"type": "integer"}, "text": {"type": "string"}, "finish_reason": _FINISH,
            "logprobs": {"type": ["object", "null"]}}}},
        "usage": _OPENAI_USAGE}},
    "OpenAIModel": {"type": "object", "properties": {
        "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
        "owned_by": {"type": "string"},
        "kind": {"enum": ["generate", "embedding", "speech", "ocr"],
                 "description": "tokenwire's: chat and completions, /v1/embeddings, /v1/audio/transcriptions, or "
                                "reading images in chat messages."}}},
}

_ERROR_RESPONSES = {
    "E400": "Malformed JSON, an unknown or unsupported parameter, or a value out of range.",
    "E404": "Unknown model (code model_not_found) or unknown route.",
    "E413": "Request body larger than the bridge's limit (--max-body-bytes).",
    "E415": "Content-Type is not application/json.",
    "E429": "The server's queue is full; retry after Retry-After seconds.",
    "E503": "The model server is unreachable, cannot load the model (gRPC FAILED_PRECONDITION), or the model is "
            "being unloaded (after a keep_alive of 0: retry in a moment).",
}


def _responses() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, description in _ERROR_RESPONSES.items():
        out[name] = _json(_ref("Error"), description)
    out["E429"]["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}}
    return out


_SSE_STREAM_API = (
    "text/event-stream. Events: `started` ({model, request_id}: the resolved model) first; `queued` "
    "(QueuedEvent) while waiting for a slot; `token` (TokenEvent) "
    "per generated token, sent the moment the server produces it; `done` (DoneEvent) last; `error` "
    "(Error) if the stream fails after it started. A `: keep-alive` comment is sent after every "
    "--heartbeat-s seconds without a message. The response starts with the first server message or "
    "the first heartbeat; a failure before that is a plain JSON error with an HTTP status."
)
_SSE_OPENAI = (
    "With stream=true: text/event-stream of `data: {chunk}` lines, then `data: [DONE]`; with "
    "stream_options.include_usage a last chunk has empty choices and the usage. Waiting shows as "
    "SSE comments. A failure after the stream started is a `data: {\"error\": ...}` chunk."
)

# OpenAPI 3.1 reads a text/event-stream schema as the schema of one event (schemathesis validates each).
GENERATE_EVENTS = ("started", "queued", "token", "done", "error")
GENERATE_EVENT = sse_event(*GENERATE_EVENTS, data="The event's object as JSON (see the description).")
_OPENAI_EVENT = sse_event("message", data="A chunk as JSON, {\"error\": ...} if the stream fails, or [DONE].")
# 401 wherever the gRPC server is called: once it has API keys, every call needs one.
_GENERATE_ERRORS = _errors(400, 401, 404, 413, 415, 429, 503)

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "tokenwire bridge", "version": "1",
             "description": "HTTP front of the tokenwire gRPC server: SSE streaming, an OpenAI-compatible "
                            "API and the web page. Errors everywhere have OpenAI's shape (Error)."},
    "paths": {
        "/healthz": {"get": {"summary": "Liveness of the bridge itself (does not contact the gRPC server).",
                             "responses": {"200": _json({"type": "object", "properties": {
                                 "status": {"const": "ok"}}})}}},
        "/readyz": {"get": {"summary": "Readiness: 200 while the gRPC server reports SERVING; 503 while it starts, "
                                      "drains or cannot be reached (point a router's health check here).",
                            "responses": {"200": _json({"type": "object", "properties": {
                                "status": {"const": "ready"}, "server": {"const": "SERVING"}}}),
                                "503": _json({"type": "object", "properties": {
                                    "status": {"const": "not ready"}, "server": {"type": "string"}}},
                                    "Not ready: the server's health status, or why it cannot be reached.")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics: the bridge's own, then the model server's.",
                             "responses": {"200": {"description": "Prometheus text exposition format.",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/api/models": {"get": {"summary": "The server's models (ListModels).",
                                "responses": {"200": _json({"type": "object", "properties": {
                                    "models": {"type": "array", "items": _ref("ModelInfo")}}}),
                                    **_errors(401, 503)}}},
        "/api/generate": {"post": {
            "summary": "Stream a generation as server-sent events.",
            "parameters": [REQUEST_ID_HEADER],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("GenerateRequest")}}},
            "responses": {"200": {"description": _SSE_STREAM_API, "headers": {
                "X-Request-Id": {"schema": {"type": "string"}}},
                "content": {"text/event-stream": {"schema": GENERATE_EVENT}}}, **_GENERATE_ERRORS}}},
        "/v1/models": {"get": {"summary": "OpenAI: list models.", "responses": {"200": _json({
            "type": "object", "properties": {"object": {"const": "list"},
                                             "data": {"type": "array", "items": _ref("OpenAIModel")}}}),
            **_errors(401, 503)}}},
        "/v1/models/{model_id}": {"get": {
            "summary": "OpenAI: one model, by id or alias.",
            "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": _json(_ref("OpenAIModel")), **_errors(401, 404, 503)}}},
        "/v1/chat/completions": {"post": {
            "summary": "OpenAI: chat completion (streaming or not).",
            "parameters": [REQUEST_ID_HEADER],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": _ref("ChatCompletionRequest")}}},
            "responses": {"200": {"description": "A ChatCompletion, or a stream of ChatCompletionChunk. " + _SSE_OPENAI,
                                  "content": {"application/json": {"schema": _ref("ChatCompletion")},
                                              "text/event-stream": {"schema": _OPENAI_EVENT}}},
                          **_GENERATE_ERRORS, **_errors(500)}}},
        "/v1/completions": {"post": {
            "summary": "OpenAI: legacy text completion (streaming or not).",
            "parameters": [REQUEST_ID_HEADER],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("CompletionRequest")}}},
            "responses": {"200": {"description": "A Completion, or a stream of them. " + _SSE_OPENAI,
                                  "content": {"application/json": {"schema": _ref("Completion")},
                                              "text/event-stream": {"schema": _OPENAI_EVENT}}},
                          **_GENERATE_ERRORS, **_errors(500)}}},
        "/openapi.json": {"get": {"summary": "This document.", "responses": {"200": _json({"type": "object"})}}},
        "/": {"get": {"summary": "The web page (bridge/static/index.html).", "responses": {
            "200": {"description": "HTML", "content": {"text/html": {}}}, **_errors(404)}}},
        "/static/{path}": {"get": {
            "summary": "Files of the web page.",
            "parameters": [{"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "The file."}, **_errors(404)}}},
    },
    "components": {"schemas": _SCHEMAS, "responses": _responses()},
}
DOCUMENT["components"]["responses"]["E500"] = _json(
    _ref("Error"), "The generation failed on the server (code generation_error).")
add_chat_docs(DOCUMENT)  # /api/chats and API keys
add_embedding_docs(DOCUMENT)  # /v1/embeddings
add_audio_docs(DOCUMENT)  # /v1/audio/transcriptions


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(DOCUMENT)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/openapi.json", openapi_json)
