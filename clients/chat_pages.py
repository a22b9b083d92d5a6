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
