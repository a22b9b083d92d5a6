"""The OpenAPI description of /api/chats (routes/chats.py) and of API keys, added to openapi.DOCUMENT."""

from __future__ import annotations

from typing import Any

from tokenwire.bridge.openapi_parts import REQUEST_ID_HEADER, _errors, _json, _ref, _request, sse_event

from .chats import CREATE_FIELDS, MESSAGE_FIELDS, RENAME_FIELDS

_CHAT_ID = {"name": "chat_id", "in": "path", "required": True,
            "schema": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
            "description": "A chat id (16 hex characters); any other string answers 404 like a missing chat."}
_INT = {"type": "integer"}
_NOT_FOUND = ("No chat with this id among the caller's (another user's chat answers exactly the same; "
              "code chat_not_found).")
_MESSAGE_ID = {"name": "message_id", "in": "path", "required": True, "schema": {**_INT, "minimum": 1},
               "description": "The reply: the `chat` event's reply_message_id, or a stored message's id."}
_NO_MESSAGE = _NOT_FOUND + " Or no message of this id in the chat (code message_not_found)."


def _schemas() -> dict[str, Any]:
    return {
        "Chat": {"type": "object", "properties": {
            "id": {"type": "string"}, "title": {"type": "string"}, "model": {"type": "string"},
            "created_ms": _INT, "updated_ms": _INT, "message_count": _INT,
            "owner": {"type": "string", "description": "\"local\" on a server without API keys."}}},
        "StoredMessage": {"type": "object", "required": ["id", "role", "content", "status"], "properties": {
            "id": _INT, "role": {"enum": ["system", "user", "assistant"]}, "content": {"type": "string"},
            "status": {"enum": ["complete", "length", "stopped", "cancelled", "error", "pending", "interrupted"],
                       "description": "pending: being written now (follow it with GET .../messages/{message_id}/"
                                      "events; its content is what was saved so far); stopped: the user stopped it "
                                      "(POST .../stop); cancelled: the server did (no client watched it for "
                                      "--detached-reply-s, or shutdown; error_message says why); interrupted: "
                                      "the server died while writing it."},
            "error_message": {"type": "string"}, "created_ms": _INT, "model": {"type": "string"},
            "usage": _ref("Usage"), "dropped_messages": _INT, "max_tokens": {"type": ["integer", "null"]}}},
        "CreateChatRequest": _request(CREATE_FIELDS),
        "RenameChatRequest": _request(RENAME_FIELDS, "title"),
        "ChatMessageRequest": _request(MESSAGE_FIELDS),
        "ChatEvent": {"type": "object", "properties": {
            "chat_id": {"type": "string"}, "user_message_id": _INT, "reply_message_id": _INT,
            "dropped_messages": {**_INT, "description": "Oldest messages left out of the prompt because the chat "
                                                        "no longer fits the context window (system prompt kept)."}}},
        "SearchResult": {"type": "object", "properties": {
            "chat": _ref("Chat"),
            "snippets": {"type": "array", "items": {"type": "object", "properties": {
                "message_id": _INT, "role": {"type": "string"},
                "spans": {"type": "array", "items": {"type": "object", "properties": {
                    "text": {"type": "string"}, "highlighted": {"type": "boolean"}}}}}}}}},
    }


