"""Stored chats over HTTP: /api/chats (the History service) and POST /api/chats/{id}/messages,
which answers with the reply as server-sent events in /api/generate's format, after a first
`chat` event that names the committed messages.

A reply outlives its HTTP connection (the server keeps writing it when the client goes away):
each of its events carries an `id:`, GET .../messages/{message_id}/events with Last-Event-ID
picks it up after that event (History.WatchReply), POST .../stop ends it (History.StopReply)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web

from tokenwire import affinity
from tokenwire.bridge.credentials import grpc_metadata
from tokenwire.bridge.errors import ApiError, invalid_param
from tokenwire.bridge.fields import MAX_UINT32, SAMPLING, sampling, stop_strings
from tokenwire.bridge.image_fields import IMAGES, check_total, data_url, image_list
from tokenwire.bridge.params import Params, json_type
from tokenwire.bridge.proto_request import generate_request, request_id_for
from tokenwire.bridge.relay import note, relay_stream
from tokenwire.bridge.request_body import read_json_object
from tokenwire.bridge.sse import SSEWriter
from tokenwire.bridge.tool_fields import (
    MAX_TOOLS,
    PARALLEL_TOOL_CALLS,
    TOOL_CHOICE,
    TOOLS,
    apply_tools,
    tool_call_json,
)
from tokenwire.bridge.upstream import UPSTREAM
from tokenwire.enums import enum_name
from tokenwire.v1 import history_pb2 as hpb
from tokenwire.v1 import inference_pb2 as pb

from .stream import GENERATE_FIELDS, StreamEvents, usage_dict

# The request fields of each endpoint, with their schemas (the OpenAPI document publishes these).
# The server's limit on titles (chats/store.py counts them with runs of whitespace collapsed; the
# bridge counts them as sent, which a JSON Schema can state).
MAX_TITLE_CHARS = 200
# Not blank: the server refuses a title or message of whitespace only. A character outside both
# Python's whitespace (str.strip, the server's) and ECMA-262's (a JSON Schema pattern's \s): the
# same set in either regex dialect, and the bridge checks it with this very pattern.
_NOT_BLANK = r"[^\s\x1c-\x1f\x85\ufeff]"
CREATE_FIELDS: dict[str, Any] = {
    "title": {"type": "string", "maxLength": MAX_TITLE_CHARS,
              "description": "Absent or blank: the first user message."},
    "model": {"type": "string"},
    "system": {"type": "string", "description": "System prompt, kept in every turn's prompt."},
}
RENAME_FIELDS: dict[str, Any] = {"title": {"type": "string", "minLength": 1, "maxLength": MAX_TITLE_CHARS,
                                           "pattern": _NOT_BLANK}}
MESSAGE_FIELDS: dict[str, Any] = {
    "content": {"type": "string", "minLength": 1, "pattern": _NOT_BLANK,
                "description": "The user's new message. Absent (and no images): answer the chat's last user message again "
                               "(after a failed or interrupted reply; 400 when the chat does not end with one)."},
    "model": {"type": "string", "description": "Model id or alias; absent: the chat's model."},
    "tool_results": {
        "type": "array", "maxItems": MAX_TOOLS, "description": (
            "The results of the chat's last reply's tool calls, stored before `content` (which may then "
            "be absent: the model answers the results)."),
        "items": {"type": "object", "required": ["tool_call_id", "content"], "properties": {
            "tool_call_id": {"type": "string", "minLength": 1, "description": "The id of the call it answers."},
            "content": {"type": "string", "description": "What the tool returned."}}}},
    "images": IMAGES,
    "tools": TOOLS,
    "tool_choice": TOOL_CHOICE,
    "parallel_tool_calls": PARALLEL_TOOL_CALLS,
    **{name: GENERATE_FIELDS[name] for name in ("max_tokens", "stop", "keep_alive", "ignore_eos")},
    **SAMPLING,
}
_TIMEOUT_S = 30


def status_name(status: int) -> str:
    return enum_name(hpb.MessageStatus, status)


def chat_json(c: hpb.Chat) -> dict[str, Any]:
    return {"id": c.id, "title": c.title, "model": c.model, "created_ms": c.created_unix_ms,
            "updated_ms": c.updated_unix_ms, "message_count": c.message_count, "owner": c.owner}


def message_json(m: hpb.Message) -> dict[str, Any]:
    out: dict[str, Any] = {"id": m.id, "role": m.role, "content": m.content, "status": status_name(m.status),
                           "created_ms": m.created_unix_ms}
    if m.error_message:
        out["error_message"] = m.error_message
    if m.role == "assistant":
        out.update(model=m.model, usage=usage_dict(m.usage), dropped_messages=m.dropped_messages,
                   max_tokens=m.max_tokens or None)
    if m.tool_calls:
        out["tool_calls"] = [tool_call_json(c) for c in m.tool_calls]
    if m.role == "tool":
        out.update(tool_call_id=m.tool_call_id, name=m.name)
    if m.reasoning:
        out["reasoning"] = m.reasoning
    if m.images:
        out["images"] = [{"media_type": i.media_type, "text": i.text, "url": data_url(i.media_type, i.data)}
                         for i in m.images]
    return out


async def _history(request: web.Request, call: Callable[..., Awaitable[Any]], message: Any,
                   params: dict[str, str] | None = None, affinity_key: str = "") -> Any:
    """One History call; `params` renames the server's field names to this endpoint's (its errors'
    `param` names what the HTTP caller sent)."""
    upstream = request.app[UPSTREAM]
    try:
        return await call(message, timeout=_TIMEOUT_S, metadata=grpc_metadata(affinity_key))
    except grpc.aio.AioRpcError as exc:
        error = upstream.error(exc)
        error.param = (params or {}).get(error.param or "", error.param)
        raise error from exc


def _stub(request: web.Request):
    return request.app[UPSTREAM].history


async def list_chats(request: web.Request) -> web.Response:
    limit = _query_int(request, "limit", 1, 500)
    reply = await _history(request, _stub(request).ListChats, hpb.ListChatsRequest(
        page_size=limit or 0, page_token=request.query.get("cursor", "")), {"page_token": "cursor"})
    return web.json_response({"chats": [chat_json(c) for c in reply.chats],
                              "next_cursor": reply.next_page_token or None})


async def create_chat(request: web.Request) -> web.Response:
    p = Params(await read_json_object(request))
    p.check_known(CREATE_FIELDS)
    chat = await _history(request, _stub(request).CreateChat, hpb.CreateChatRequest(
        title=_title(p) or "", model=p.string("model") or "", system_prompt=p.string("system") or ""))
    note(request, chat=chat.id)
    return web.json_response(chat_json(chat), status=201)


async def get_chat(request: web.Request) -> web.Response:
    """The whole chat, read from the server a page at a time (a page stays under gRPC's limits)."""
    chat_id, token, messages = request.match_info["chat_id"], "", []
    while True:
        reply = await _history(request, _stub(request).GetChat, hpb.GetChatRequest(chat_id=chat_id, page_token=token))
        messages += [message_json(m) for m in reply.messages]
        token = reply.next_page_token
        if not token:
            return web.json_response({"chat": chat_json(reply.chat), "messages": messages})


async def rename_chat(request: web.Request) -> web.Response:
    p = Params(await read_json_object(request))
    p.check_known(RENAME_FIELDS)
    title = _title(p)
    if title is None:
        raise invalid_param("title", "title is required")
    if not re.search(_NOT_BLANK, title):
        raise invalid_param("title", "title must not be blank")
    chat = await _history(request, _stub(request).RenameChat, hpb.RenameChatRequest(
        chat_id=request.match_info["chat_id"], title=title))
    return web.json_response(chat_json(chat))


async def delete_chat(request: web.Request) -> web.Response:
    chat_id = request.match_info["chat_id"]
    # To the server that writes the chat's replies (a router hashes the key): it stops a reply being
    # written and deletes the chat's KV files.
    reply = await _history(request, _stub(request).DeleteChat, hpb.DeleteChatRequest(chat_id=chat_id),
                           affinity_key=affinity.for_chat(chat_id))
    return web.json_response({"id": chat_id, "deleted": True, "deleted_messages": reply.deleted_messages})


async def search_chats(request: web.Request) -> web.Response:
    query = request.query.get("q", "")
    if not query.strip():
        raise invalid_param("q", "q (the words to look for) is required")
    reply = await _history(request, _stub(request).SearchChats, hpb.SearchChatsRequest(
        query=query, limit=_query_int(request, "limit", 1, 100) or 0), {"query": "q"})
    return web.json_response({"results": [
        {"chat": chat_json(r.chat), "snippets": [
            {"message_id": s.message_id, "role": s.role,
             "spans": [{"text": t.text, "highlighted": t.highlighted} for t in s.spans]} for s in r.snippets]}
        for r in reply.results]})


async def export_chat(request: web.Request) -> web.Response:
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "markdown", "md"):
        raise invalid_param("format", f"format must be json or markdown, got {fmt!r}")
    ask = hpb.ExportChatRequest(chat_id=request.match_info["chat_id"],
                                format=hpb.EXPORT_FORMAT_JSON if fmt == "json" else hpb.EXPORT_FORMAT_MARKDOWN)
    # Streamed from the server in chunks (an export of any size), and on to the client as it comes.
    chunks = _stub(request).ExportChatStream(ask, timeout=_TIMEOUT_S, metadata=grpc_metadata())
    response: web.StreamResponse | None = None
    try:
        async for chunk in chunks:
            if response is None:
                response = web.StreamResponse(headers={
                    "Content-Type": f"{chunk.media_type}; charset=utf-8",
                    "Content-Disposition": f'attachment; filename="{chunk.filename}"'})
                await response.prepare(request)
            await response.write(chunk.content.encode())
    except grpc.aio.AioRpcError as exc:
        if response is None:  # nothing sent yet: the error is the answer
            raise request.app[UPSTREAM].error(exc) from exc
        raise  # cut mid-export: the client sees a truncated body, not a complete file
    if response is None:
        raise ApiError(502, "the model server sent an empty export", type="server_error", code="upstream_error")
    await response.write_eof()
    return response


