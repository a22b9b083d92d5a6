"""Tool calling: how a request's tools reach the model, what holds its calls to their schemas, and
how its calls are read back out of the text it writes.

* Rendering: a chat template that takes `tools` (Qwen, Llama 3.1, Mistral, Hermes, ...) gets them,
  and the history's calls and results, in the shape Hugging Face templates expect. A template
  without tools (SmolLM2's) gets the generic prompt below: the tools as JSON in the system message
  and Hermes-style `<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks, the most common
  format small models are trained on; earlier calls and results are rendered the same way.
* Constraint: with tool_choice "required" or a named function the output is one call (or several,
  with parallel calls) whose name and arguments match a tool's schema; with "auto" it is free
  text, or text and then calls, and once a call begins it is held to the schemas. A llguidance
  Lark grammar with the calls' JSON Schema inlined (`%json`) does both.
* Parsing: `ToolCallStream` reads the streamed text and separates the calls from the prose, for
  the common formats: Hermes/Qwen `<tool_call>{...}</tool_call>`, Mistral `[TOOL_CALLS][{...}]`
  (and `[TOOL_CALLS]name[ARGS]{...}`), and Llama 3's bare JSON `{"name": ..., "parameters": ...}`
  (optionally after `<|python_tag|>`). Text that only looks like a call (it does not parse, or names
  no tool) is given back as text.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .text_stream import held_suffix

CHOICES = ("auto", "none", "required", "function")
MAX_TOOLS = 128
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_OPEN = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"


class ToolError(ValueError):
    """The tools or the tool choice cannot be used; `field` names the request field at fault."""

    def __init__(self, message: str, field: str = "tools") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)  # a JSON Schema ({} = no parameters)

    def openai(self) -> dict[str, Any]:
        """The tool as templates and the generic prompt show it (OpenAI's shape)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters or {"type": "object", "properties": {}}
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolUse:
    """A request's tools and what it asks of them."""

    tools: tuple[ToolSpec, ...]
    choice: str = "auto"  # one of CHOICES
    name: str = ""  # with choice "function": the function to call
    parallel: bool = True

    def check(self) -> None:
        if len(self.tools) > MAX_TOOLS:
            raise ToolError(f"at most {MAX_TOOLS} tools, got {len(self.tools)}")
        seen: set[str] = set()
        for i, tool in enumerate(self.tools):
            if not NAME.fullmatch(tool.name):
                raise ToolError(f"tools[{i}].name must be 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-', "
                                f"got {tool.name[:70]!r}", f"tools[{i}].name")
            if tool.name in seen:
                raise ToolError(f"tools[{i}].name {tool.name!r} is given twice", f"tools[{i}].name")
            seen.add(tool.name)
            if not isinstance(tool.parameters, dict):
                raise ToolError(f"tools[{i}].parameters must be a JSON Schema object", f"tools[{i}].parameters")
        if self.choice not in CHOICES:
            raise ToolError(f"tool_choice must be one of {', '.join(CHOICES)}, got {self.choice!r}", "tool_choice")
        if self.choice in ("required", "function") and not self.tools:
            raise ToolError(f"tool_choice {self.choice!r} needs tools", "tool_choice")
        if self.choice == "function" and self.name not in seen:
            raise ToolError(f"tool_choice names function {self.name!r}, which is not among the tools "
                            f"({', '.join(sorted(seen)) or 'none'})", "tool_choice")

    @property
    def calls_allowed(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def callable_tools(self) -> tuple[ToolSpec, ...]:
        return tuple(t for t in self.tools if self.choice != "function" or t.name == self.name)


@dataclass(frozen=True)
class ToolCallRecord:
    id: str
    name: str
    arguments: str  # a JSON object, as JSON text


def new_call_id() -> str:
    alphabet = string.ascii_letters + string.digits
    return "call_" + "".join(secrets.choice(alphabet) for _ in range(24))


def call_ids(seed: str) -> Callable[[], str]:
    """Call ids for one reply, the same on every parse of it: the stream that sends the reply and
    the chat store that keeps it read the text apart, and a tool result must name the id sent."""
    count = itertools.count()
    return lambda: "call_" + hashlib.sha256(f"{seed}:{next(count)}".encode()).hexdigest()[:24]


# ---- rendering -----------------------------------------------------------------------------

def template_takes_tools(template_source: str) -> bool:
    """Whether a chat template reads `tools` (Hugging Face templates that support tool calling do)."""
    return bool(re.search(r"\btools\b", template_source))


def args_key(template_source: str) -> str:
    """The key a model's calls put their arguments under: Llama 3's templates say "parameters"."""
    return "parameters" if PYTHON_TAG in template_source or '"parameters"' in template_source and \
        CALL_OPEN not in template_source else "arguments"


GENERIC_PROMPT = """You can call these functions (tools):
<tools>
{tools}
</tools>
To call one, write a <tool_call> block holding a JSON object with the function's name and its arguments,
one block per call, and nothing after the blocks:
<tool_call>
{{"name": "<function name>", "arguments": {{<the arguments as JSON>}}}}
</tool_call>
When no function is needed, answer in plain text."""


def _call_text(name: str, arguments: str) -> str:
    try:
        args: Any = json.loads(arguments) if arguments else {}
    except ValueError:
        args = arguments
    return f"{CALL_OPEN}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n{CALL_CLOSE}"


def generic_messages(messages: list[dict[str, Any]], tools: tuple[ToolSpec, ...]) -> list[dict[str, str]]:
    """The conversation for a template without tools: the tools in the system message, earlier calls
    as `<tool_call>` blocks in the assistant's text, results as user turns in `<tool_response>`."""
    out: list[dict[str, str]] = []
    for m in messages:
        role, content = m["role"], m.get("content", "")
        if role == "assistant" and m.get("tool_calls"):
            blocks = [_call_text(c["function"]["name"], _arguments_text(c["function"].get("arguments")))
                      for c in m["tool_calls"]]
            content = "\n".join(([content] if content else []) + blocks)
        elif role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        out.append({"role": role, "content": content})
    if tools:
        prompt = GENERIC_PROMPT.format(tools="\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}" if out[0]["content"] else prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _arguments_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation for a template that takes tools: calls' arguments as objects (templates
    write them with `tojson`), tool results with their call id and function name."""
    names = {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls") or ()}
    out = []
    for m in messages:
        item: dict[str, Any] = {"role": m["role"], "content": m.get("content", "")}
        if m.get("tool_calls"):
            item["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
                "name": c["function"]["name"], "arguments": _arguments_object(c["function"].get("arguments"))}}
                for c in m["tool_calls"]]
        if m["role"] == "tool":
            item["tool_call_id"] = m.get("tool_call_id", "")
            item["name"] = m.get("name") or names.get(m.get("tool_call_id", ""), "")
        out.append(item)
    return out


def _arguments_object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments else {}
        except ValueError:
            return arguments
    return arguments


# ---- the constraint ------------------------------------------------------------------------

# JSON as json.dumps writes it: no runs of whitespace for a model to wander into.
_COMPACT = {"x-guidance": {"whitespace_flexible": False}}
# A function declared without parameters takes none.
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def _call_schema(tools: tuple[ToolSpec, ...], key: str) -> dict[str, Any]:
    variants = [{"type": "object", "additionalProperties": False, "required": ["name", key], "properties": {
        "name": {"const": t.name}, key: t.parameters or _NO_PARAMETERS}} for t in tools]
    return {**variants[0], **_COMPACT} if len(variants) == 1 else {"anyOf": variants, **_COMPACT}


def call_grammar(use: ToolUse, key: str = "arguments", json_schema: dict[str, Any] | None = None) -> str:
    """The Lark grammar (llguidance's dialect) the reply must match. `json_schema`: with "auto", a
    reply that is not a call must be JSON valid against it (response_format and tools together)."""
    schema = json.dumps(_call_schema(use.callable_tools(), key), ensure_ascii=False)
    lines = [f'call: "{CALL_OPEN}\\n" %json {schema} "\\n{CALL_CLOSE}"',
             'calls: call ("\\n" call)*' if use.parallel else "calls: call"]
    if use.choice in ("required", "function"):
        lines.insert(0, "start: calls")
    elif json_schema is not None:
        lines.insert(0, "start: answer | calls")
        lines.append(f"answer: %json {json.dumps({**json_schema, **_COMPACT}, ensure_ascii=False)}")
    else:
        # Free text that holds no call opening, then (optionally) the calls.
        lines.insert(0, "start: TEXT | TEXT? calls")
        lines.append(r"TEXT: /(.|\n)+/ & ~/(.|\n)*<tool_call>(.|\n)*/")
    return "\n".join(lines)


# ---- parsing -------------------------------------------------------------------------------

@dataclass
class TextOut:
    text: str


@dataclass
class CallOut:
    """A call read whole: the stream sends its id and name, then its arguments."""

    index: int
    call: ToolCallRecord


Output = TextOut | CallOut


class ToolCallStream:
    """Splits a reply's streamed text into prose and tool calls.

    `feed` takes each piece of text as it comes and returns what can be said now; text that may
    open a call is held back until it is known. `finish` says the rest. `calls` lists the calls."""

    def __init__(self, tools: tuple[ToolSpec, ...], ids: Callable[[], str] = new_call_id) -> None:
        self.names = {t.name for t in tools}
        self._ids = ids
        self.calls: list[ToolCallRecord] = []
        self._held = ""  # text not yet said: it may begin a call
        self._in_call = ""  # "" (prose), CALL_OPEN, MISTRAL_OPEN or "{" (a bare JSON call)
        self._said_text = False

    def feed(self, text: str) -> list[Output]:
        self._held += text
        out: list[Output] = []
        while True:
            if self._in_call == CALL_OPEN:
                end = self._held.find(CALL_CLOSE)
                if end < 0:
                    return out
                body, self._held = self._held[:end], self._held[end + len(CALL_CLOSE):]
                out += self._call_or_text(body, CALL_OPEN + body + CALL_CLOSE)
                self._in_call = ""
                continue
            if self._in_call:  # Mistral or bare JSON: the call runs to the end of the reply
                return out
            if not self._said_text and not self.calls:
                stripped = self._held.lstrip()
                if stripped.startswith(PYTHON_TAG) or stripped.startswith("{"):
                    self._in_call = "{"
                    return out
                if stripped and (PYTHON_TAG.startswith(stripped)):
                    return out  # may still become <|python_tag|>
            at = min((i for i in (self._held.find(CALL_OPEN), self._held.find(MISTRAL_OPEN)) if i >= 0), default=-1)
            if at >= 0:
                if at:
                    out.append(self._text(self._held[:at]))
                marker = CALL_OPEN if self._held.startswith(CALL_OPEN, at) else MISTRAL_OPEN
                self._held = self._held[at + len(marker):]
                self._in_call = marker
                continue
            keep = held_suffix(self._held, (CALL_OPEN, MISTRAL_OPEN))
            said, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep:]
            if said:
                out.append(self._text(said))
            return out

    def finish(self) -> list[Output]:
        held, kind = self._held, self._in_call
        self._held, self._in_call = "", ""
        if kind == CALL_OPEN:  # a call the reply ended inside (no closing tag): whole if it parses
            return self._call_or_text(held, CALL_OPEN + held)
        if kind == MISTRAL_OPEN:
            return self._mistral(held)
        if kind == "{":
            body = held.lstrip()
            body = body[len(PYTHON_TAG):] if body.startswith(PYTHON_TAG) else body
            calls = [c for part in _split_json_calls(body) for c in [self._record(part)] if c is not None]
            if calls and len(calls) == len(_split_json_calls(body)):
                return [self._add(c) for c in calls]
            return [self._text(held)] if held else []
        return [self._text(held)] if held else []

    def _text(self, text: str) -> TextOut:
        if text.strip():
            self._said_text = True
        elif self.calls:  # the blank lines between and after calls are not prose
            return TextOut("")
        return TextOut(text)

    def _add(self, call: ToolCallRecord) -> CallOut:
        self.calls.append(call)
        return CallOut(len(self.calls) - 1, call)

    def _call_or_text(self, body: str, raw: str) -> list[Output]:
        call = self._record(body.strip())
        return [self._add(call)] if call is not None else [self._text(raw)]

    def _mistral(self, body: str) -> list[Output]:
        raw = MISTRAL_OPEN + body
        text = body.strip()
        items: list[Any] = []
        if "[ARGS]" in text and not text.startswith("["):  # v11: name[ARGS]{...}, repeated
            for chunk in text.split(MISTRAL_OPEN):
                name, _, args = chunk.partition("[ARGS]")
                items.append({"name": name.strip(), "arguments": _loads(args.strip())})
        else:
            value = _loads(text)
            items = value if isinstance(value, list) else [value]
        calls = [self._record_of(item) for item in items]
        if items and all(c is not None for c in calls):
            return [self._add(c) for c in calls if c is not None]
        return [self._text(raw)]

    def _record(self, text: str) -> ToolCallRecord | None:
        return self._record_of(_loads(text))

    def _record_of(self, value: Any) -> ToolCallRecord | None:
        if not isinstance(value, dict) or value.get("name") not in self.names:
            return None
        args = value.get("arguments", value.get("parameters", {}))
        if isinstance(args, str):  # some models write the arguments as a JSON string
            args = _loads(args)
        if not isinstance(args, dict):
            return None
        return ToolCallRecord(self._ids(), value["name"], json.dumps(args, ensure_ascii=False))


_MISSING = object()


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return _MISSING


def _split_json_calls(text: str) -> list[str]:
    """Llama 3 writes parallel calls as JSON objects separated by ';' (or new lines)."""
    decoder = json.JSONDecoder()
    parts, at = [], 0
    text = text.strip()
    while at < len(text):
        try:
            _, end = decoder.raw_decode(text, at)
        except ValueError:
            return [text]
        parts.append(text[at:end])
        at = end
        while at < len(text) and text[at] in " \t\r\n;":
            at += 1
    return parts
