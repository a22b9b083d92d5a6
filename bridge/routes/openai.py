"""OpenAI-compatible endpoints: /v1/models, /v1/chat/completions, /v1/completions.

Finish reasons: the server's stop and length pass through. A generation the server ends with
an error (or cancels itself) has no OpenAI finish reason: a non-streaming request answers an
HTTP error, a stream gets a final `data: {"error": {...}}` chunk (which the openai SDK raises).
Waiting (queued, model loading) shows in a stream only as SSE comments, which clients ignore.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tokenwire.bridge.errors import ApiError
from tokenwire.bridge.proto_request import finish_reason_name, request_id_for
from tokenwire.bridge.relay import note, relay_stream
from tokenwire.bridge.request_body import read_json_object
from tokenwire.bridge.sse import SSEWriter
from tokenwire.bridge.upstream import HEARTBEAT, UPSTREAM, GenerateCall
from tokenwire.v1 import inference_pb2 as pb

from .openai_request import OpenAIOptions, parse_chat, parse_completion

SYSTEM_FINGERPRINT = "tokenwire"
_OPENAI_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}


def _failure(finished: pb.Finished) -> ApiError | None:
    """The error for a generation that ended without an OpenAI finish reason."""
    reason = finish_reason_name(finished.reason)
    if reason in _OPENAI_FINISH:
        return None
    if reason == "cancelled":
        return ApiError(503, "the model server cancelled the generation", type="server_error", code="cancelled")
    return ApiError(500, f"generation failed: {finished.error_message or reason}", type="server_error",
                    code="generation_error")


def _strict_json(data: Any) -> str:
    return json.dumps(data, allow_nan=False)  # NaN and Infinity are not JSON: fail loudly, never send them


def _usage(u: pb.Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}}


class ChatShape:
    """Where chat completions put text and logprobs."""

    id_prefix = "chatcmpl-"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self) -> None:
        self.text = ""
        self.entries: list[dict[str, Any]] = []
        self.calls: list[pb.ToolCall] = []

    @staticmethod
    def tool_call_choice(delta: pb.ToolCallDelta) -> dict[str, Any]:
        """A streamed call as OpenAI streams it: its id, type and name first, then its arguments."""
        if delta.name:
            call = {"index": delta.index, "id": delta.id, "type": "function",
                    "function": {"name": delta.name, "arguments": delta.arguments}}
        else:
            call = {"index": delta.index, "function": {"arguments": delta.arguments}}
        return {"index": 0, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None}

    @staticmethod
    def _entry(token: pb.TokenDelta) -> dict[str, Any]:
        return {"token": token.text, "logprob": token.logprob, "bytes": list(token.text.encode()),
                "top_logprobs": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode())}
                                 for t in token.top_logprobs]}

    def first_choice(self) -> dict[str, Any] | None:
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def token_choice(self, token: pb.TokenDelta, logprobs: bool) -> dict[str, Any]:
        lp = {"content": [self._entry(token)], "refusal": None} if logprobs and token.HasField("logprob") else None
        return {"index": 0, "delta": {"content": token.text}, "logprobs": lp, "finish_reason": None}

    def last_choice(self, finish: str) -> dict[str, Any]:
        return {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}

    def add(self, token: pb.TokenDelta, logprobs: bool) -> None:
        self.text += token.text
        if logprobs and token.HasField("logprob"):
            self.entries.append(self._entry(token))

    def choice(self, finish: str, logprobs: bool) -> dict[str, Any]:
        lp = {"content": self.entries, "refusal": None} if logprobs else None
        message: dict[str, Any] = {"role": "assistant", "content": self.text, "refusal": None}
        if self.calls:
            message["content"] = self.text.strip() or None
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments_json}}
                                     for c in self.calls]
        return {"index": 0, "message": message, "logprobs": lp, "finish_reason": finish}


class CompletionShape:
    """Where legacy completions put text and logprobs (`text_offset` counts characters)."""

    id_prefix = "cmpl-"
    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self) -> None:
        self.text = ""
        self.tokens: list[str] = []
        self.logprobs: list[float] = []
        self.offsets: list[int] = []
        self.tops: list[dict[str, float]] = []

    @staticmethod
    def _top(token: pb.TokenDelta) -> dict[str, float]:
        return {t.text: t.logprob for t in token.top_logprobs}

    def first_choice(self) -> dict[str, Any] | None:
        return None

    def token_choice(self, token: pb.TokenDelta, logprobs: bool) -> dict[str, Any]:
        lp = None
        if logprobs and token.HasField("logprob"):
            lp = {"tokens": [token.text], "token_logprobs": [token.logprob],
                  "top_logprobs": [self._top(token)] if token.top_logprobs else None, "text_offset": [len(self.text)]}
        self.text += token.text
        return {"text": token.text, "index": 0, "logprobs": lp, "finish_reason": None}

    def last_choice(self, finish: str) -> dict[str, Any]:
        return {"text": "", "index": 0, "logprobs": None, "finish_reason": finish}

    def add(self, token: pb.TokenDelta, logprobs: bool) -> None:
        if logprobs and token.HasField("logprob"):
            self.tokens.append(token.text)
            self.logprobs.append(token.logprob)
            self.offsets.append(len(self.text))
            self.tops.append(self._top(token))
        self.text += token.text

    def choice(self, finish: str, logprobs: bool) -> dict[str, Any]:
        lp = ({"tokens": self.tokens, "token_logprobs": self.logprobs,
               "top_logprobs": self.tops if any(self.tops) else None, "text_offset": self.offsets} if logprobs else None)
        return {"text": self.text, "index": 0, "logprobs": lp, "finish_reason": finish}


Shape = ChatShape | CompletionShape


class OpenAIChunks:
    """Writes an OpenAI stream: `data: {chunk}` lines, then `data: [DONE]`."""

    def __init__(self, request: web.Request, shape: Shape, opts: OpenAIOptions, completion_id: str,
                 model: str = "") -> None:
        self.request = request
        self.shape = shape
        self.opts = opts
        self.base = {"id": completion_id, "object": shape.chunk_object, "created": int(time.time()),
                     "model": model, "system_fingerprint": SYSTEM_FINGERPRINT}
        self.opened = False

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {**self.base, "choices": choices}
        if self.opts.include_usage:
            chunk["usage"] = None
        return chunk

    async def _start(self, sse: SSEWriter) -> None:
        if not self.opened:
            self.opened = True
            first = self.shape.first_choice()
            if first is not None:
                await sse.data(self._chunk([first]))

    async def started(self, sse: SSEWriter, started: pb.Started) -> None:
        self.base["model"] = started.model  # the resolved model, before any chunk is written
        note(self.request, model=started.model)

    async def queued(self, sse: SSEWriter, position: int) -> None:
        await sse.comment(f"queued at position {position}")

    async def token(self, sse: SSEWriter, token: pb.TokenDelta) -> None:
        await self._start(sse)
        choice = self.shape.token_choice(token, self.opts.logprobs)
        if token.text or choice["logprobs"] is not None:
            await sse.data(self._chunk([choice]))

    async def tool_call(self, sse: SSEWriter, delta: pb.ToolCallDelta) -> None:
        if isinstance(self.shape, ChatShape):
            await self._start(sse)
            await sse.data(self._chunk([self.shape.tool_call_choice(delta)]))

    async def finished(self, sse: SSEWriter, finished: pb.Finished) -> None:
        note(self.request, model=finished.model, finish=finish_reason_name(finished.reason),
             tokens=finished.usage.completion_tokens)
        error = _failure(finished)
        if error is not None:
            await self.failed(sse, error)
            return
        await self._start(sse)
        await sse.data(self._chunk([self.shape.last_choice(_OPENAI_FINISH[finish_reason_name(finished.reason)])]))
        if self.opts.include_usage:
            await sse.data({**self.base, "choices": [], "usage": _usage(finished.usage)})
        await sse.data("[DONE]")

    async def failed(self, sse: SSEWriter, error: ApiError) -> None:
        # The openai SDK raises APIError on a chunk with an "error" key; no [DONE] follows.
        await sse.data(error.body())


async def _collect(call: GenerateCall, shape: Shape, logprobs: bool) -> pb.Finished:
    """Reads a whole generation into `shape`; returns its `finished` message."""
    try:
        async for item in call:
            if item is HEARTBEAT:
                continue
            kind = item.WhichOneof("event")
            if kind == "token":
                shape.add(item.token, logprobs)
            elif kind == "finished":
                await call.drain()
                if isinstance(shape, ChatShape):
                    shape.calls = list(item.finished.tool_calls)
                return item.finished
        raise ApiError(502, "the model server ended the stream without a finish event",
                       type="server_error", code="upstream_error")
    finally:
        await call.close()


Parser = Callable[[dict[str, Any], str], tuple[pb.GenerateRequest, OpenAIOptions]]


async def _complete(request: web.Request, shape: Shape, parse: Parser) -> web.StreamResponse:
    request_id = request_id_for(request)
    note(request, id=request_id)
    grpc_request, opts = parse(await read_json_object(request), request_id)
    completion_id = shape.id_prefix + request_id
    upstream = request.app[UPSTREAM]
    headers = {"X-Request-Id": request_id}
    if opts.stream:
        chunks = OpenAIChunks(request, shape, opts, completion_id, opts.model)
        return await relay_stream(request, upstream.generate(grpc_request), chunks, headers=headers)
    finished = await _collect(upstream.generate(grpc_request), shape, opts.logprobs)
    note(request, model=finished.model, finish=finish_reason_name(finished.reason),
         tokens=finished.usage.completion_tokens)
    error = _failure(finished)
    if error is not None:
        raise error
    body = {
        "id": completion_id,
        "object": shape.object,
        "created": int(time.time()),
        "model": finished.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [shape.choice(_OPENAI_FINISH[finish_reason_name(finished.reason)], opts.logprobs)],
        "usage": _usage(finished.usage),
    }
    return web.json_response(body, headers=headers, dumps=_strict_json)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, ChatShape(), parse_chat)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, CompletionShape(), parse_completion)


def _model_object(m: pb.ModelInfo) -> dict[str, Any]:
    return {"id": m.id, "object": "model", "created": 0, "owned_by": "tokenwire"}


async def list_models(request: web.Request) -> web.Response:
    """The models, the default first: apps that pick the first entry (Open WebUI) pick it."""
    reply = await request.app[UPSTREAM].list_models()
    models = sorted(reply.models, key=lambda m: not m.is_default)
    return web.json_response({"object": "list", "data": [_model_object(m) for m in models]})


async def get_model(request: web.Request) -> web.Response:
    """A model by id or alias (an alias answers with the model it names)."""
    name = request.match_info["model_id"]
    reply = await request.app[UPSTREAM].list_models()
    for m in reply.models:
        if name == m.id or name in m.aliases:
            return web.json_response(_model_object(m))
    known = ", ".join(m.id for m in reply.models) or "none"
    raise ApiError(404, f"The model {name!r} does not exist; models: {known}", param="model",
                   code="model_not_found")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id:.+}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
