"""The affinity key: what a router hashes so that a conversation's next turn lands on the replica
whose prefix cache holds its start.

A router cannot read `chat_id` inside a protobuf, nor a JSON body, so the bridge and the CLI
name the conversation in a header (`x-tokenwire-affinity`, as gRPC metadata on their calls): a
stored chat by its id; a stateless conversation (OpenAI's, Ollama's, /api/generate's) by a hash
of its leading messages (the system prompt and the first user message, which every later turn
repeats); a raw prompt by a hash of its start. A request with no key is spread by load. The
value names nothing secret: chat ids are random and the hashes are one-way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

HEADER = "x-tokenwire-affinity"
PROMPT_BYTES = 1024  # a raw prompt's key: its first this many bytes (a shared preamble keeps its replica)


def _digest(kind: str, text: str) -> str:
    return f"{kind}-" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def for_chat(chat_id: str) -> str:
    """A stored chat's key; "" for an id no chat has (it must not break the call's metadata)."""
    key = f"chat-{chat_id}"
    return key if valid(key) else ""


def for_messages(messages: Iterable[tuple[str, str]]) -> str:
    """(role, content) pairs, oldest first: the key of the conversation they start ("" when there
    is no user message to anchor it)."""
    leading: list[tuple[str, str]] = []
    for role, content in messages:
        leading.append((role, content))
        if role == "user":
            return _digest("conv", json.dumps(leading, ensure_ascii=False))
    return ""


def for_prompt(prompt: str) -> str:
    return _digest("prompt", prompt.encode("utf-8", "surrogatepass")[:PROMPT_BYTES].decode("utf-8", "ignore")) \
        if prompt else ""


def for_request(request: Any) -> str:
    """A GenerateRequest's key: its chat, else its leading messages, else its prompt's start."""
    if request.chat_id:
        return for_chat(request.chat_id)
    if request.messages:
        return for_messages((m.role, m.content) for m in request.messages)
    return for_prompt(request.prompt)


def valid(value: str) -> bool:
    """A key a client may send itself: short, and printable ASCII (it becomes gRPC metadata)."""
    return 0 < len(value) <= 128 and value.isascii() and value.isprintable()