def _paths() -> dict[str, Any]:
    chat_body = {"required": True, "content": {"application/json": {"schema": _ref("ChatMessageRequest")}}}
    return {
        "/api/chats": {
            "get": {"summary": "The caller's chats, most recently active first.",
                    "parameters": [
                        {"name": "limit", "in": "query", "schema": {**_INT, "minimum": 1, "maximum": 500}},
                        {"name": "cursor", "in": "query", "schema": {"type": "string"},
                         "description": "next_cursor of the previous page."}],
                    "responses": {"200": _json({"type": "object", "properties": {
                        "chats": {"type": "array", "items": _ref("Chat")},
                        "next_cursor": {"type": ["string", "null"]}}}), **_errors(400, 401, 503)}},
            "post": {"summary": "Create a chat (send its messages with POST /api/chats/{chat_id}/messages).",
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": _ref("CreateChatRequest")}}},
                     "responses": {"201": _json(_ref("Chat"), "Created."), **_errors(400, 401, 415, 503)}},
        },
        "/api/chats/search": {"get": {
            "summary": "The caller's chats whose messages contain every word of q (the last one as a prefix), "
                       "best first, with highlighted snippets.",
            # No pattern: a word is a Unicode letter or digit (Python's \w), which ECMA-262's \w is not.
            "parameters": [{"name": "q", "in": "query", "required": True, "schema": {"type": "string", "minLength": 1},
                            "description": "At least one word (Unicode letters or digits; else 400); punctuation "
                                           "is ignored."},
                           {"name": "limit", "in": "query", "schema": {**_INT, "minimum": 1, "maximum": 100}}],
            "responses": {"200": _json({"type": "object", "properties": {
                "results": {"type": "array", "items": _ref("SearchResult")}}}), **_errors(400, 401, 503)}}},
        "/api/chats/{chat_id}": {
            "get": {"summary": "A chat and all its messages, oldest first.", "parameters": [_CHAT_ID],
                    "responses": {"200": _json({"type": "object", "properties": {
                        "chat": _ref("Chat"), "messages": {"type": "array", "items": _ref("StoredMessage")}}}),
                        "404": _json(_ref("Error"), _NOT_FOUND), **_errors(401, 503)}},
            "patch": {"summary": "Rename a chat.", "parameters": [_CHAT_ID],
                      "requestBody": {"required": True, "content": {"application/json": {
                          "schema": _ref("RenameChatRequest")}}},
                      "responses": {"200": _json(_ref("Chat")), "404": _json(_ref("Error"), _NOT_FOUND),
                                    **_errors(400, 401, 415, 503)}},
            "delete": {"summary": "Delete a chat and its messages.", "parameters": [_CHAT_ID],
                       "responses": {"200": _json({"type": "object", "properties": {
                           "id": {"type": "string"}, "deleted": {"const": True}, "deleted_messages": _INT}}),
                           "404": _json(_ref("Error"), _NOT_FOUND), **_errors(401, 503)}},
        },
        "/api/chats/{chat_id}/export": {"get": {
            "summary": "A chat as a JSON document or a Markdown transcript (a download).",
            "parameters": [_CHAT_ID, {"name": "format", "in": "query",
                                      "schema": {"enum": ["json", "markdown", "md"], "default": "json"}}],
            "responses": {"200": {"description": "The file (Content-Disposition: attachment).",
                                  "content": {"application/json": {}, "text/markdown": {}}},
                          "404": _json(_ref("Error"), _NOT_FOUND), **_errors(400, 401, 503)}}},
        "/api/chats/{chat_id}/messages/{message_id}/events": {"get": {
            "summary": "Follow a reply being written (status pending) again, after a reload or a dropped "
                       "connection: its events after Last-Event-ID (all of them without one), then the next ones "
                       "as they come, to `done`; every event carries its `id:`. Watching keeps the reply going; "
                       "leaving only stops watching. A reply that ended can be followed to its end for 30 s more.",
            "parameters": [
                _CHAT_ID, _MESSAGE_ID,
                {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string", "pattern": "^[0-9]+$"},
                 "description": "The id of the last event the client has (EventSource sends it when it reconnects)."},
                {"name": "last_event_id", "in": "query", "schema": {**_INT, "minimum": 0},
                 "description": "The same, for clients that cannot set the header (the header wins)."}],
            "responses": {"200": {
                "description": "text/event-stream: the very events POST /api/chats/{chat_id}/messages sent, with the "
                               "same ids.",
                "content": {"text/event-stream": {"schema": sse_event(
                    "started", "chat", "queued", "token", "tool_call", "done", "error",
                    data="The event's object as JSON.")}}},
                "404": _json(_ref("Error"), _NO_MESSAGE),
                "409": _json(_ref("Error"), "The reply is no longer being written (code reply_finished): read it "
                                            "with GET /api/chats/{chat_id}."),
                **_errors(400, 401, 503)}}},
        "/api/chats/{chat_id}/messages/{message_id}/stop": {"post": {
            "summary": "Stop a reply being written, at once. It is stored as far as it went (status stopped) "
                       "before the answer, which is the stored reply; a reply that had ended already is answered "
                       "as it is stored. Its streams end with `done` (finish_reason cancelled).",
            "parameters": [_CHAT_ID, _MESSAGE_ID],
            "responses": {"200": _json(_ref("StoredMessage")), "404": _json(_ref("Error"), _NO_MESSAGE),
                          **_errors(400, 401, 503)}}},
        "/api/chats/{chat_id}/messages": {"post": {
            "summary": "Add the user's message to a chat and stream the model's reply, with the whole chat as "
                       "context. The message is stored before generation starts; the reply when it ends, "
                       "with its status. The reply goes on when the client goes away: every event carries an "
                       "`id:` to resume after with GET .../messages/{message_id}/events; POST .../stop stops it; "
                       "a reply nobody follows is stopped after the server's --detached-reply-s (60 s).",
            "parameters": [_CHAT_ID, REQUEST_ID_HEADER],
            "requestBody": chat_body,
            "responses": {"200": {
                "description": "text/event-stream: the events of /api/generate with a `chat` (ChatEvent) right after "
                               "`started`: `started`, `chat`, `queued`, `token`, `tool_call` (ToolCallEvent: a call of "
                               "the request's tools, its id and name, then its arguments), `done` (DoneEvent), or "
                               "`error`.",
                "headers": {"X-Request-Id": {"schema": {"type": "string"}}},
                "content": {"text/event-stream": {"schema": sse_event(
                    "started", "chat", "queued", "token", "tool_call", "done", "error",
                    data="The event's object as JSON (see the description).")}}},
                "404": _json(_ref("Error"), _NOT_FOUND + " Or an unknown model (model_not_found)."),
                **_errors(400, 401, 413, 415, 429, 503)}}},
    }


def add_chat_docs(document: dict[str, Any]) -> None:
    components = document["components"]
    components["schemas"].update(_schemas())
    components["responses"]["E401"] = _json(
        _ref("Error"), "The server has API keys and the request carried none, or an invalid or revoked one "
                       "(send Authorization: Bearer <key>; code invalid_api_key).")
    components.setdefault("securitySchemes", {})["apiKey"] = {
        "type": "http", "scheme": "bearer",
        "description": "Needed once the server has API keys (`tokenwire keys create NAME`); the bridge passes "
                       "it on to the gRPC server with every call, /v1 endpoints included."}
    document["security"] = [{}, {"apiKey": []}]
    document["paths"].update(_paths())


# The request fields each endpoint accepts are exactly the documented ones (checked by tests).
DOCUMENTED_FIELDS = {"CreateChatRequest": CREATE_FIELDS, "RenameChatRequest": RENAME_FIELDS,
                     "ChatMessageRequest": MESSAGE_FIELDS}
