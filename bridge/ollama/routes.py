"""Ollama's endpoints: /api/chat and /api/generate (NDJSON streams, or one object with stream
false), /api/tags, /api/ps, /api/show, /api/version, /api/pull (tokenwire's pullable names,
pulled on the server's side) and /api/delete, and clear refusals for what tokenwire does
elsewhere (create, copy, push).

Each line of a stream is one JSON object; the last has `done: true`, `done_reason` and Ollama's
counters (durations in nanoseconds). A failure after the stream began is one line
`{"error": "..."}`, which Ollama's clients raise as an error.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
from aiohttp import web

from tokenwire.bridge.credentials import grpc_metadata
from tokenwire.bridge.errors import ApiError
from tokenwire.bridge.params import Params
from tokenwire.bridge.proto_request import finish_reason_name, request_id_for
from tokenwire.bridge.relay import note
from tokenwire.bridge.request_body import read_json_object
from tokenwire.bridge.routes import embeddings as embeddings_route
from tokenwire.bridge.upstream import HEARTBEAT, UPSTREAM, GenerateCall
from tokenwire.v1 import inference_pb2 as pb

from . import requests as ollama_requests

# The Ollama API version this listener follows (clients check it to pick features).
OLLAMA_VERSION = "0.6.3"
NS_PER_MS = 1_000_000
_DONE_REASONS = {"stop": "stop", "length": "length", "cancelled": "stop"}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _ms_iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def _body(request: web.Request) -> Params:
    if not request.can_read_body:
        return Params({})
    return Params(await read_json_object(request, any_content_type=True))


def _counters(finished: pb.Finished) -> dict[str, Any]:
    u = finished.usage
    decode_s = u.completion_tokens / u.decode_tokens_per_second if u.decode_tokens_per_second > 0 else 0.0
    prefill_ms = max(0.0, u.time_to_first_token_ms - u.queue_time_ms)
    return {
        "done_reason": _DONE_REASONS.get(finish_reason_name(finished.reason), "stop"),
        "total_duration": int(u.total_time_ms * NS_PER_MS),
        "load_duration": 0,
        "prompt_eval_count": u.prompt_tokens,
        "prompt_eval_duration": int(prefill_ms * NS_PER_MS),
        "eval_count": u.completion_tokens,
        "eval_duration": int(decode_s * 1e9),
    }


def _failure(finished: pb.Finished) -> ApiError | None:
    if finish_reason_name(finished.reason) == "error":
        return ApiError(500, finished.error_message or "generation failed", type="server_error")
    return None


class _Piece:
    """How one kind of endpoint shapes its lines: /api/chat puts text in message.content,
    /api/generate in response."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat

    def text(self, model: str, text: str, thinking: str = "") -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "created_at": _now()}
        if self.chat:
            body["message"] = {"role": "assistant", "content": text}
            if thinking:
                body["message"]["thinking"] = thinking
        else:
            body["response"] = text
            if thinking:
                body["thinking"] = thinking
        body["done"] = False
        return body

    def last(self, model: str, finished: pb.Finished, whole: str = "", thinking: str = "") -> dict[str, Any]:
        body = self.text(model, whole, thinking)
        if self.chat and finished.tool_calls:  # Ollama's shape: no ids, arguments as an object
            body["message"]["tool_calls"] = [{"function": {"name": c.name, "arguments": json.loads(c.arguments_json)}}
                                             for c in finished.tool_calls]
        body["done"] = True
        body.update(_counters(finished))
        return body


async def _events(call: Any) -> AsyncIterator[tuple[str, pb.GenerateResponse]]:
    """(kind, message) of each message of the call; heartbeats (nothing to send) skipped."""
    async for item in call:
        if item is not HEARTBEAT:
            yield item.WhichOneof("event"), item


async def _stream(request: web.Request, call: GenerateCall, piece: _Piece, model: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)

    async def line(body: dict[str, Any]) -> None:
        await response.write(json.dumps(body, ensure_ascii=False, allow_nan=False).encode() + b"\n")

    try:
        async for kind, item in _events(call):
            if kind == "started":
                model = item.started.model or model
            elif kind == "token" and (item.token.text or item.token.reasoning):
                await line(piece.text(model, item.token.text, item.token.reasoning))
            elif kind == "finished":
                note(request, model=item.finished.model, finish=finish_reason_name(item.finished.reason),
                     tokens=item.finished.usage.completion_tokens)
                error = _failure(item.finished)
                await line({"error": error.message} if error else piece.last(item.finished.model or model,
                                                                               item.finished))
                await call.drain()
                break
        else:
            await line({"error": "the model server ended the stream without a finish event"})
    except ApiError as exc:  # the stream has begun: the error is its last line
        await line({"error": exc.message})
    finally:
        await call.close()
    await response.write_eof()
    return response


