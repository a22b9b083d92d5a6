"""A whole stored chat from the server, read a page at a time (GetChat pages stay under gRPC's limits)."""

from __future__ import annotations

from typing import Any


def whole_chat(stub: Any, chat_id: str, timeout: float = 30) -> Any:
    """GetChat's reply with every message of the chat, however many pages it takes."""
    from tokenwire.v1 import history_pb2 as hpb

    reply = stub.GetChat(hpb.GetChatRequest(chat_id=chat_id), timeout=timeout)
    whole = hpb.GetChatResponse(chat=reply.chat, messages=reply.messages)
    while reply.next_page_token:
        reply = stub.GetChat(hpb.GetChatRequest(chat_id=chat_id, page_token=reply.next_page_token), timeout=timeout)
        whole.messages.extend(reply.messages)
        whole.chat.CopyFrom(reply.chat)
    return whole


def call_line(name: str, arguments_json: str, call_id: str = "") -> str:
    """A tool call as the CLI prints it: `-> get_weather({"city": "Paris"})  [call_…]`."""
    return f"-> {name}({arguments_json})" + (f"  [{call_id}]" if call_id else "")


def message_body(m: Any) -> list[str]:
    """A stored message's lines beyond its heading: its thinking, its text, the tools it called."""
    lines = [f"[thinking] {m.reasoning}"] if m.reasoning else []
    if m.content or not m.tool_calls:
        lines.append(m.content)
    lines += [call_line(c.name, c.arguments_json, c.id) for c in m.tool_calls]
    return lines


def message_heading(m: Any) -> str:
    """`tool get_weather [call_…]` for a tool result, else the role."""
    return f"tool {m.name or '?'} [{m.tool_call_id}]" if m.role == "tool" else m.role


def in_prompt(m: Any) -> bool:
    """Whether a turn's prompt holds this stored message, as the server counts `dropped_messages`
    (server/chats/store.py, _turn_context): not the system prompt (always kept, never counted),
    not a reply still being written, not an empty one (stopped before its first token)."""
    from tokenwire.v1 import history_pb2 as hpb

    if m.role == "system" or m.status == hpb.MESSAGE_STATUS_PENDING:
        return False
    return bool(m.content or m.tool_calls or m.role == "tool")


def unseen_line(messages: Any, dropped: int) -> str:
    """What the CLI says when a turn's prompt left out the chat's `dropped` oldest messages: which
    ones the model no longer sees, by their first words ("" when none were left out)."""
    counted = [m for m in messages if in_prompt(m)][:dropped]
    if not counted:
        return ""

    def words(m: Any) -> str:
        flat = " ".join((m.content or m.role).split())
        return f"“{flat[:40]}…”" if len(flat) > 40 else f"“{flat}”"

    span = words(counted[0]) if len(counted) == 1 else f"{words(counted[0])} to {words(counted[-1])}"
    return (f"[the model no longer sees the {len(counted)} oldest message{'s' if len(counted) > 1 else ''} of this "
            f"chat ({span}): it outgrew the context window]")
