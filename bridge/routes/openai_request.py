"""Validates OpenAI chat/completions request bodies and turns them into GenerateRequests.

Accepted: everything tokenwire can honour, plus parameters whose given value asks for nothing
tokenwire lacks (`n: 1`, `echo: false`, ...). `response_format` (text, json_object,
json_schema, and the extensions regex, choice, grammar) constrains the output token by token.
`tools`, `tool_choice` and `parallel_tool_calls` (and the legacy `functions`/`function_call`)
go to the server, which shows the tools to the model and parses its calls. Any other parameter
or value is a 400 naming it, never silently ignored. Exceptions, accepted and ignored because
they change nothing about the output: `metadata`, `store: false`, `service_tier`. `user` is
passed on to the server, which shares its slots fairly between users.

Logprobs: chat takes `logprobs: true` and `top_logprobs` 0 to 20 (the likeliest alternatives at
each position); completions take `logprobs` 0 to 5 (0: the chosen tokens' logprobs and
`top_logprobs` null; N: the N likeliest as {token: logprob}). `logit_bias` maps token ids (as
strings) to a bias in [-100, 100] added to their logits.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tokenwire.bridge.errors import invalid_param
from tokenwire.bridge.fields import (
    IGNORE_EOS,
    MAX_TOKENS,
    MAX_UINT32,
    MESSAGES,
    MODEL,
    NUM,
    SAMPLING,
    STOP,
    USER,
    sampling,
    stop_strings,
)
from tokenwire.bridge.params import Params, json_type
from tokenwire.bridge.proto_request import chat_messages, generate_request
from tokenwire.bridge.tool_fields import (
    FUNCTION,
    MAX_TOOLS,
    PARALLEL_TOOL_CALLS,
    TOOL_CALL,
    TOOL_CHOICE,
    TOOLS,
    apply_tools,
    function_tool,
    set_tool_choice,
)
from tokenwire.v1 import inference_pb2 as pb

# OpenAI's documented default for the legacy completions endpoint.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5  # the legacy endpoint's own limit
MAX_CHOICES = 8

# Structured outputs: OpenAI's text / json_object / json_schema, and tokenwire's extensions (as vLLM's
# structured outputs and llama.cpp's grammar): regex, choice, and a Lark or GBNF grammar.
RESPONSE_FORMAT: dict[str, Any] = {"oneOf": [
    {"type": "object", "required": ["type"], "additionalProperties": False,
     "properties": {"type": {"enum": ["text", "json_object"]}}},
    {"type": "object", "required": ["type", "json_schema"], "additionalProperties": False, "properties": {
        "type": {"const": "json_schema"},
        "json_schema": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
            "description": {"type": "string"},
            "schema": {"type": "object", "description": "A JSON Schema: the output is valid against it "
                                                        "(constrained decoding; an unsupported keyword is a 400)."},
            "strict": {"type": ["boolean", "null"], "description": "Always enforced, strict or not."}}}}},
    {"type": "object", "required": ["type", "regex"], "additionalProperties": False,
     "properties": {"type": {"const": "regex"}, "regex": {"type": "string", "minLength": 1}},
     "description": "tokenwire extension: the whole output matches the regex."},
    {"type": "object", "required": ["type", "choice"], "additionalProperties": False,
     "properties": {"type": {"const": "choice"},
                    "choice": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}},
     "description": "tokenwire extension: the output is exactly one of these strings."},
    {"type": "object", "required": ["type", "grammar"], "additionalProperties": False,
     "properties": {"type": {"const": "grammar"}, "grammar": {"type": "string", "minLength": 1},
                    "syntax": {"enum": ["lark", "gbnf"], "default": "lark"}},
     "description": "tokenwire extension: a Lark grammar (llguidance's dialect) or a GBNF one (llama.cpp's)."},
]}

# The request fields of each endpoint, with their schemas (the OpenAPI document publishes these).
_COMMON = {
    "model": MODEL,
    "stream": {"type": "boolean", "default": False},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": ["boolean", "null"]}}},
    "temperature": {**NUM, "minimum": 0, "maximum": 2, "default": 1},
    "top_p": {**NUM, "exclusiveMinimum": 0, "maximum": 1},
    "stop": {**STOP},
    "seed": SAMPLING["seed"],
    "n": {"type": "integer", "minimum": 1, "maximum": MAX_CHOICES, "default": 1,
          "description": "Choices to generate; the prompt is computed once, each choice counts as a stream."},
    "presence_penalty": SAMPLING["presence_penalty"],
    "frequency_penalty": SAMPLING["frequency_penalty"],
    "logit_bias": {"type": "object", "maxProperties": 1024, "propertyNames": {"pattern": "^[0-9]{1,9}$"},
                   "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                   "description": "Token id (as a string) -> bias added to its logit, in [-100, 100]; ids past the "
                                  "model's vocabulary are a 400."},
    "user": USER,
    "top_k": {**SAMPLING["top_k"], "description": "tokenwire extra. 0 = off."},
    "min_p": {**SAMPLING["min_p"], "description": "tokenwire extra."},
    "repetition_penalty": {**SAMPLING["repetition_penalty"], "description": "tokenwire extra."},
    "max_tokens": MAX_TOKENS,
    "ignore_eos": IGNORE_EOS,
}
# Chat messages may carry tool calls and their results here.
_CHAT_MESSAGE = {**MESSAGES["items"], "properties": {
    **MESSAGES["items"]["properties"],
    "role": {"enum": ["system", "developer", "user", "assistant", "tool"], "description": "developer = system."},
    "tool_calls": {"type": "array", "items": TOOL_CALL, "description": "An assistant message's calls."},
    "tool_call_id": {"type": "string", "description": "A tool message: the call it answers (else ignored)."},
    "name": {"type": "string", "description": "A tool message: the function's name (else ignored)."}},
    "allOf": [{"if": {"properties": {"role": {"const": "tool"}}},
               "then": {"required": ["tool_call_id"], "properties": {"tool_call_id": {"minLength": 1}}}},
              {"if": {"properties": {"role": {"not": {"const": "assistant"}}}},
               "then": {"properties": {"tool_calls": {"maxItems": 0}}}}]}
_CHAT_MESSAGES = {**MESSAGES, "items": _CHAT_MESSAGE}

_CHAT_ONLY = {
    "messages": _CHAT_MESSAGES,
    "max_completion_tokens": {**MAX_TOKENS, "description": f"Preferred over max_tokens. {MAX_TOKENS['description']}"},
    "logprobs": {"type": "boolean", "description": "The chosen tokens' logprobs."},
    "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS,
                     "description": "With logprobs: the likeliest alternatives at each position."},
    "response_format": RESPONSE_FORMAT,
    "tools": TOOLS,
    "tool_choice": TOOL_CHOICE,
    "parallel_tool_calls": PARALLEL_TOOL_CALLS,
    "functions": {"type": "array", "items": FUNCTION, "description": "Legacy form of tools."},
    "function_call": {"oneOf": [{"enum": ["none", "auto"]}, {"type": "object", "required": ["name"],
                                                             "properties": {"name": {"type": "string"}}}],
                      "description": "Legacy form of tool_choice."},
    "store": {"const": False},
    "metadata": {"type": "object", "description": "Accepted and ignored."},
    "service_tier": {"type": "string", "description": "Accepted and ignored."},
    "modalities": {"const": ["text"]},
    "think": {"type": "boolean", "description": "tokenwire extra, for reasoning models: false turns the thinking "
                                               "off where the model's template allows it."},
    "chat_template_kwargs": {"type": "object", "properties": {"enable_thinking": {"type": "boolean"}},
                             "additionalProperties": False,
                             "description": "vLLM's form of think: only enable_thinking is taken."},
}
_COMPLETION_ONLY = {
    "prompt": {"oneOf": [{"type": "string", "minLength": 1},
                         {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1}]},
    "max_tokens": {**MAX_TOKENS, "default": COMPLETIONS_DEFAULT_MAX_TOKENS},
    "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_COMPLETION_LOGPROBS,
                 "description": "The chosen tokens' logprobs, and this many likeliest alternatives (0: "
                                "top_logprobs is null)."},
    "suffix": {"const": ""},
    "echo": {"const": False},
    "best_of": {"const": 1},
    "response_format": RESPONSE_FORMAT,
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
    n: int = 1


def _require(p: Params, name: str, ok: bool, allowed: str) -> None:
    if p.given(name) and not ok:
        raise invalid_param(name, f"{name}: only {allowed} is supported by tokenwire, got {_short(p.raw(name))}",
                            code="unsupported_value")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def response_format(p: Params, sampling: pb.SamplingParams) -> None:
    """`response_format` as the request's output constraint (structured outputs)."""
    fmt = p.raw("response_format")
    if fmt is None:
        return
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise invalid_param("response_format", "response_format must be an object with a type")
    kind = fmt["type"]
    fields = {"text": set(), "json_object": set(), "json_schema": {"json_schema"}, "regex": {"regex"},
              "choice": {"choice"}, "grammar": {"grammar", "syntax"}}
    if kind not in fields:
        raise invalid_param("response_format.type", f"response_format.type must be one of {', '.join(fields)}, "
                            f"got {_short(kind)}")
    for key in fmt:
        if key != "type" and key not in fields[kind]:
            raise invalid_param(f"response_format.{key}", f"response_format.{key} has no place in type {kind}")
    if kind == "json_object":
        sampling.json_object = True
    elif kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise invalid_param("response_format.json_schema", "response_format.json_schema needs a name (and a "
                                "schema)")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", spec["name"]):
            raise invalid_param("response_format.json_schema.name", "response_format.json_schema.name must be 1 to "
                                "64 letters, digits, '_' or '-'")
        for key in ("description",):
            if key in spec and not isinstance(spec[key], str):
                raise invalid_param(f"response_format.json_schema.{key}", f"{key} must be a string")
        if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
            raise invalid_param("response_format.json_schema.strict", "strict must be true or false")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise invalid_param("response_format.json_schema.schema", "schema must be a JSON Schema object")
        sampling.json_schema = json.dumps(schema)
    elif kind == "regex":
        if not isinstance(fmt.get("regex"), str) or not fmt["regex"]:
            raise invalid_param("response_format.regex", "response_format.regex must be a non-empty string")
        sampling.regex = fmt["regex"]
    elif kind == "choice":
        choice = fmt.get("choice")
        if not (isinstance(choice, list) and choice and all(isinstance(c, str) and c for c in choice)):
            raise invalid_param("response_format.choice", "response_format.choice must be non-empty strings")
        sampling.choice.options.extend(choice)
    elif kind == "grammar":
        grammar, syntax = fmt.get("grammar"), fmt.get("syntax", "lark")
        if not isinstance(grammar, str) or not grammar:
            raise invalid_param("response_format.grammar", "response_format.grammar must be a non-empty string")
        if syntax not in ("lark", "gbnf"):
            raise invalid_param("response_format.syntax", "response_format.syntax must be lark or gbnf")
        setattr(sampling, syntax, grammar)


