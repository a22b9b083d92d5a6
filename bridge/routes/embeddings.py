"""POST /v1/embeddings in OpenAI's shape, over the server's Embed RPC."""

from __future__ import annotations

import base64
from typing import Any

import grpc
import numpy as np
from aiohttp import web

from tokenwire.bridge.credentials import grpc_metadata
from tokenwire.bridge.errors import ApiError, invalid_param
from tokenwire.bridge.openapi_parts import _errors, _json
from tokenwire.bridge.params import Params, json_type
from tokenwire.bridge.proto_request import request_id_for
from tokenwire.bridge.relay import note
from tokenwire.bridge.request_body import read_json_object
from tokenwire.bridge.upstream import UPSTREAM
from tokenwire.v1 import inference_pb2 as pb

FIELDS = {"input", "model", "encoding_format", "dimensions", "user"}
TIMEOUT_S = 300


def texts_of(value: Any, param: str = "input") -> list[str]:
    """A string or an array of strings (OpenAI also takes token ids: refused, naming why)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, list) and value and all(isinstance(v, int | list) for v in value):
        raise invalid_param(param, f"{param} as token ids is not supported: send the text (each model has its "
                                   "own tokenizer)")
    raise invalid_param(param, f"{param} must be a string or a non-empty array of strings, got {json_type(value)}")


async def embed(request: web.Request, texts: list[str], model: str, dimensions: int = 0,
                keep_alive: float | None = None) -> pb.EmbedResponse:
    ask = pb.EmbedRequest(model=model, input=texts, dimensions=dimensions)
    if keep_alive is not None:
        ask.keep_alive_s = keep_alive
    upstream = request.app[UPSTREAM]
    try:
        return await upstream.stub.Embed(ask, timeout=TIMEOUT_S, metadata=grpc_metadata())
    except grpc.aio.AioRpcError as exc:
        raise upstream.error(exc) from exc


async def embeddings(request: web.Request) -> web.Response:
    note(request, id=request_id_for(request))
    p = Params(await read_json_object(request))
    p.check_known(FIELDS)
    if not p.given("input"):
        raise invalid_param("input", "input is required")
    if not p.given("model"):
        raise invalid_param("model", "model is required (an embedding model from GET /v1/models)")
    p.string("user")  # accepted (the server has no per-user embeddings), but a string like OpenAI's
    fmt = p.string("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise invalid_param("encoding_format", f"encoding_format must be float or base64, got {fmt!r}")
    texts = texts_of(p.raw("input"))
    reply = await embed(request, texts, p.string("model") or "", p.integer("dimensions", 1, 1 << 16) or 0)
    note(request, model=reply.model, tokens=reply.prompt_tokens)

    def encoded(values: Any) -> Any:
        if fmt == "float":
            return list(values)
        return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()

    data = [{"object": "embedding", "index": i, "embedding": encoded(e.values)} for i, e in enumerate(reply.embeddings)]
    if len(data) != len(texts):
        raise ApiError(502, "the model server answered a different number of embeddings", type="server_error",
                       code="upstream_error")
    return web.json_response({"object": "list", "data": data, "model": reply.model,
                              "usage": {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens}})


_TEXT = {"type": "string", "minLength": 1}
_OPTIONAL = {
    "encoding_format": {"enum": ["float", "base64"], "description": "base64: little-endian float32 bytes."},
    "dimensions": {"type": "integer", "minimum": 1, "maximum": 384,
                   "description": "At most the model's own size (all-MiniLM-L6-v2: 384); fewer keeps the first "
                                  "ones, normalised again."},
    "user": {"type": "string", "description": "Accepted; changes nothing."},
}
REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["input", "model"], "properties": {
        "input": {"anyOf": [_TEXT, {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": 2048}],
                  "description": "A text or texts (token-id arrays are refused: send text)."},
        "model": {"type": "string", "description": "An embedding model's id or alias (GET /v1/models)."},
        # As every handler reads them (bridge/params.py), null in an optional field means "not given".
        **{name: {"anyOf": [schema, {"type": "null"}]} for name, schema in _OPTIONAL.items()},
    }}
RESPONSE_SCHEMA: dict[str, Any] = {"type": "object", "required": ["object", "data", "model", "usage"], "properties": {
    "object": {"const": "list"}, "model": {"type": "string"},
    "data": {"type": "array", "items": {"type": "object", "required": ["object", "index", "embedding"], "properties": {
        "object": {"const": "embedding"}, "index": {"type": "integer"},
        "embedding": {"anyOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}]}}}},
    "usage": {"type": "object", "properties": {"prompt_tokens": {"type": "integer"},
                                               "total_tokens": {"type": "integer"}}}}}


def add_embedding_docs(document: dict[str, Any]) -> None:
    """/v1/embeddings in the bridge's OpenAPI document."""
    document["paths"]["/v1/embeddings"] = {"post": {
        "summary": "OpenAI: embeddings of a text or texts, from an embedding model.",
        "requestBody": {"required": True, "content": {"application/json": {"schema": REQUEST_SCHEMA}}},
        "responses": {"200": _json(RESPONSE_SCHEMA), **_errors(400, 401, 404, 413, 415, 429, 503)}}}


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/embeddings", embeddings)
