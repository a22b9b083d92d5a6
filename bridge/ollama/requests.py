"""Ollama request bodies (/api/chat, /api/generate) as GenerateRequests.

Ollama's `options` map onto tokenwire's sampling (temperature, top_p, top_k, min_p, seed,
repeat_penalty, presence_penalty, frequency_penalty, num_predict, stop). Options that only tune
how Ollama's runner uses the machine (num_ctx, num_thread, num_gpu, num_batch, use_mmap, ...)
change no output here and are accepted and ignored; options that would change the output and
that tokenwire cannot honour (mirostat, tfs_z, typical_p away from their neutral values) are a
400 that names them, as are features it does not have (context, suffix, template). `images`
(base64) are read for their text (OCR) and given to the model with it. `think` splits a reasoning
model's thinking into `thinking` (false turns it off where the template allows). `format`
("json" or a JSON Schema) constrains the output (server/engine/constraints.py). `tools` (chat)
are OpenAI's; the model's calls come back in `message.tool_calls` with arguments as objects, and
the history's calls and `tool` results (by `tool_name`) go back to the model.
"""

from __future__ import annotations

import json
from typing import Any

from tokenwire.bridge.errors import ApiError, invalid_param
from tokenwire.bridge.image_fields import image_list
from tokenwire.bridge.params import Params, json_type
from tokenwire.bridge.proto_request import MAX_UINT32, generate_request
from tokenwire.bridge.tool_fields import tools_of
from tokenwire.server.settings import parse_duration
from tokenwire.v1 import inference_pb2 as pb

# Accepted, and change nothing for tokenwire (they size Ollama's runner or its context window,
# which here is the model's own).
RUNNER_OPTIONS = frozenset({
    "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "num_thread", "use_mmap", "use_mlock", "numa",
    "num_keep", "repeat_last_n", "penalize_newline", "vocab_only", "f16_kv", "logits_all", "embedding_only",
})
# Would change the output; honoured only at their neutral value.
NEUTRAL_ONLY = {"mirostat": 0, "tfs_z": 1.0, "typical_p": 1.0, "mirostat_tau": None, "mirostat_eta": None}
SAMPLING_OPTIONS = frozenset({"temperature", "top_p", "top_k", "min_p", "seed", "repeat_penalty",
                              "presence_penalty", "frequency_penalty", "num_predict", "stop"})
CHAT_FIELDS = {"model", "messages", "stream", "options", "keep_alive", "format", "tools", "think"}
GENERATE_FIELDS = {"model", "prompt", "system", "stream", "options", "keep_alive", "format", "raw",
                   "images", "context", "suffix", "template", "think"}
ROLES = ("system", "user", "assistant", "tool")


def model_name(p: Params) -> str:
    """The model asked for; Ollama's implicit tag ":latest" means the name's default variant. Older
    clients name it "name" (/api/pull, /api/delete)."""
    name = p.string("model") or p.string("name")
    if not name:
        raise invalid_param("model", "model is required (see GET /api/tags)")
    return name[: -len(":latest")] if name.endswith(":latest") else name


def keep_alive(p: Params) -> float | None:
    """Seconds: Ollama sends a duration ("5m", "1h", "-1", "0") or a number of seconds."""
    value = p.raw("keep_alive")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise invalid_param("keep_alive", f"keep_alive must be a duration such as \"5m\" or seconds, got "
                                          f"{json_type(value)}")
    try:
        return parse_duration(value)
    except ValueError:
        raise invalid_param("keep_alive", f"keep_alive {value!r} is not a duration such as \"5m\", \"1h\" "
                                          "or seconds") from None


def output_format(p: Params, sampling: pb.SamplingParams) -> None:
    """Ollama's `format`: "json" (any JSON object) or a JSON Schema, as a constraint on the output."""
    fmt = p.raw("format")
    if fmt in (None, ""):
        return
    if fmt == "json":
        sampling.json_object = True
    elif isinstance(fmt, dict):
        sampling.json_schema = json.dumps(fmt)
    else:
        raise invalid_param("format", f"format must be \"json\" or a JSON Schema object, got {json_type(fmt)}")


def _think(p: Params, request: pb.GenerateRequest) -> None:
    """Ollama's `think`: true or false (the "low"/"medium"/"high" of gpt-oss have no meaning here)."""
    think = p.raw("think")
    if think is None:
        return
    if not isinstance(think, bool):
        raise invalid_param("think", f"think must be true or false, got {json_type(think)}")
    request.think = think


def options(p: Params) -> tuple[dict[str, Any], int | None, list[str]]:
    """(sampling fields, max_tokens, stop strings) from `options`."""
    raw = p.raw("options")
    if raw is None:
        return {}, None, []
    if not isinstance(raw, dict):
        raise invalid_param("options", f"options must be an object, got {json_type(raw)}")
    o = Params(raw)
    for name, value in raw.items():
        where = f"options.{name}"
        if name in RUNNER_OPTIONS or name in SAMPLING_OPTIONS or value is None:
            continue
        if name in NEUTRAL_ONLY:
            neutral = NEUTRAL_ONLY[name]
            if neutral is not None and value != neutral:
                raise invalid_param(where, f"{where}={value!r} is not supported (only {neutral!r})")
            continue
        raise invalid_param(where, f"unknown option {name!r}")
    try:
        sampling = {
            "temperature": o.number("temperature", 0.0),
            "top_p": o.number("top_p", 0.0, 1.0),
            "top_k": o.integer("top_k", 0, MAX_UINT32),
            "min_p": o.number("min_p", 0.0, 1.0),
            "repetition_penalty": o.number("repeat_penalty"),
            "presence_penalty": o.number("presence_penalty"),
            "frequency_penalty": o.number("frequency_penalty"),
            "seed": o.seed(),
        }
        predict = o.integer("num_predict", -2, MAX_UINT32)
        stop = o.stop()
    except ApiError as exc:  # name the field as the caller sent it
        exc.param, exc.message = f"options.{exc.param}", f"options.{exc.message}"
        raise
    # num_predict -1 (no limit) and -2 (fill the context): the server's default, capped by the window.
    return sampling, (predict if predict and predict > 0 else None), stop