class ChatEvents(StreamEvents):
    """/api/generate's events, after a first `chat` event."""

    async def chat(self, sse: SSEWriter, turn: pb.ChatTurn) -> None:
        note(self.request, chat=turn.chat_id, dropped=turn.dropped_messages)
        await sse.event("chat", {"chat_id": turn.chat_id, "user_message_id": turn.user_message_id,
                                 "reply_message_id": turn.reply_message_id,
                                 "dropped_messages": turn.dropped_messages})


def parse_message(body: dict[str, Any], chat_id: str, request_id: str) -> pb.GenerateRequest:
    p = Params(body)
    p.check_known(MESSAGE_FIELDS)
    content = p.string("content")
    if content is not None and not re.search(_NOT_BLANK, content):
        raise invalid_param("content", "content must not be empty (leave it out to answer the last message again)")
    messages = tool_results(p.raw("tool_results"))
    images = image_list(p.raw("images"), "images", data_url_only=True)
    if content is not None or images:
        messages.append(pb.ChatMessage(role="user", content=content or "", images=images))
    check_total(messages, "images")
    request = generate_request(
        request_id=request_id,
        model=p.string("model"),
        messages=messages,
        max_tokens=p.integer("max_tokens", 1, MAX_UINT32),
        stop=stop_strings(p),
        ignore_eos=bool(p.boolean("ignore_eos")),
        sampling=sampling(p, SAMPLING),
    )
    request.chat_id = chat_id
    apply_tools(request, p.raw("tools"), p.raw("tool_choice"), p.boolean("parallel_tool_calls"))
    keep_alive = p.number("keep_alive")
    if keep_alive is not None:
        request.keep_alive_s = keep_alive
    return request