def _check_neutral_chat(p: Params) -> None:
    """Parameters accepted only with a value that asks for nothing tokenwire lacks."""
    _require(p, "store", p.raw("store") is False, "false (the bridge stores nothing)")
    _require(p, "modalities", p.raw("modalities") == ["text"], '["text"]')
    # Accepted and ignored, but only as what the document says they are.
    p.string("service_tier")
    if p.given("metadata") and not isinstance(p.raw("metadata"), dict):
        raise invalid_param("metadata", f"metadata must be an object, got {json_type(p.raw('metadata'))}")


def _common(p: Params) -> tuple[dict[str, Any], list[str], OpenAIOptions]:
    """Checks the parameters both endpoints share; returns sampling values, stop strings, options."""
    stream = bool(p.boolean("stream"))
    options = p.raw("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid_param("stream_options", "stream_options must be an object")
    include_usage = (options or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise invalid_param("stream_options.include_usage", "stream_options.include_usage must be true or false")
    values: dict[str, Any] = sampling(p, _COMMON)  # OpenAI's bounds where they differ from the server's
    values["logit_bias"] = logit_bias(p)
    opts = OpenAIOptions(model=p.string("model") or "", stream=stream, include_usage=bool(include_usage),
                         logprobs=False, ignore_eos=bool(p.boolean("ignore_eos")), user=p.string("user"),
                         n=p.integer("n", 1, MAX_CHOICES) or 1)
    return values, stop_strings(p), opts


def parse_chat(body: dict[str, Any], request_id: str) -> tuple[pb.GenerateRequest, OpenAIOptions]:
    p = Params(body)
    p.check_known(CHAT_FIELDS)
    _check_neutral_chat(p)
    values, stop, opts = _common(p)
    opts.logprobs = bool(p.boolean("logprobs"))
    top = p.integer("top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top and not opts.logprobs:
        raise invalid_param("top_logprobs", "top_logprobs needs logprobs: true")
    if not p.given("messages"):
        raise invalid_param("messages", "messages is required")
    # Both are checked (a bad value is a 400 whichever wins); max_completion_tokens wins.
    legacy = p.integer("max_tokens", 1, MAX_UINT32)
    max_tokens = p.integer("max_completion_tokens", 1, MAX_UINT32)
    if max_tokens is None:
        max_tokens = legacy
    request = generate_request(
        request_id=request_id, model=opts.model, messages=chat_messages(p.raw("messages"), tools=True),
        max_tokens=max_tokens, stop=stop, logprobs=opts.logprobs, ignore_eos=opts.ignore_eos, user=opts.user,
        sampling=values,
    )
    request.top_logprobs = top or 0
    request.n = opts.n if opts.n > 1 else 0
    response_format(p, request.sampling)
    tool_use(p, request)
    think = thinking(p)
    if think is not None:
        request.think = think
    return request, opts


def thinking(p: Params) -> bool | None:
    """`think` (tokenwire's) or vLLM's `chat_template_kwargs.enable_thinking`."""
    think = p.boolean("think")
    kwargs = p.raw("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict) or set(kwargs) - {"enable_thinking"}:
            raise invalid_param("chat_template_kwargs", "chat_template_kwargs takes only enable_thinking")
        enable = kwargs.get("enable_thinking")
        if enable is not None and not isinstance(enable, bool):
            raise invalid_param("chat_template_kwargs.enable_thinking", "enable_thinking must be true or false")
        if enable is not None and think is not None and enable != think:
            raise invalid_param("think", "think and chat_template_kwargs.enable_thinking disagree")
        think = enable if enable is not None else think
    return think


def logit_bias(p: Params) -> dict[int, float] | None:
    """`logit_bias`: {"token id": bias in [-100, 100]} (the server checks the ids against the model)."""
    raw = p.raw("logit_bias")
    if raw is None or raw == {}:
        return None
    if not isinstance(raw, dict):
        raise invalid_param("logit_bias", f"logit_bias must be an object of token id -> bias, got {json_type(raw)}")
    if len(raw) > 1024:
        raise invalid_param("logit_bias", f"logit_bias holds at most 1024 tokens, got {len(raw)}")
    out = {}
    for key, bias in raw.items():
        if not re.fullmatch(r"[0-9]{1,9}", key):
            raise invalid_param("logit_bias", f"logit_bias keys are token ids, got {_short(key)}")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise invalid_param("logit_bias", f"logit_bias[{key}] must be a number in [-100, 100], got {_short(bias)}")
        out[int(key)] = float(bias)
    return out


def tool_use(p: Params, request: pb.GenerateRequest) -> None:
    """tools, tool_choice, parallel_tool_calls; or the legacy functions and function_call."""
    legacy = p.raw("functions") not in (None, [])
    if legacy and p.raw("tools") not in (None, []):
        raise invalid_param("functions", "send tools or the legacy functions, not both")
    if legacy:
        functions = p.raw("functions")
        if not isinstance(functions, list):
            raise invalid_param("functions", f"functions must be an array, got {json_type(functions)}")
        if len(functions) > MAX_TOOLS:
            raise invalid_param("functions", f"functions: at most {MAX_TOOLS}, got {len(functions)}")
        request.tools.extend(function_tool(f, f"functions[{i}]") for i, f in enumerate(functions))
        call = p.raw("function_call")
        set_tool_choice(request, {"type": "function", "function": call} if isinstance(call, dict) else call,
                        "function_call")
        request.parallel_tool_calls = False  # functions make one call at most
    else:
        if p.raw("function_call") not in (None, "none", "auto"):
            raise invalid_param("function_call", "function_call goes with functions; with tools send tool_choice")
        apply_tools(request, p.raw("tools"), p.raw("tool_choice"), p.boolean("parallel_tool_calls"))


def parse_completion(body: dict[str, Any], request_id: str) -> tuple[pb.GenerateRequest, OpenAIOptions]:
    p = Params(body)
    p.check_known(COMPLETION_FIELDS)
    _require(p, "echo", p.raw("echo") is False, "echo=false")
    _require(p, "suffix", p.raw("suffix") == "", "an empty suffix")
    _require(p, "best_of", p.integer("best_of") == 1, "best_of=1")
    values, stop, opts = _common(p)
    logprobs = p.integer("logprobs", 0, MAX_COMPLETION_LOGPROBS)
    opts.logprobs = logprobs is not None
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
        sampling=values,
    )
    request.top_logprobs = logprobs or 0
    request.n = opts.n if opts.n > 1 else 0
    response_format(p, request.sampling)
    return request, opts