async def _whole(call: GenerateCall, piece: _Piece, model: str) -> dict[str, Any]:
    texts: list[str] = []
    thoughts: list[str] = []
    try:
        async for kind, item in _events(call):
            if kind == "started":
                model = item.started.model or model
            elif kind == "token":
                texts.append(item.token.text)
                thoughts.append(item.token.reasoning)
            elif kind == "finished":
                await call.drain()
                error = _failure(item.finished)
                if error is not None:
                    raise error
                return piece.last(item.finished.model or model, item.finished, "".join(texts), "".join(thoughts))
    finally:
        await call.close()
    raise ApiError(502, "the model server ended the stream without a finish event", type="server_error")


async def _generate(request: web.Request, grpc_request: pb.GenerateRequest, stream: bool, chat: bool):
    note(request, id=grpc_request.request_id)
    call = request.app[UPSTREAM].generate(grpc_request)
    piece = _Piece(chat)
    if stream:
        # The first message decides: a refusal (unknown model, bad option, full queue) is an HTTP
        # error before any line is written.
        first = await _first(call)
        return await _stream(request, _Prepended(first, call), piece, grpc_request.model)
    return web.json_response(await _whole(call, piece, grpc_request.model))


async def _first(call: GenerateCall) -> Any:
    try:
        async for item in call:
            if item is not HEARTBEAT:
                return item
    except ApiError:
        await call.close()
        raise
    return None


class _Prepended:
    """A GenerateCall with its first message already read."""

    def __init__(self, first: Any, call: GenerateCall) -> None:
        self._first, self._call = first, call

    def __aiter__(self) -> _Prepended:
        return self

    async def __anext__(self) -> Any:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self._call.__anext__()

    async def drain(self) -> None:
        await self._call.drain()

    async def close(self) -> None:
        await self._call.close()


async def chat(request: web.Request) -> web.StreamResponse:
    p = await _body(request)
    grpc_request = ollama_requests.chat_request(p, request_id_for(request))
    return await _generate(request, grpc_request, p.boolean("stream") is not False, chat=True)


async def generate(request: web.Request) -> web.StreamResponse:
    p = await _body(request)
    grpc_request = ollama_requests.generate_body(p, request_id_for(request))
    if grpc_request is None:  # an empty prompt: load the model (keep_alive 0: unload it)
        return web.json_response(await _load_or_unload(request, ollama_requests.model_name(p),
                                                       ollama_requests.keep_alive(p)))
    return await _generate(request, grpc_request, p.boolean("stream") is not False, chat=False)


async def _load_or_unload(request: web.Request, model: str, keep_alive: float | None) -> dict[str, Any]:
    upstream = request.app[UPSTREAM]
    try:
        if keep_alive == 0:
            reply = await upstream.stub.UnloadModel(pb.UnloadModelRequest(model=model), timeout=600,
                                                    metadata=grpc_metadata())
            model_id, reason = reply.model.id or model, "unload"
        else:
            load = pb.LoadModelRequest(model=model)
            if keep_alive is not None:
                load.keep_alive_s = keep_alive
            model_id, reason = model, "load"
            async for event in upstream.stub.LoadModel(load, timeout=600, metadata=grpc_metadata()):
                if event.HasField("model"):
                    model_id = event.model.id
    except grpc.aio.AioRpcError as exc:
        raise upstream.error(exc) from exc
    return {"model": model_id, "created_at": _now(), "response": "", "done": True, "done_reason": reason}


# ---- models ------------------------------------------------------------------------------------

def _details(m: pb.ModelInfo) -> dict[str, Any]:
    return {"parent_model": "", "format": "onnx", "family": m.architecture, "families": [m.architecture],
            "parameter_size": _parameter_size(m.parameter_count), "quantization_level": m.precision}


def _parameter_size(count: int) -> str:
    if count >= 1e9:
        return f"{count / 1e9:.1f}B"
    return f"{count / 1e6:.0f}M" if count else ""


def _digest(m: pb.ModelInfo) -> str:
    """A stable id of the listing (Ollama's is its manifest's sha256; tokenwire has no manifest)."""
    return hashlib.sha256(f"{m.id}:{m.size_bytes}".encode()).hexdigest()


def _ordered(models: list[pb.ModelInfo]) -> list[pb.ModelInfo]:
    """The default model first: apps that pick the first entry pick it."""
    return sorted(models, key=lambda m: not m.is_default)


async def tags(request: web.Request) -> web.Response:
    reply = await request.app[UPSTREAM].list_models()
    models = [{"name": m.id, "model": m.id, "modified_at": _ms_iso(m.last_used_unix_ms or 0),
               "size": m.size_bytes, "digest": _digest(m), "details": _details(m)}
              for m in _ordered(list(reply.models))]
    return web.json_response({"models": models})


async def ps(request: web.Request) -> web.Response:
    reply = await request.app[UPSTREAM].list_models()
    models = [{"name": m.id, "model": m.id, "size": m.memory_bytes, "digest": _digest(m), "details": _details(m),
               "expires_at": _ms_iso(m.expires_unix_ms) if m.expires_unix_ms > 0 else "0001-01-01T00:00:00Z",
               "size_vram": 0, "context_length": m.context_length}
              for m in reply.models if m.loaded]
    return web.json_response({"models": models})