def chat_messages(p: Params) -> list[pb.ChatMessage]:
    raw = p.raw("messages")
    if not isinstance(raw, list) or not raw:
        raise invalid_param("messages", "messages must be a non-empty array of {role, content} objects")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid_param(where, f"{where} must be an object, got {json_type(m)}")
        role, content = m.get("role"), m.get("content", "")
        if role not in ROLES:
            raise invalid_param(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise invalid_param(f"{where}.content", f"{where}.content must be a string, got {json_type(content)}")
        message = pb.ChatMessage(role=role, content=content, images=image_list(m.get("images"), f"{where}.images"))
        if m.get("tool_calls"):
            if role != "assistant":
                raise invalid_param(f"{where}.tool_calls", f"{where}.tool_calls: only assistant messages hold calls")
            message.tool_calls.extend(_ollama_calls(m["tool_calls"], f"{where}.tool_calls", i))
        if role == "tool":
            name = m.get("tool_name", m.get("name"))
            if name is not None and not isinstance(name, str):
                raise invalid_param(f"{where}.tool_name", f"{where}.tool_name must be a string")
            message.name = name or ""
            message.tool_call_id = _answered_call(out, name or "")
        out.append(message)
    return out


def _ollama_calls(value: Any, where: str, turn: int) -> list[pb.ToolCall]:
    """Ollama's calls: `[{"function": {"name", "arguments": {...}}}]` (no ids: made up per turn)."""
    if not isinstance(value, list):
        raise invalid_param(where, f"{where} must be an array, got {json_type(value)}")
    calls = []
    for j, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid_param(f"{where}[{j}]", f"{where}[{j}] must be {{\"function\": {{\"name\", \"arguments\"}}}}")
        arguments = function.get("arguments", {})
        if not isinstance(arguments, dict):
            raise invalid_param(f"{where}[{j}].function.arguments", f"{where}[{j}].function.arguments must be an "
                                "object")
        calls.append(pb.ToolCall(id=f"call_{turn}_{j}", name=function["name"], arguments_json=json.dumps(arguments)))
    return calls


def _answered_call(history: list[pb.ChatMessage], name: str) -> str:
    """The id of the call a tool result answers: the latest unanswered call of that function (or any)."""
    answered = {m.tool_call_id for m in history if m.role == "tool"}
    for message in reversed(history):
        for call in message.tool_calls:
            if call.id not in answered and (not name or call.name == name):
                return call.id
    return "call_unknown"


def chat_request(p: Params, request_id: str) -> pb.GenerateRequest:
    p.check_known(CHAT_FIELDS)
    sampling, max_tokens, stop = options(p)
    request = generate_request(request_id=request_id, model=model_name(p), messages=chat_messages(p),
                               max_tokens=max_tokens, stop=stop, sampling=sampling)
    request.tools.extend(tools_of(p.raw("tools")))
    _think(p, request)
    output_format(p, request.sampling)
    if (seconds := keep_alive(p)) is not None:
        request.keep_alive_s = seconds
    return request


def generate_body(p: Params, request_id: str) -> pb.GenerateRequest | None:
    """The GenerateRequest of /api/generate; None for an empty prompt (Ollama: load or unload the model)."""
    p.check_known(GENERATE_FIELDS)
    for name in ("context", "suffix", "template"):
        if p.raw(name):
            raise invalid_param(name, f"{name} is not supported by this tokenwire")
    images = image_list(p.raw("images"), "images")
    prompt, system, raw = p.string("prompt") or "", p.string("system") or "", p.boolean("raw") or False
    sampling, max_tokens, stop = options(p)
    name = model_name(p)
    if not prompt:
        return None
    if raw:  # the prompt exactly as given: no chat template
        if images:
            raise invalid_param("images", "images have no place in a raw prompt (they go in a user turn)")
        if system:
            raise invalid_param("system", "system has no place in a raw prompt")
        if p.raw("think") is True:
            raise invalid_param("think", "think has no place in a raw prompt (no template marks the thinking)")
        request = generate_request(request_id=request_id, model=name, prompt=prompt, max_tokens=max_tokens,
                                   stop=stop, sampling=sampling)
    else:  # Ollama renders the prompt with the model's template, as a user turn
        messages = [pb.ChatMessage(role="system", content=system)] if system else []
        messages.append(pb.ChatMessage(role="user", content=prompt, images=images))
        request = generate_request(request_id=request_id, model=name, messages=messages, max_tokens=max_tokens,
                                   stop=stop, sampling=sampling)
        _think(p, request)
    output_format(p, request.sampling)
    if (seconds := keep_alive(p)) is not None:
        request.keep_alive_s = seconds
    return request
