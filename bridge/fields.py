"""JSON Schema fragments of the request fields the bridge's endpoints share, and the reads that
enforce them.

Each route declares its request fields once, as a dict of field name -> schema built from these
(routes/openai_request.py, routes/stream.py, routes/chats.py): the handler accepts exactly those
names (Params.check_known) and the OpenAPI document publishes those schemas, so the two cannot
drift apart. Where a bound matters to the handler too (sampling ranges, stop strings), the reads
below take it from the same schema, so what the document calls valid is what is accepted
(tests/bridge/test_fuzz_http.py holds both sides to that).

Sampling parameters are float32 in the proto: a JSON number inside the documented range is sent
as the float32 nearest it that is still inside the range (5e-324 for top_p would otherwise round
to 0, which the server refuses, and 1e300 for temperature to infinity).
"""

from __future__ import annotations

import math
import struct
from typing import Any

from .errors import invalid_param
from .params import Params

MAX_UINT32 = (1 << 32) - 1
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TRUE_MIN: float = struct.unpack("<f", struct.pack("<I", 1))[0]  # the smallest positive float32
# The server's limits (engine/requests.py): 16 stop strings of 1 to 256 bytes. A JSON Schema counts
# characters, not bytes: 64 characters are at most 256 bytes of UTF-8, whatever they are.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 64

NUM = {"type": "number"}
INT = {"type": "integer", "minimum": 0}
UINT32 = {"type": "integer", "minimum": 0, "maximum": MAX_UINT32}
MAX_TOKENS: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": MAX_UINT32,
                              "description": "At most what the model's context window leaves after the prompt "
                                             "(else 400, code context_length_exceeded)."}
_STOP_STRING = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
STOP = {"oneOf": [_STOP_STRING, {"type": "array", "items": _STOP_STRING, "maxItems": MAX_STOP_STRINGS}],
        "description": "Generation stops before any of these strings; they never appear in the output."}
SAMPLING = {
    "temperature": {**NUM, "minimum": 0, "maximum": FLOAT32_MAX, "description": "0 = greedy. Default 1.0."},
    "top_p": {**NUM, "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {**UINT32, "description": "0 = off."},
    "min_p": {**NUM, "minimum": 0, "exclusiveMaximum": 1},
    "repetition_penalty": {**NUM, "exclusiveMinimum": 0, "maximum": 10, "description": "1.0 = off."},
    "presence_penalty": {**NUM, "minimum": -2, "maximum": 2},
    "frequency_penalty": {**NUM, "minimum": -2, "maximum": 2},
    "seed": {"type": "integer", "description": "Taken modulo 2^64."},
}
_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
_IMAGE_PART = {"type": "object", "required": ["type", "image_url"], "properties": {
    "type": {"const": "image_url"},
    "image_url": {"type": "object", "required": ["url"], "properties": {
        "url": {"type": "string", "pattern": "^data:image/", "description": (
            "A data: URL of a PNG, JPEG, WebP, GIF or BMP image (at most 3 MiB). Remote URLs are refused: the server "
            "fetches nothing. The server reads the image's text (OCR) and gives it to the model; it understands "
            "nothing else of an image.")},
        "detail": {"description": "Accepted and ignored."}}}}}
_PART = {"oneOf": [_TEXT_PART, _IMAGE_PART]}
# What the handlers take as "nothing" for a field tokenwire cannot honour (bridge/proto_request.py
# refuses any other value): null, false, 0, "", [] or {}.
_EMPTY = {"anyOf": [{"type": "null"}, {"const": False}, {"const": 0}, {"const": ""},
                    {"type": "array", "maxItems": 0}, {"type": "object", "maxProperties": 0}]}
MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant"], "description": "developer = system."},
        "content": {"oneOf": [{"type": "string"}, {"type": "null"}, {"type": "array", "items": _PART}]},
        "name": {"description": "Accepted and ignored (any value)."},
        "tool_calls": {**_EMPTY, "description": "No tool calling: only an empty value."},
        "function_call": {**_EMPTY, "description": "No function calling: only an empty value."},
    },
}
# A prompt needs some text: at least one message whose content (its parts joined) is not empty.
_SAYS_SOMETHING = {"type": "object", "required": ["content"], "properties": {"content": {"anyOf": [
    {"type": "string", "minLength": 1},
    {"type": "array", "contains": {"anyOf": [
        {"type": "object", "required": ["text"], "properties": {"text": {"type": "string", "minLength": 1}}},
        {"type": "object", "required": ["type"], "properties": {"type": {"const": "image_url"}}}]}}]}}}
