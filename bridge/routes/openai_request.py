"""Validates OpenAI chat/completions request bodies and turns them into GenerateRequests.

Accepted: everything tokenwire can honour, plus parameters whose given value asks for nothing
tokenwire lacks (`tools: []`, `response_format: {"type": "text"}`, `n: 1`, `echo: false`, ...).
Any other parameter or value is a 400 naming it, never silently ignored. Exceptions, accepted
and ignored because they change nothing about the output: `metadata`, `store: false`,
`service_tier`, `parallel_tool_calls`. `user` is passed on to the server, which shares its
slots fairly between users.

Logprobs: the engine reports the logprob of the token it chose and no alternatives, so chat
takes `logprobs: true` with `top_logprobs` absent or 0, and completions take `logprobs: 0`
(the chosen tokens' logprobs; `top_logprobs` is null). Larger values are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenwire.bridge.errors import invalid_param
from tokenwire.bridge.fields import IGNORE_EOS, MESSAGE, MODEL, NUM, SAMPLING, STOP, USER
from tokenwire.bridge.params import Params
from tokenwire.bridge.proto_request import MAX_UINT32, chat_messages, generate_request
from tokenwire.v1 import inference_pb2 as pb

# OpenAI's documented default for the legacy completions endpoint.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

# The request fields of each endpoint, with their schemas (the OpenAPI document publishes these).
_COMMON = {
    "model": MODEL,
    "stream": {"type": "boolean", "default": False},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "temperature": {**NUM, "minimum": 0, "maximum": 2, "default": 1},
    "top_p": {**NUM, "exclusiveMinimum": 0, "maximum": 1},
    "stop": {**STOP},
    "seed": SAMPLING["seed"],
    "n": {"const": 1, "description": "Only 1 is supported."},
    "presence_penalty": SAMPLING["presence_penalty"],
    "frequency_penalty": SAMPLING["frequency_penalty"],
    "logit_bias": {"type": "object", "maxProperties": 0, "description": "Only an empty object is supported."},
    "user": USER,
    "top_k": {**SAMPLING["top_k"], "description": "tokenwire extra. 0 = off."},
    "min_p": {**SAMPLING["min_p"], "description": "tokenwire extra."},
    "repetition_penalty": {**SAMPLING["repetition_penalty"], "description": "tokenwire extra."},
    "max_tokens": {"type": "integer", "minimum": 1},
    "ignore_eos": IGNORE_EOS,
}
_CHAT_ONLY = {
    "messages": {"type": "array", "minItems": 1, "items": MESSAGE},
    "max_completion_tokens": {"type": "integer", "minimum": 1, "description": "Preferred over max_tokens."},
    "logprobs": {"type": "boolean", "description": "The chosen token's logprob; no alternatives."},
    "top_logprobs": {"const": 0, "description": "Only 0: the engine reports no alternatives."},
    "response_format": {"type": "object", "properties": {"type": {"const": "text"}}},
    "tools": {"type": "array", "maxItems": 0, "description": "No tool calling: only [] is accepted."},
    "tool_choice": {"const": "none"},
    "parallel_tool_calls": {"type": "boolean", "description": "Accepted and ignored."},
    "functions": {"type": "array", "maxItems": 0},
    "function_call": {"const": "none"},
    "store": {"const": False},
    "metadata": {"type": "object", "description": "Accepted and ignored."},
    "service_tier": {"type": "string", "description": "Accepted and ignored."},
    "modalities": {"type": "array", "items": {"const": "text"}},
}
_COMPLETION_ONLY = {
    "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1,
                                                "maxItems": 1}]},
    "max_tokens": {"type": "integer", "minimum": 1, "default": COMPLETIONS_DEFAULT_MAX_TOKENS},
    "logprobs": {"const": 0, "description": "0: the chosen tokens' logprobs (top_logprobs is null)."},
    "suffix": {"const": ""},
    "echo": {"const": False},
    "best_of": {"const": 1},
}

CHAT_FIELDS: dict[str, Any] = {**_COMMON, **_CHAT_ONLY}
COMPLETION_FIELDS: dict[str, Any] = {**_COMMON, **_COMPLETION_ONLY}


@dataclass
class OpenAIOptions:
    """What shapes the HTTP answer rather than the generation."""

    model: str
    stream: bool
    include_usage: bool
    logprobs: bool
    ignore_eos: bool
    user: str | None


def _require(p: Params, name: str, ok: bool, allowed: str) -> None:
    if p.given(name) and not ok:
        raise invalid_param(name, f"{name}: only {allowed} is supported by tokenwire, got {_short(p.raw(name))}",
                            code="unsupported_value")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_neutral_chat(p: Params) -> None:
    """Parameters accepted only with a value that asks for nothing tokenwire lacks."""
    fmt = p.raw("response_format")
    _require(p, "response_format", isinstance(fmt, dict) and fmt.get("type") == "text", '{"type": "text"}')
    _require(p, "tools", p.raw("tools") == [], "an empty list (no tool calling)")
    _require(p, "functions", p.raw("functions") == [], "an empty list (no function calling)")
    _require(p, "tool_choice", p.raw("tool_choice") == "none", '"none"')
    _require(p, "function_call", p.raw("function_call") == "none", '"none"')
    _require(p, "store", p.raw("store") is False, "false (the bridge stores nothing)")
    _require(p, "modalities", p.raw("modalities") == ["text"], '["text"]')
    p.boolean("parallel_tool_calls")


def _common(p: Params) -> tuple[dict[str, Any], list[str], OpenAIOptions]:
    """Checks the parameters both endpoints share; returns sampling values, stop strings, options."""
    _require(p, "n", p.integer("n") == 1, "n=1")
    _require(p, "logit_bias", p.raw("logit_bias") == {}, "an empty logit_bias")
    stream = bool(p.boolean("stream"))
    options = p.raw("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid_param("stream_options", "stream_options must be an object")
    include_usage = (options or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise invalid_param("stream_options.include_usage", "stream_options.include_usage must be true or false")
    sampling = {
        "temperature": p.number("temperature", 0.0, 2.0),
        "top_p": p.number("top_p", 0.0, 1.0),
        "presence_penalty": p.number("presence_penalty", -2.0, 2.0),
        "frequency_penalty": p.number("frequency_penalty", -2.0, 2.0),
        "seed": p.seed(),
        "top_k": p.integer("top_k", 0, MAX_UINT32),
        "min_p": p.number("min_p"),
        "repetition_penalty": p.number("repetition_penalty"),
    }
    opts = OpenAIOptions(model=p.string("model") or "", stream=stream, include_usage=bool(include_usage),
                         logprobs=False, ignore_eos=bool(p.boolean("ignore_eos")), user=p.string("user"))
    return sampling, p.stop(), opts


def parse_chat(body: dict[str, Any], request_id: str) -> tuple[pb.GenerateRequest, OpenAIOptions]:
    p = Params(body)
    p.check_known(CHAT_FIELDS)
    _check_neutral_chat(p)
    sampling, stop, opts = _common(p)
    opts.logprobs = bool(p.boolean("logprobs"))
    top = p.integer("top_logprobs", 0, 20)
    if top:
        raise invalid_param("top_logprobs", "top_logprobs: only 0 is supported; tokenwire reports the chosen "
                            "token's logprob, not alternatives", code="unsupported_value")
    if not p.given("messages"):
        raise invalid_param("messages", "messages is required")
    # Both are checked (a bad value is a 400 whichever wins); max_completion_tokens wins.
    legacy = p.integer("max_tokens", 1, MAX_UINT32)
    max_tokens = p.integer("max_completion_tokens", 1, MAX_UINT32)
    if max_tokens is None:
        max_tokens = legacy
    request = generate_request(
        request_id=request_id, model=opts.model, messages=chat_messages(p.raw("messages")),
        max_tokens=max_tokens, stop=stop, logprobs=opts.logprobs, ignore_eos=opts.ignore_eos, user=opts.user,
        sampling=sampling,
    )
    return request, opts


def parse_completion(body: dict[str, Any], request_id: str) -> tuple[pb.GenerateRequest, OpenAIOptions]:
    p = Params(body)
    p.check_known(COMPLETION_FIELDS)
    _require(p, "echo", p.raw("echo") is False, "echo=false")
    _require(p, "suffix", p.raw("suffix") == "", "an empty suffix")
    _require(p, "best_of", p.integer("best_of") == 1, "best_of=1")
    sampling, stop, opts = _common(p)
    logprobs = p.integer("logprobs", 0)
    if logprobs:
        raise invalid_param("logprobs", "logprobs: only 0 is supported (the chosen tokens' logprobs); "
                            "tokenwire does not report alternatives", code="unsupported_value")
    opts.logprobs = logprobs == 0
    prompt = p.raw("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid_param("prompt", "prompt must be a string (or an array holding one string); "
                            "token-id prompts and batches are not supported")
    max_tokens = p.integer("max_tokens", 1, MAX_UINT32)
    request = generate_request(
        request_id=request_id, model=opts.model, prompt=prompt,
        max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        stop=stop, logprobs=opts.logprobs, ignore_eos=opts.ignore_eos, user=opts.user,
        sampling=sampling,
    )
    return request, opts

