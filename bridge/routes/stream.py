"""The bridge's own API: /api/models and /api/generate (SSE with queued/token/done/error events)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tokenwire.bridge.errors import ApiError
from tokenwire.bridge.fields import (
    IGNORE_EOS,
    KEEP_ALIVE,
    MAX_TOKENS,
    MAX_UINT32,
    MESSAGES,
    MODEL,
    SAMPLING,
    STOP,
    USER,
    sampling,
    stop_strings,
)
from tokenwire.bridge.params import Params
from tokenwire.bridge.proto_request import chat_messages, finish_reason_name, generate_request, request_id_for
from tokenwire.bridge.relay import note, relay_stream
from tokenwire.bridge.request_body import read_json_object
from tokenwire.bridge.sse import SSEWriter
from tokenwire.bridge.tool_fields import tool_call_json
from tokenwire.bridge.upstream import UPSTREAM
from tokenwire.enums import enum_name
from tokenwire.v1 import inference_pb2 as pb

# The request fields of /api/generate, with their schemas (the OpenAPI document publishes these).
GENERATE_FIELDS: dict[str, Any] = {
    "prompt": {"type": "string", "minLength": 1},
    "messages": MESSAGES,
    "model": MODEL,
    "max_tokens": {**MAX_TOKENS, "description": f"{MAX_TOKENS['description']} Absent: the server's default."},
    "stop": STOP,
    "logprobs": {"type": "boolean", "description": "Token events carry `logprob`."},
    "ignore_eos": IGNORE_EOS,
    "user": USER,
    "keep_alive": KEEP_ALIVE,
    **SAMPLING,
}


def model_info(m: pb.ModelInfo) -> dict[str, Any]:
    return {
        "id": m.id,
        "architecture": m.architecture,
        "parameter_count": m.parameter_count,
        "precision": m.precision,
        "context_length": m.context_length,
        "state": enum_name(pb.ModelState, m.state),
        "loaded": m.loaded,
        "size_bytes": m.size_bytes,
        "is_default": m.is_default,
        "aliases": list(m.aliases),
        "error_message": m.error_message,
        "memory_bytes": m.memory_bytes,
        "kv_cache_bytes": m.kv_cache_bytes,
        "last_used_unix_ms": m.last_used_unix_ms,
        "load_time_ms": round(m.load_time_ms, 3),
        "load_count": m.load_count,
        "expires_unix_ms": m.expires_unix_ms,
        "active_requests": m.active_requests,
        "kind": m.kind or "generate",
    }


def usage_dict(u: pb.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "cached_prompt_tokens": u.cached_prompt_tokens,
        "time_to_first_token_ms": round(u.time_to_first_token_ms, 3),
        "decode_tokens_per_second": round(u.decode_tokens_per_second, 3),
        "total_time_ms": round(u.total_time_ms, 3),
        "queue_time_ms": round(u.queue_time_ms, 3),
    }


async def list_models(request: web.Request) -> web.Response:
    reply = await request.app[UPSTREAM].list_models()
    return web.json_response({"models": [model_info(m) for m in reply.models]})


def parse_generate(body: dict[str, Any], request_id: str) -> pb.GenerateRequest:
    p = Params(body)
    p.check_known(GENERATE_FIELDS)
    if p.given("prompt") == p.given("messages"):
        raise ApiError(400, "set exactly one of prompt (raw text) and messages (a chat)", param="prompt")
    prompt = p.string("prompt")
    keep_alive = p.number("keep_alive")
    request = generate_request(
        request_id=request_id,
        model=p.string("model"),
        prompt=prompt,
        messages=chat_messages(p.raw("messages")) if prompt is None else None,
        max_tokens=p.integer("max_tokens", 1, MAX_UINT32),
        stop=stop_strings(p),
        logprobs=bool(p.boolean("logprobs")),
        ignore_eos=bool(p.boolean("ignore_eos")),
        user=p.string("user"),
        sampling=sampling(p, SAMPLING),
    )
    if keep_alive is not None:
        request.keep_alive_s = keep_alive
    return request


class StreamEvents:
    """Writes the /api/generate event stream."""

    def __init__(self, request: web.Request) -> None:
        self.request = request

    async def started(self, sse: SSEWriter, started: pb.Started) -> None:
        note(self.request, model=started.model)
        await sse.event("started", {"model": started.model, "request_id": started.request_id})

    async def queued(self, sse: SSEWriter, position: int) -> None:
        await sse.event("queued", {"position": position})

    async def token(self, sse: SSEWriter, token: pb.TokenDelta) -> None:
        data: dict[str, Any] = {"text": token.text, "token_id": token.token_id, "index": token.index}
        if token.HasField("logprob"):
            data["logprob"] = token.logprob
        if token.reasoning:
            data["reasoning"] = token.reasoning
        await sse.event("token", data)

    async def tool_call(self, sse: SSEWriter, delta: pb.ToolCallDelta) -> None:
        """A call of the request's tools: first its id and name, then fragments of its arguments."""
        data: dict[str, Any] = {"index": delta.index}
        if delta.id:
            data.update(id=delta.id, name=delta.name)
        else:
            data["arguments"] = delta.arguments
        await sse.event("tool_call", data)

    async def finished(self, sse: SSEWriter, finished: pb.Finished) -> None:
        reason = finish_reason_name(finished.reason)
        data: dict[str, Any] = {"finish_reason": reason, "usage": usage_dict(finished.usage), "model": finished.model}
        if finished.matched_stop:
            data["matched_stop"] = finished.matched_stop
        if finished.error_message:
            data["error_message"] = finished.error_message
        if finished.tool_calls:
            data["tool_calls"] = [tool_call_json(c) for c in finished.tool_calls]
        note(self.request, model=finished.model, finish=reason, tokens=finished.usage.completion_tokens)
        await sse.event("done", data)

    async def failed(self, sse: SSEWriter, error: ApiError) -> None:
        await sse.event("error", error.body())


async def generate(request: web.Request) -> web.StreamResponse:
    request_id = request_id_for(request)
    note(request, id=request_id)
    grpc_request = parse_generate(await read_json_object(request), request_id)
    call = request.app[UPSTREAM].generate(grpc_request)
    return await relay_stream(request, call, StreamEvents(request), headers={"X-Request-Id": request_id})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/models", list_models)
    app.router.add_post("/api/generate", generate)
