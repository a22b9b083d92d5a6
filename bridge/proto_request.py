"""Builds GenerateRequest messages from already-typed values, plus the pieces both APIs share."""

from __future__ import annotations

import re
import uuid
from typing import Any

from aiohttp import web

from tokenwire.enums import enum_name
from tokenwire.v1 import inference_pb2 as pb

from .errors import ApiError, invalid_param
from .image_fields import check_total, image_from_text
from .params import Params, json_type
from .tool_fields import openai_tool_calls

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# OpenAI's "developer" role is its newer name for "system".
_ROLE_ALIASES = {"developer": "system"}
_UNSUPPORTED_ROLES = {"tool": "tool messages need tool calling, which this endpoint does not do (the OpenAI "
                              "endpoints do)",
                      "function": "function messages need function calling, which tokenwire does not support"}
MAX_UINT32 = (1 << 32) - 1


def stream_api_sampling(p: Params) -> dict[str, Any]:
    """The sampling fields of the bridge's own endpoints (/api/generate, /api/chats/{id}/messages),
    range-checked by the server, which knows them (the OpenAI endpoints apply OpenAI's bounds)."""
    return {
        "temperature": p.number("temperature"),
        "top_p": p.number("top_p"),
        "top_k": p.integer("top_k", 0, MAX_UINT32),
        "min_p": p.number("min_p"),
        "repetition_penalty": p.number("repetition_penalty"),
        "presence_penalty": p.number("presence_penalty"),
        "frequency_penalty": p.number("frequency_penalty"),
        "seed": p.seed(),
    }


def request_id_for(request: web.Request) -> str:
    """The caller's X-Request-Id when it is a sane token, else a fresh one; the server logs it."""
    given = request.headers.get("X-Request-Id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex[:16]


def chat_messages(value: Any, param: str = "messages", tools: bool = False) -> list[pb.ChatMessage]:
    """Messages as OpenAI sends them: content is a string, null, or a list of text parts. With
    `tools` (the OpenAI endpoint) assistant messages may hold `tool_calls` and "tool" messages
    answer them."""
    if not isinstance(value, list) or not value:
        raise invalid_param(param, f"{param} must be a non-empty array of {{role, content}} objects")
    out = []
    for i, message in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(message, dict):
            raise invalid_param(where, f"{where} must be an object, got {json_type(message)}")
        role = message.get("role")
        if not isinstance(role, str):
            raise invalid_param(f"{where}.role", f"{where}.role must be a string")
        if role in _UNSUPPORTED_ROLES and not (tools and role == "tool"):
            raise invalid_param(f"{where}.role", f"{where}.role {role!r}: {_UNSUPPORTED_ROLES[role]}")
        if message.get("function_call"):
            raise invalid_param(f"{where}.function_call", f"{where}.function_call: the legacy function_call is "
                                "not supported; send tool_calls")
        text, images = _content_parts(message.get("content"), f"{where}.content")
        converted = pb.ChatMessage(role=_ROLE_ALIASES.get(role, role), content=text, images=images)
        if message.get("tool_calls"):
            if not tools:
                raise invalid_param(f"{where}.tool_calls", f"{where}.tool_calls: tool calling is not supported here")
            if role != "assistant":
                raise invalid_param(f"{where}.tool_calls", f"{where}.tool_calls: only assistant messages hold calls")
            converted.tool_calls.extend(openai_tool_calls(message["tool_calls"], f"{where}.tool_calls"))
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise invalid_param(f"{where}.tool_call_id", f"{where}.tool_call_id: a tool message names the call "
                                    "it answers")
            converted.tool_call_id = call_id
        name = message.get("name")
        if role == "tool" and isinstance(name, str):
            converted.name = name
        out.append(converted)
    check_total(out, param)
    return out


def _content_parts(content: Any, where: str) -> tuple[str, list[pb.Image]]:
    """A message's content: a string, null, or a list of text and image_url parts."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if isinstance(content, list):
        texts, images = [], []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else json_type(part)
            if kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                images.append(image_from_text(url, f"{where}[{j}].image_url.url", data_url_only=True))
                continue
            if kind != "text" or not isinstance(part.get("text"), str):
                raise invalid_param(f"{where}[{j}]", f"{where}[{j}]: only text and image_url parts are supported, "
                                                     f"got {kind!r}")
            texts.append(part["text"])
        return "".join(texts), images
    raise invalid_param(where, f"{where} must be a string or an array of text parts, got {json_type(content)}")


def generate_request(
    *,
    request_id: str,
    model: str | None,
    prompt: str | None = None,
    messages: list[pb.ChatMessage] | None = None,
    max_tokens: int | None = None,
    stop: list[str] | None = None,
    logprobs: bool = False,
    ignore_eos: bool = False,
    user: str | None = None,
    sampling: dict[str, Any] | None = None,
) -> pb.GenerateRequest:
    """Unset (None) sampling values stay unset, so the server's defaults apply."""
    if (prompt is None) == (messages is None):
        raise ApiError(400, "set exactly one of prompt and messages", param="prompt")
    params = pb.SamplingParams()
    for name, value in (sampling or {}).items():
        if name == "logit_bias":
            params.logit_bias.update(value or {})
        elif value is not None:
            setattr(params, name, value)
    request = pb.GenerateRequest(
        model=model or "",
        sampling=params,
        max_tokens=max_tokens or 0,
        stop=stop or [],
        include_logprobs=logprobs,
        ignore_eos=ignore_eos,
        user=user or "",
        request_id=request_id,
    )
    if messages is not None:
        request.messages.extend(messages)
    else:
        request.prompt = prompt or ""
    return request


def finish_reason_name(reason: int) -> str:
    """"stop", "length", "cancelled", "error", "tool_calls" (or "unspecified")."""
    return enum_name(pb.FinishReason, reason)
