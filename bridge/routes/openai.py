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
from tokenwire.bridge.tool_fields import tool_call_json
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


class ChatShape:
    """Where chat completions put text and logprobs."""

    id_prefix = "chatcmpl-"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, index: int = 0) -> None:
        self.index = index  # which choice (n > 1)
        self.text = ""
        self.reasoning = ""  # a reasoning model's thinking
        self.entries: list[dict[str, Any]] = []
        self.calls: list[pb.ToolCall] = []

    def tool_call_choice(self, delta: pb.ToolCallDelta) -> dict[str, Any]:
        """A streamed call as OpenAI streams it: its id, type and name first, then its arguments."""
        if delta.name:
            call = {"index": delta.index, "id": delta.id, "type": "function",
                    "function": {"name": delta.name, "arguments": delta.arguments}}
        else:
            call = {"index": delta.index, "function": {"arguments": delta.arguments}}
        return {"index": self.index, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None}

    @staticmethod
    def _entry(token: pb.TokenDelta) -> dict[str, Any]:
        return {"token": token.text, "logprob": token.logprob, "bytes": list(token.text.encode()),
                "top_logprobs": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode())}
                                 for t in token.top_logprobs]}

    def first_choice(self) -> dict[str, Any] | None:
        return {"index": self.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def token_choice(self, token: pb.TokenDelta, logprobs: bool) -> dict[str, Any]:
        lp = {"content": [self._entry(token)], "refusal": None} if logprobs and token.HasField("logprob") else None
        delta: dict[str, Any] = {"content": token.text}
        if token.reasoning:
            delta = {"reasoning_content": token.reasoning, **({"content": token.text} if token.text else {})}
        return {"index": self.index, "delta": delta, "logprobs": lp, "finish_reason": None}

    def last_choice(self, finish: str) -> dict[str, Any]:
        return {"index": self.index, "delta": {}, "logprobs": None, "finish_reason": finish}

    def add(self, token: pb.TokenDelta, logprobs: bool) -> None:
        self.text += token.text
        self.reasoning += token.reasoning
        if logprobs and token.HasField("logprob"):
            self.entries.append(self._entry(token))

    def choice(self, finish: str, logprobs: bool) -> dict[str, Any]:
        lp = {"content": self.entries, "refusal": None} if logprobs else None
        message: dict[str, Any] = {"role": "assistant", "content": self.text, "refusal": None}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        if self.calls:
            message["content"] = self.text.strip() or None
            message["tool_calls"] = [tool_call_json(c) for c in self.calls]
        return {"index": self.index, "message": message, "logprobs": lp, "finish_reason": finish}


class CompletionShape:
    """Where legacy completions put text and logprobs (`text_offset` counts characters)."""

    id_prefix = "cmpl-"
    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, index: int = 0) -> None:
        self.index = index  # which choice (n > 1)
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
        return {"text": token.text, "index": self.index, "logprobs": lp, "finish_reason": None}

    def last_choice(self, finish: str) -> dict[str, Any]:
        return {"text": "", "index": self.index, "logprobs": None, "finish_reason": finish}

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
        return {"text": self.text, "index": self.index, "logprobs": lp, "finish_reason": finish}


Shape = ChatShape | CompletionShape


def _usage_of(finished: list[pb.Finished]) -> dict[str, Any]:
    """One usage for all choices: the prompt once, every choice's tokens."""
    u = finished[0].usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": sum(f.usage.completion_tokens for f in finished),
            "total_tokens": u.prompt_tokens + sum(f.usage.completion_tokens for f in finished),
            "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}}


