"""Tools in a request, as OpenAI and Ollama send them, turned into the GenerateRequest's fields.

Both APIs describe a tool the same way (`{"type": "function", "function": {"name", "description",
"parameters"}}`); they differ in how the history carries calls (OpenAI: arguments as JSON text
and call ids; Ollama: arguments as an object, no ids) and in `tool_choice` (Ollama has none).
"""

from __future__ import annotations

import json
import re
from typing import Any

from tokenwire.v1 import inference_pb2 as pb

from .errors import invalid_param
from .params import json_type

MAX_TOOLS = 128
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

FUNCTION: dict[str, Any] = {
    "type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
        "description": {"type": "string"},
        "parameters": {"type": "object", "description": "A JSON Schema: calls are held to it (constrained "
                                                        "decoding); an unsupported keyword is a 400."},
        "strict": {"type": ["boolean", "null"], "description": "Always enforced, strict or not."}}}
TOOLS: dict[str, Any] = {
    "type": "array", "maxItems": MAX_TOOLS, "items": {
        "type": "object", "required": ["type", "function"],
        "properties": {"type": {"const": "function"}, "function": FUNCTION}},
    "description": "Functions the model may call: shown to it through its chat template (or a generic tool "
                   "prompt), its calls parsed into tool_calls."}
TOOL_CHOICE: dict[str, Any] = {"oneOf": [
    {"enum": ["none", "auto", "required"]},
    {"type": "object", "required": ["type", "function"], "properties": {
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}]}
TOOL_CALL: dict[str, Any] = {
    "type": "object", "required": ["function"], "properties": {
        "id": {"type": "string"}, "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"},
            "arguments": {"type": ["string", "object"], "description": "JSON text (or the object itself)."}}}}}


def function_tool(value: Any, where: str) -> pb.Tool:
    """One `{"name", "description", "parameters"}` object (OpenAI's tools[].function)."""
    if not isinstance(value, dict):
        raise invalid_param(where, f"{where} must be an object, got {json_type(value)}")
    name = value.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise invalid_param(f"{where}.name", f"{where}.name must be 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'")
    description = value.get("description")
    if description is not None and not isinstance(description, str):
        raise invalid_param(f"{where}.description", f"{where}.description must be a string")
    parameters = value.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise invalid_param(f"{where}.parameters", f"{where}.parameters must be a JSON Schema object")
    strict = value.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid_param(f"{where}.strict", f"{where}.strict must be true or false")
    return pb.Tool(name=name, description=description or "",
                   parameters_json=json.dumps(parameters) if parameters else "")


def tools_of(value: Any, param: str = "tools") -> list[pb.Tool]:
    """`tools`: `[{"type": "function", "function": {...}}, ...]`."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid_param(param, f"{param} must be an array of tools, got {json_type(value)}")
    if len(value) > MAX_TOOLS:
        raise invalid_param(param, f"{param}: at most {MAX_TOOLS} tools, got {len(value)}")
    out = []
    for i, tool in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise invalid_param(f"{where}.type", f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}")
        out.append(function_tool(tool.get("function"), f"{where}.function"))
    return out


def set_tool_choice(request: pb.GenerateRequest, value: Any, param: str = "tool_choice") -> None:
    """`tool_choice`: "none", "auto", "required" or `{"type": "function", "function": {"name"}}`."""
    if value is None:
        return
    if isinstance(value, str):
        if value not in ("none", "auto", "required"):
            raise invalid_param(param, f'{param} must be "none", "auto", "required" or a function, got {value!r}')
        request.tool_choice = value
        return
    function = value.get("function") if isinstance(value, dict) else None
    if not (isinstance(value, dict) and value.get("type") == "function" and isinstance(function, dict)
            and isinstance(function.get("name"), str)):
        raise invalid_param(param, f'{param} must be "none", "auto", "required" or '
                            '{"type": "function", "function": {"name": ...}}')
    request.tool_choice = "function"
    request.tool_choice_name = function["name"]


def openai_tool_calls(value: Any, where: str) -> list[pb.ToolCall]:
    """An assistant message's `tool_calls` as OpenAI sends them back (arguments as JSON text)."""
    if value is None or value == []:
        return []
    if not isinstance(value, list):
        raise invalid_param(where, f"{where} must be an array, got {json_type(value)}")
    calls = []
    for j, call in enumerate(value):
        at = f"{where}[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid_param(at, f"{at} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                                "\"arguments\"}}}}")
        arguments = function.get("arguments", "")
        if isinstance(arguments, dict):
            arguments = json.dumps(arguments)
        if not isinstance(arguments, str):
            raise invalid_param(f"{at}.function.arguments", f"{at}.function.arguments must be JSON text")
        call_id = call.get("id", "")
        if not isinstance(call_id, str):
            raise invalid_param(f"{at}.id", f"{at}.id must be a string")
        if call.get("type", "function") != "function":
            raise invalid_param(f"{at}.type", f"{at}.type must be \"function\"")
        calls.append(pb.ToolCall(id=call_id, name=function["name"], arguments_json=arguments))
    return calls


PARALLEL_TOOL_CALLS: dict[str, Any] = {"type": "boolean", "default": True,
                                       "description": "Whether a reply may hold several calls."}


def apply_tools(request: pb.GenerateRequest, tools: Any, tool_choice: Any, parallel: bool | None) -> None:
    """`tools`, `tool_choice` and `parallel_tool_calls` into the request (a choice that needs tools
    without any is refused)."""
    request.tools.extend(tools_of(tools))
    set_tool_choice(request, tool_choice)
    if parallel is not None:
        request.parallel_tool_calls = parallel
    if request.tool_choice in ("required", "function") and not request.tools:
        raise invalid_param("tool_choice", f"tool_choice {request.tool_choice!r} needs tools")


def tool_call_json(c: pb.ToolCall) -> dict[str, Any]:
    """A call as OpenAI writes one (arguments as JSON text)."""
    return {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