def tool_results(value: Any) -> list[pb.ChatMessage]:
    """`tool_results`: `[{"tool_call_id", "content"}]` as tool messages."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid_param("tool_results", f"tool_results must be an array, got {json_type(value)}")
    if len(value) > MAX_TOOLS:
        raise invalid_param("tool_results", f"tool_results: at most {MAX_TOOLS}, got {len(value)}")
    out = []
    for i, result in enumerate(value):
        where = f"tool_results[{i}]"
        if not isinstance(result, dict):
            raise invalid_param(where, f"{where} must be an object, got {json_type(result)}")
        unknown = sorted(set(result) - {"tool_call_id", "content"})
        if unknown:
            raise invalid_param(f"{where}.{unknown[0]}", f"{where}: unknown field {unknown[0]!r}")
        call_id, text = result.get("tool_call_id"), result.get("content")
        if not isinstance(call_id, str) or not call_id:
            raise invalid_param(f"{where}.tool_call_id", f"{where}.tool_call_id must be the id of a call (a string)")
        if not isinstance(text, str):
            raise invalid_param(f"{where}.content", f"{where}.content must be a string")
        out.append(pb.ChatMessage(role="tool", tool_call_id=call_id, content=text))
    return out


def _message_id(request: web.Request) -> int:
    raw = request.match_info["message_id"]
    if not re.fullmatch(r"[0-9]{1,19}", raw) or not 0 < int(raw) < 1 << 63:
        raise invalid_param("message_id", f"message_id must be a message's id (a positive integer), got {raw!r}")
    return int(raw)


def last_event_id(request: web.Request) -> int:
    """The Last-Event-ID header (what EventSource sends when it reconnects), else the
    `last_event_id` query parameter; 0 (from the start) when neither is given."""
    header = request.headers.get("Last-Event-ID")
    name, raw = ("Last-Event-ID", header) if header is not None else ("last_event_id",
                                                                     request.query.get("last_event_id"))
    if raw is None or raw.strip() == "":
        return 0
    raw = raw.strip()
    if not re.fullmatch(r"[0-9]{1,19}", raw) or int(raw) >= 1 << 63:
        raise invalid_param(name, f"{name} must be the id of an event of the reply (an integer >= 0), got {raw!r}")
    return int(raw)


async def reply_events(request: web.Request) -> web.StreamResponse:
    """A reply's events after Last-Event-ID, then live to its end (the stream POST .../messages sent)."""
    chat_id, message_id = request.match_info["chat_id"], _message_id(request)
    after = last_event_id(request)
    note(request, chat=chat_id, message=message_id, after=after)
    call = request.app[UPSTREAM].watch_reply(hpb.WatchReplyRequest(chat_id=chat_id, message_id=message_id,
                                                                   after_event_id=after))
    return await relay_stream(request, call, ChatEvents(request))