class OpenAIChunks:
    """Writes an OpenAI stream: `data: {chunk}` lines, then `data: [DONE]`."""

    def __init__(self, request: web.Request, shapes: list[Shape], opts: OpenAIOptions, completion_id: str,
                 model: str = "") -> None:
        self.request = request
        self.shapes = shapes  # one per choice
        self.opts = opts
        self.done: list[pb.Finished] = []
        self.base = {"id": completion_id, "object": shapes[0].chunk_object, "created": int(time.time()),
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
            for shape in self.shapes:
                first = shape.first_choice()
                if first is not None:
                    await sse.data(self._chunk([first]))

    async def started(self, sse: SSEWriter, started: pb.Started) -> None:
        self.base["model"] = started.model  # the resolved model, before any chunk is written
        note(self.request, model=started.model)

    async def queued(self, sse: SSEWriter, position: int) -> None:
        await sse.comment(f"queued at position {position}")

    async def token(self, sse: SSEWriter, token: pb.TokenDelta) -> None:
        await self._start(sse)
        choice = self.shapes[token.choice].token_choice(token, self.opts.logprobs)
        if token.text or token.reasoning or choice["logprobs"] is not None:
            await sse.data(self._chunk([choice]))

    async def tool_call(self, sse: SSEWriter, delta: pb.ToolCallDelta) -> None:
        shape = self.shapes[delta.choice]
        if isinstance(shape, ChatShape):
            await self._start(sse)
            await sse.data(self._chunk([shape.tool_call_choice(delta)]))

    async def finished(self, sse: SSEWriter, finished: pb.Finished) -> bool:
        """Ends a choice; True once the stream is over (every choice ended, or one failed)."""
        self.done.append(finished)
        error = _failure(finished)
        if error is not None:
            note(self.request, model=finished.model, finish=finish_reason_name(finished.reason))
            await self.failed(sse, error)
            return True
        await self._start(sse)
        shape = self.shapes[finished.choice]
        await sse.data(self._chunk([shape.last_choice(_OPENAI_FINISH[finish_reason_name(finished.reason)])]))
        if len(self.done) < len(self.shapes):
            return False
        note(self.request, model=finished.model, finish=finish_reason_name(finished.reason),
             tokens=sum(f.usage.completion_tokens for f in self.done))
        if self.opts.include_usage:
            await sse.data({**self.base, "choices": [], "usage": _usage_of(self.done)})
        await sse.data("[DONE]")
        return True

    async def failed(self, sse: SSEWriter, error: ApiError) -> None:
        # The openai SDK raises APIError on a chunk with an "error" key; no [DONE] follows.
        await sse.data(error.body())


async def _collect(call: GenerateCall, shapes: list[Shape], logprobs: bool) -> list[pb.Finished]:
    """Reads a whole generation into `shapes` (one per choice); returns each choice's `finished`
    message, in choice order (at once when one failed: its error is the answer)."""
    done: dict[int, pb.Finished] = {}
    try:
        async for item in call:
            if item is HEARTBEAT:
                continue
            kind = item.WhichOneof("event")
            if kind == "token":
                shapes[item.token.choice].add(item.token, logprobs)
            elif kind == "finished":
                finished = item.finished
                shape = shapes[finished.choice]
                if isinstance(shape, ChatShape):
                    shape.calls = list(finished.tool_calls)
                done[finished.choice] = finished
                if _failure(finished) is not None:
                    return [finished]
                if len(done) == len(shapes):
                    await call.drain()
                    return [done[i] for i in range(len(shapes))]
        raise ApiError(502, "the model server ended the stream without a finish event",
                       type="server_error", code="upstream_error")
    finally:
        await call.close()


Parser = Callable[[dict[str, Any], str], tuple[pb.GenerateRequest, OpenAIOptions]]


async def _complete(request: web.Request, make: type[ChatShape] | type[CompletionShape],
                    parse: Parser) -> web.StreamResponse:
    request_id = request_id_for(request)
    note(request, id=request_id)
    grpc_request, opts = parse(await read_json_object(request), request_id)
    shapes: list[Shape] = [make(i) for i in range(max(grpc_request.n, 1))]
    completion_id = make.id_prefix + request_id
    upstream = request.app[UPSTREAM]
    headers = {"X-Request-Id": request_id}
    if opts.stream:
        chunks = OpenAIChunks(request, shapes, opts, completion_id, opts.model)
        return await relay_stream(request, upstream.generate(grpc_request), chunks, headers=headers)
    finished = await _collect(upstream.generate(grpc_request), shapes, opts.logprobs)
    last = finished[-1]
    note(request, model=last.model, finish=finish_reason_name(last.reason),
         tokens=sum(f.usage.completion_tokens for f in finished))
    error = _failure(last)
    if error is not None:
        raise error
    body = {
        "id": completion_id,
        "object": make.object,
        "created": int(time.time()),
        "model": last.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [shape.choice(_OPENAI_FINISH[finish_reason_name(f.reason)], opts.logprobs)
                    for shape, f in zip(shapes, finished, strict=True)],
        "usage": _usage_of(finished),
    }
    return web.json_response(body, headers=headers, dumps=_strict_json)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, ChatShape, parse_chat)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, CompletionShape, parse_completion)


def _model_object(m: pb.ModelInfo) -> dict[str, Any]:
    # kind (tokenwire's): generate, embedding, speech or ocr: which endpoints the model serves.
    return {"id": m.id, "object": "model", "created": 0, "owned_by": "tokenwire", "kind": m.kind or "generate"}


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