MESSAGES: dict[str, Any] = {"type": "array", "minItems": 1, "items": MESSAGE, "contains": _SAYS_SOMETHING,
                            "description": "At least one message has non-empty content (text or an image)."}
MODEL: dict[str, Any] = {"type": "string", "description": "Model id or alias; empty or absent = the server's default."}
USER: dict[str, Any] = {"type": "string", "description": "Passed to the server: requests are admitted round-robin "
                                                         "across users."}
IGNORE_EOS: dict[str, Any] = {"type": "boolean", "description": "tokenwire extra: generate past end-of-sequence "
                                                                "until max_tokens (benchmarks)."}
KEEP_ALIVE: dict[str, Any] = {"type": "number", "description": "Seconds the model stays loaded after this request: "
                              "0 unloads it at once, negative keeps it; absent: the server's --keep-alive."}


def number(p: Params, name: str, schema: dict[str, Any]) -> float | None:
    """The field as a float32-exact float within the schema's bounds; a 400 outside them."""
    value = p.number(name)
    if value is None:
        return None
    low, high = schema.get("minimum"), schema.get("maximum")
    xlow, xhigh = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if (low is not None and value < low or xlow is not None and value <= xlow
            or high is not None and value > high or xhigh is not None and value >= xhigh):
        lo = f"[{low:g}" if low is not None else f"({xlow:g}" if xlow is not None else "(-inf"
        hi = f"{high:g}]" if high is not None else f"{xhigh:g})" if xhigh is not None else "inf)"
        raise invalid_param(name, f"{name} must be in {lo}, {hi}, got {value!r}")
    single = _float32(value)
    # Rounding is monotonic, so it can only cross an exclusive bound, or overflow past the largest float32.
    if xlow is not None and single <= xlow or low is not None and single < low:
        single = _next_float32(single, up=True)
    if xhigh is not None and single >= xhigh or high is not None and single > high:
        single = _next_float32(single, up=False)
    return single


def sampling(p: Params, schemas: dict[str, dict[str, Any]]) -> dict[str, float | int | None]:
    """The sampling fields (SAMPLING's names), each checked against its schema in `schemas`."""
    values: dict[str, float | int | None] = {
        name: number(p, name, schemas[name])
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")}
    top_k = schemas["top_k"]
    values["top_k"] = p.integer("top_k", top_k.get("minimum"), top_k.get("maximum"))
    values["seed"] = p.seed()
    return values


def stop_strings(p: Params, name: str = "stop") -> list[str]:
    """`stop` as STOP documents it: up to MAX_STOP_STRINGS strings of 1 to MAX_STOP_CHARS characters."""
    stops = p.stop(name)
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid_param(name, f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    for s in stops:
        if not s:
            raise invalid_param(name, "stop strings must not be empty")
        if len(s) > MAX_STOP_CHARS:
            raise invalid_param(name, f"stop strings are at most {MAX_STOP_CHARS} characters, got {len(s)}")
    return stops


def _float32(value: float) -> float:
    try:
        return struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:  # beyond the largest float32 (a finite double): that largest one
        return math.copysign(FLOAT32_MAX, value)


def _next_float32(value: float, *, up: bool) -> float:
    """The float32 next to `value` (itself a float32) towards +inf (`up`) or -inf."""
    if value == 0:
        return FLOAT32_TRUE_MIN if up else -FLOAT32_TRUE_MIN
    (bits,) = struct.unpack("<I", struct.pack("<f", value))
    bits += 1 if (value > 0) == up else -1
    return struct.unpack("<f", struct.pack("<I", bits))[0]