async def stop_reply(request: web.Request) -> web.Response:
    """Stops a reply being written; answers the reply as stored (status stopped, or how it had ended)."""
    chat_id, message_id = request.match_info["chat_id"], _message_id(request)
    message = await _history(request, _stub(request).StopReply, hpb.StopReplyRequest(
        chat_id=chat_id, message_id=message_id), affinity_key=affinity.for_chat(chat_id))
    note(request, chat=chat_id, message=message_id, status=status_name(message.status))
    return web.json_response(message_json(message))


async def post_message(request: web.Request) -> web.StreamResponse:
    request_id = request_id_for(request)
    note(request, id=request_id)
    grpc_request = parse_message(await read_json_object(request), request.match_info["chat_id"], request_id)
    call = request.app[UPSTREAM].generate(grpc_request)
    return await relay_stream(request, call, ChatEvents(request), headers={"X-Request-Id": request_id})


def _title(p: Params) -> str | None:
    title = p.string("title")
    if title is not None and len(title) > MAX_TITLE_CHARS:
        raise invalid_param("title", f"title is {len(title)} characters; at most {MAX_TITLE_CHARS}")
    return title


def _query_int(request: web.Request, name: str, low: int, high: int) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise invalid_param(name, f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise invalid_param(name, f"{name} must be in [{low}, {high}], got {value}")
    return value


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/chats", list_chats)
    app.router.add_post("/api/chats", create_chat)
    app.router.add_get("/api/chats/search", search_chats)
    app.router.add_get("/api/chats/{chat_id}", get_chat)
    app.router.add_patch("/api/chats/{chat_id}", rename_chat)
    app.router.add_delete("/api/chats/{chat_id}", delete_chat)
    app.router.add_get("/api/chats/{chat_id}/export", export_chat)
    app.router.add_post("/api/chats/{chat_id}/messages", post_message)
    app.router.add_get("/api/chats/{chat_id}/messages/{message_id}/events", reply_events)
    app.router.add_post("/api/chats/{chat_id}/messages/{message_id}/stop", stop_reply)