async def show(request: web.Request) -> web.Response:
    p = await _body(request)
    name = p.string("model") or p.string("name")  # older clients send "name"
    if not name:
        raise ApiError(400, "model is required", param="model")
    name = name.removesuffix(":latest")
    reply = await request.app[UPSTREAM].list_models()
    default = next((m for m in reply.models if m.is_default), None)
    for m in reply.models:
        if name in (m.id, *m.aliases) or (default is m and name in ("default", m.id.split(":")[0])):
            return web.json_response({
                "modelfile": f"# tokenwire model {m.id}\nFROM {m.id}\n", "parameters": "", "template": "",
                "details": _details(m), "capabilities": ["embedding" if m.kind == "embedding" else "completion"],
                "model_info": {"general.architecture": m.architecture, "general.parameter_count": m.parameter_count,
                               f"{m.architecture}.context_length": m.context_length},
                "modified_at": _ms_iso(m.last_used_unix_ms or 0)})
    raise ApiError(404, f"model {name!r} not found", param="model", code="model_not_found")


async def embed(request: web.Request) -> web.Response:
    """Ollama's /api/embed: {model, input: text or texts} -> {embeddings: [[...], ...]}."""
    p = await _body(request)
    p.check_known({"model", "input", "truncate", "options", "keep_alive", "dimensions"})
    if p.raw("truncate") is False:
        raise ApiError(400, "truncate false is not supported: inputs are cut to the model's longest input",
                       param="truncate")
    reply = await embeddings_route.embed(request, embeddings_route.texts_of(p.raw("input")),
                                         ollama_requests.model_name(p), p.integer("dimensions", 1, 1 << 16) or 0,
                                         ollama_requests.keep_alive(p))
    return web.json_response({"model": reply.model, "embeddings": [list(e.values) for e in reply.embeddings],
                              "total_duration": int(reply.total_time_ms * NS_PER_MS), "load_duration": 0,
                              "prompt_eval_count": reply.prompt_tokens})


async def embeddings_legacy(request: web.Request) -> web.Response:
    """Ollama's older /api/embeddings: {model, prompt} -> {embedding: [...]}."""
    p = await _body(request)
    p.check_known({"model", "prompt", "options", "keep_alive"})
    prompt = p.string("prompt")
    if not prompt:
        raise ApiError(400, "prompt is required", param="prompt")
    reply = await embeddings_route.embed(request, [prompt], ollama_requests.model_name(p),
                                         keep_alive=ollama_requests.keep_alive(p))
    return web.json_response({"embedding": list(reply.embeddings[0].values)})


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_VERSION})


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")  # what Ollama answers; clients probe it


async def pull(request: web.Request) -> web.StreamResponse:
    """Ollama's /api/pull by tokenwire's pullable names (`tokenwire pull` on the server's side):
    NDJSON {"status": ...} lines ending with {"status": "success"}, or one object with stream false."""
    p = await _body(request)
    name = ollama_requests.model_name(p)
    stream = p.boolean("stream")
    upstream = request.app[UPSTREAM]
    call = upstream.stub.PullModel(pb.PullModelRequest(name=name), timeout=3600, metadata=grpc_metadata())
    note(request, model=name)
    if stream is False:
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            raise upstream.error(exc) from exc
        return web.json_response({"status": "success"})
    response: web.StreamResponse | None = None
    try:
        async for event in call:
            if response is None:
                response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
                await response.prepare(request)
            await response.write(json.dumps({"status": event.status}).encode() + b"\n")
    except grpc.aio.AioRpcError as exc:
        error = upstream.error(exc)
        if response is None:
            raise error from exc
        await response.write(json.dumps({"error": error.message}).encode() + b"\n")
    finally:
        call.cancel()
    assert response is not None
    await response.write_eof()
    return response


async def delete(request: web.Request) -> web.Response:
    """Ollama's /api/delete: the model leaves the store (an admin key when the server has keys)."""
    p = await _body(request)
    upstream = request.app[UPSTREAM]
    try:
        await upstream.stub.DeleteModel(pb.DeleteModelRequest(model=ollama_requests.model_name(p)), timeout=600,
                                        metadata=grpc_metadata())
    except grpc.aio.AioRpcError as exc:
        raise upstream.error(exc) from exc
    return web.Response(status=200)


def _elsewhere(what: str, how: str):
    async def refuse(request: web.Request) -> web.Response:
        raise ApiError(501, f"{what} is not part of tokenwire's Ollama API: {how}", type="server_error",
                       code="not_implemented")

    return refuse


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", root)
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/generate", generate)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", ps)
    app.router.add_post("/api/show", show)
    app.router.add_get("/api/version", version)
    app.router.add_post("/api/embed", embed)
    app.router.add_post("/api/embeddings", embeddings_legacy)
    app.router.add_post("/api/pull", pull)
    app.router.add_delete("/api/delete", delete)
    for path, what, how in (
            ("/api/create", "creating models", "import one with `tokenwire import`"),
            ("/api/copy", "copying models", "aliases live in the store's aliases.json"),
            ("/api/push", "pushing models", "tokenwire keeps models local"),
            ):
        app.router.add_post(path, _elsewhere(what, how))
