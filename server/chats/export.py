"""A stored chat as a JSON document or a Markdown transcript (pure functions of store records)."""

from __future__ import annotations

import base64
import json
from dataclasses import asdict
from datetime import UTC, datetime

from .store import ChatInfo, MessageInfo

JSON_TYPE = "application/json"
MARKDOWN_TYPE = "text/markdown"
_ROLE_HEADINGS = {"system": "System", "user": "You", "assistant": "Assistant", "tool": "Tool result"}
_STATUS_NOTES = {
    "length": "cut at the token limit",
    "stopped": "stopped by the user",
    "cancelled": "cancelled",
    "error": "failed",
    "pending": "being written",
    "interrupted": "interrupted: the server stopped",
}


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def to_json(chat: ChatInfo, messages: list[MessageInfo]) -> str:
    doc = {
        "chat": {**asdict(chat), "created": _iso(chat.created_ms), "updated": _iso(chat.updated_ms)},
        "messages": [{**asdict(m), "created": _iso(m.created_ms), "images": [
            {"media_type": i.get("media_type", ""), "text": i.get("text", ""),
             "data_base64": base64.b64encode(i["data"]).decode()} for i in m.images]} for m in messages],
    }
    return json.dumps(doc, ensure_ascii=False, indent=2) + "\n"


def to_markdown(chat: ChatInfo, messages: list[MessageInfo]) -> str:
    lines = [f"# {chat.title or 'Untitled chat'}", ""]
    facts = [f"chat `{chat.id}`", f"started {_iso(chat.created_ms)}"]
    if chat.model:
        facts.append(f"model `{chat.model}`")
    lines += ["_" + " · ".join(facts) + "_", ""]
    for m in messages:
        heading = _ROLE_HEADINGS.get(m.role, m.role.title())
        notes = [m.model] if m.role == "assistant" and m.model else []
        if m.role == "tool":
            notes.append(f"{m.name or 'call'} `{m.tool_call_id}`")
        if m.status in _STATUS_NOTES:
            notes.append(_STATUS_NOTES[m.status])
        lines.append(f"## {heading}" + (f" ({', '.join(notes)})" if notes else ""))
        lines.append("")
        if m.reasoning:
            lines += ["> " + line if line else ">" for line in f"_Thinking:_ {m.reasoning}".split("\n")] + [""]
        if m.content or not m.tool_calls:
            lines.append(m.content if m.content else "_(no text)_")
        for n, image in enumerate(m.images, start=1):
            found = image.get("text", "").strip() or "(no text found)"
            lines += ["", f"_Image {n} ({image.get('media_type', '')}), its text:_", "", "```text", found, "```"]
        for call in m.tool_calls:
            lines += ["", f"Calls `{call.get('name', '')}` (`{call.get('id', '')}`):", "", "```json",
                      call.get("arguments", ""), "```"]
        if m.error_message:
            lines += ["", f"> error: {m.error_message}"]
        lines.append("")
    return "\n".join(lines)


def filename(chat: ChatInfo, markdown: bool) -> str:
    return f"chat-{chat.id}.{'md' if markdown else 'json'}"
