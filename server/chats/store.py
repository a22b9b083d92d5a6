"""ChatStore: users' chats and messages over the peewee models (synchronous; see ChatWorker).

Every operation on a chat takes the caller's user id and finds the chat among that user's
only, so another user's chat is indistinguishable from one that does not exist (ChatNotFound).
Records leave the store as plain dataclasses: no lazy peewee access escapes to other threads.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any

import peewee as pw

from tokenwire.server.engine.records import ROLES, ReplyStatus, Usage

from . import search as chat_search
from .db import (
    Chat,
    Message,
    MessageImage,
    ServerLease,
    User,
    describe,
    is_postgres,
    is_sqlite,
    now_ms,
    open_database,
    write_transaction,
)

STATUSES = tuple(s.value for s in ReplyStatus)
FINISHED_STATUSES = tuple(s.value for s in ReplyStatus if s.finished)
_USAGE_COLUMNS = Usage.field_names()  # Message has a column of the same name for each
LOCAL_USER = "local"
MAX_TITLE_CHARS = 200
AUTO_TITLE_CHARS = 60
MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50
MAX_SEARCH_RESULTS = 100
DEFAULT_MESSAGE_PAGE, MAX_MESSAGE_PAGE = 200, 1000
MESSAGE_PAGE_BYTES = 2 << 20  # a page of GetChat ends before this much text (gRPC's limit is 4 MiB)
DEFAULT_MAX_CHAT_BYTES = 16 << 20
SNIPPETS_PER_CHAT = 3
INTERRUPTED_MESSAGE = "the server stopped before this reply was finished"
# A server renews its lease every LEASE_RENEW_S; one whose lease is older than LEASE_S is gone
# (on the same host, a server whose process has exited is gone at once).
LEASE_RENEW_S = 15.0
LEASE_S = 60.0


class ChatNotFound(LookupError):
    field = "chat_id"

    def __init__(self, chat_id: str) -> None:
        super().__init__(f"chat {chat_id!r} not found")
        self.chat_id = chat_id


class ChatRequestError(ValueError):
    """The request cannot be done as asked; the message says why and `field` names the request
    field at fault ("" when none does)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class ChatTooLarge(ChatRequestError):
    """The chat would pass the server's size cap (--max-chat-bytes) with this message."""

    reason = "CHAT_TOO_LARGE"


@dataclass
class ChatInfo:
    id: str
    title: str
    model: str
    created_ms: int
    updated_ms: int
    message_count: int
    owner: str


@dataclass
class MessageInfo:
    id: int
    chat_id: str
    role: str
    content: str
    status: str
    created_ms: int
    error_message: str = ""
    model: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    dropped_messages: int = 0
    tool_calls: list[dict[str, str]] = field(default_factory=list)  # [{"id", "name", "arguments"}]
    tool_call_id: str = ""  # a tool result: the call it answers
    name: str = ""  # a tool result: the function's name
    reasoning: str = ""  # a reply's thinking, apart from its content
    images: list[dict[str, Any]] = field(default_factory=list)  # [{"data", "media_type", "text"}]


@dataclass
class TurnStart:
    """A chat turn begun: the messages to prompt with and the ids of what was committed."""

    chat: ChatInfo
    context: list[dict[str, Any]]  # every message with text or calls, oldest first, the new ones included
    user_message_id: int  # the last new message committed (a user message, or a tool result); 0: none
    reply_message_id: int


@dataclass
class ReplyOutcome:
    """How a reply ended, as it is stored."""

    content: str
    status: str  # a finished ReplyStatus
    error_message: str = ""
    usage: Usage = field(default_factory=Usage)
    dropped_messages: int = 0
    reasoning: str = ""
    tool_calls: list[dict[str, str]] = field(default_factory=list)  # [{"id", "name", "arguments"}]


@dataclass
class SearchSnippet:
    message_id: int
    role: str
    spans: list[chat_search.Span]


@dataclass
class SearchResult:
    chat: ChatInfo
    snippets: list[SearchSnippet]


def auto_title(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= AUTO_TITLE_CHARS else flat[: AUTO_TITLE_CHARS - 1].rstrip() + "…"


def encode_cursor(updated_ms: int, row_id: int) -> str:
    return base64.urlsafe_b64encode(f"{updated_ms}:{row_id}".encode()).decode().rstrip("=")


def decode_cursor(token: str) -> tuple[int, int]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        updated, row = (int(part) for part in raw.split(":"))
        if not (0 <= updated < 1 << 63 and 0 <= row < 1 << 63):  # SQLite's INTEGER; bigger ones overflowed
            raise ValueError("out of range")
        return updated, row
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ChatRequestError("page_token is not one this server gave out", "page_token") from None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


class ChatStore:
    def __init__(self, target: str | None = None, instance: str = "") -> None:
        self.db = open_database(target)
        self.fts = is_sqlite(self.db)
        self.pg = is_postgres(self.db)
        self.interrupted_at_start = 0  # set by whoever runs mark_interrupted at start-up
        self.max_chat_bytes = DEFAULT_MAX_CHAT_BYTES  # a chat's messages, in UTF-8 bytes; 0: no cap
        self.host, self.pid = socket.gethostname()[:255], os.getpid()
        # This process's name in the database: the writer of the replies it begins.
        self.instance = instance or f"{self.host[:60]}:{self.pid}:{secrets.token_hex(4)}"

    def describe(self) -> str:
        return describe(self.db)

    def close(self) -> None:
        if not self.db.is_closed():
            self.db.close()

    # ---- users ---------------------------------------------------------------------------------

    def find_user(self, name: str) -> int | None:
        user = User.get_or_none(User.name == name)
        return None if user is None else user.id

    def ensure_user(self, name: str) -> int:
        """The id of the user with this name, created if new."""
        user = User.get_or_none(User.name == name)
        if user is not None:
            return user.id
        with write_transaction(self.db):
            user, _ = User.get_or_create(name=name)
        return user.id

    # ---- chats ---------------------------------------------------------------------------------

    def _chat(self, user_id: int, chat_id: str, lock: bool = False) -> Chat:
        """The user's chat; `lock` (inside a write transaction): its row is locked until the commit, so
        writers on other connections (replicas sharing a PostgreSQL) add its messages one at a time.
        SQLite needs no row lock: its write transactions exclude each other (BEGIN IMMEDIATE)."""
        query = Chat.select().where((Chat.public_id == chat_id) & (Chat.owner == user_id))
        chat = (query.for_update() if lock and self.pg else query).first()
        if chat is None:
            raise ChatNotFound(chat_id)
        return chat

    def _info(self, chat: Chat, message_count: int | None = None) -> ChatInfo:
        if message_count is None:
            message_count = Message.select().where(Message.chat == chat.id).count()
        owner = getattr(chat, "owner_name", None) or User.get_by_id(chat.owner_id).name
        return ChatInfo(chat.public_id, chat.title, chat.model, chat.created_ms, chat.updated_ms, message_count, owner)

    def _chats_query(self, user_id: int):
        count = pw.fn.COUNT(Message.id).alias("message_count")
        return (
            Chat.select(Chat, count, User.name.alias("owner_name"))
            .join(User, on=(Chat.owner == User.id))
            .switch(Chat)
            .join(Message, pw.JOIN.LEFT_OUTER, on=(Message.chat == Chat.id))
            .where(Chat.owner == user_id)
            .group_by(Chat.id, User.name)
            .objects()
        )

    def create_chat(self, user_id: int, title: str = "", model: str = "", system_prompt: str = "") -> ChatInfo:
        title = self._clean_title(title) if title.strip() else ""
        with write_transaction(self.db):
            chat = Chat.create(public_id=secrets.token_hex(8), owner=user_id, title=title, model=model)
            count = 0
            if system_prompt.strip():
                Message.create(chat=chat, seq=1, role="system", content=system_prompt, status="complete")
                count = 1
        return self._info(chat, count)

    def list_chats(self, user_id: int, page_size: int = 0, page_token: str = "") -> tuple[list[ChatInfo], str]:
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        query = self._chats_query(user_id)
        if page_token:
            updated, row = decode_cursor(page_token)
            query = query.where((Chat.updated_ms < updated) | ((Chat.updated_ms == updated) & (Chat.id < row)))
        rows = list(query.order_by(Chat.updated_ms.desc(), Chat.id.desc()).limit(size + 1))
        chats = [self._info(c, c.message_count) for c in rows[:size]]
        next_token = encode_cursor(rows[size - 1].updated_ms, rows[size - 1].id) if len(rows) > size else ""
        return chats, next_token

    def get_chat(self, user_id: int, chat_id: str) -> tuple[ChatInfo, list[MessageInfo]]:
        chat = self._chat(user_id, chat_id)
        rows = list(chat.messages.order_by(Message.seq))
        images = _images_of(rows)
        messages = [self._message(m, chat_id, images.get(m.id)) for m in rows]
        return self._info(chat, len(messages)), messages

    def get_chat_page(self, user_id: int, chat_id: str, page_size: int = 0,
                      page_token: str = "") -> tuple[ChatInfo, list[MessageInfo], str]:
        """A chat's messages from page_token on, oldest first: at most page_size of them and, past
        the first, no more than MESSAGE_PAGE_BYTES of text; and the token of the next page ("": last)."""
        chat = self._chat(user_id, chat_id)
        size = min(page_size or DEFAULT_MESSAGE_PAGE, MAX_MESSAGE_PAGE)
        query = chat.messages.order_by(Message.seq)
        if page_token:
            after_seq, _ = decode_cursor(page_token)
            query = query.where(Message.seq > after_seq)
        messages: list[MessageInfo] = []
        used, last_seq, more = 0, 0, False
        rows = list(query.limit(size + 1))
        images = _images_of(rows)
        for row in rows:
            weight = (len(row.content.encode()) + len(row.error_message.encode()) + len(row.params) + 256
                      + sum(len(i["data"]) + len(i["text"].encode()) for i in images.get(row.id, ())))
            if len(messages) == size or (messages and used + weight > MESSAGE_PAGE_BYTES):
                more = True
                break
            messages.append(self._message(row, chat_id, images.get(row.id)))
            used, last_seq = used + weight, row.seq
        token = encode_cursor(last_seq, messages[-1].id) if more else ""
        return self._info(chat), messages, token

    def chat_info(self, user_id: int, chat_id: str) -> ChatInfo:
        return self._info(self._chat(user_id, chat_id))

    def message_of(self, user_id: int, chat_id: str, message_id: int) -> MessageInfo | None:
        """One message of one of the user's chats (ChatNotFound for another user's chat); None
        when the chat has no such message."""
        chat = self._chat(user_id, chat_id)
        row = chat.messages.where(Message.id == message_id).first()
        if row is None:
            return None
        return self._message(row, chat_id, _images_of([row]).get(row.id))

    def last_chat(self, user_id: int) -> ChatInfo | None:
        chats, _ = self.list_chats(user_id, 1)
        return chats[0] if chats else None

    def rename_chat(self, user_id: int, chat_id: str, title: str) -> ChatInfo:
        clean = self._clean_title(title)
        with write_transaction(self.db):
            chat = self._chat(user_id, chat_id, lock=True)
            chat.title = clean
            chat.updated_ms = now_ms()
            chat.save()
        return self._info(chat)

    def delete_chat(self, user_id: int, chat_id: str) -> int:
        with write_transaction(self.db):
            chat = self._chat(user_id, chat_id, lock=True)
            deleted = Message.delete().where(Message.chat == chat.id).execute()
            chat.delete_instance()
        return deleted

    @staticmethod
    def _clean_title(title: str) -> str:
        clean = " ".join(title.split())
        if not clean:
            raise ChatRequestError("title must not be empty", "title")
        if len(clean) > MAX_TITLE_CHARS:
            raise ChatRequestError(f"title is {len(clean)} characters; at most {MAX_TITLE_CHARS}", "title")
        return clean

    # ---- messages ------------------------------------------------------------------------------

    @staticmethod
    def _message(m: Message, chat_id: str, images: list[dict[str, Any]] | None = None) -> MessageInfo:
        try:
            params = json.loads(m.params) if m.params else {}
        except json.JSONDecodeError:
            params = {}
        return MessageInfo(
            id=m.id, chat_id=chat_id, role=m.role, content=m.content, status=m.status, created_ms=m.created_ms,
            error_message=m.error_message, model=m.model, params=params,
            usage=Usage(**{name: getattr(m, name) for name in _USAGE_COLUMNS}), dropped_messages=m.dropped_messages,
            tool_calls=_stored_calls(m.tool_calls), tool_call_id=m.tool_call_id, name=m.name, reasoning=m.reasoning,
            images=images or [],
        )

    @staticmethod
    def _check_role(role: str) -> None:
        if role not in ROLES:
            raise ChatRequestError(f"role must be one of {', '.join(ROLES)}, got {role!r}", "role")

    def _next_seq(self, chat: Chat) -> int:
        return (Message.select(pw.fn.MAX(Message.seq)).where(Message.chat == chat.id).scalar() or 0) + 1

    def _add(self, chat: Chat, role: str, content: str, status: str = "complete", **fields: Any) -> Message:
        message = Message.create(chat=chat, seq=self._next_seq(chat), role=role, content=content, status=status,
                                 **fields)
        if role == "user" and not chat.title:
            chat.title = auto_title(content)
        chat.updated_ms = now_ms()
        chat.save()
        return message

    def _chat_bytes(self, chat: Chat) -> int:
        length = (pw.fn.LENGTH(pw.Cast(Message.content, "BLOB")) if self.fts
                  else pw.fn.OCTET_LENGTH(Message.content))
        text = int(Message.select(pw.fn.SUM(length)).where(Message.chat == chat.id).scalar() or 0)
        image_length = pw.fn.LENGTH(MessageImage.data) if self.fts else pw.fn.OCTET_LENGTH(MessageImage.data)
        images = (MessageImage.select(pw.fn.SUM(image_length)).join(Message)
                  .where(Message.chat == chat.id).scalar() or 0)
        return text + int(images)

    def _check_size(self, chat: Chat, adding: list[str], field_name: str, image_bytes: int = 0) -> None:
        """Refuses what would take the chat past max_chat_bytes (checked as messages are added; a
        reply may pass it by its own length)."""
        if not self.max_chat_bytes:
            return
        new = sum(len(text.encode()) for text in adding) + image_bytes
        used = self._chat_bytes(chat)
        if used + new > self.max_chat_bytes:
            raise ChatTooLarge(
                f"this chat holds {used / 2**20:.1f} MiB of messages and the server keeps at most "
                f"{self.max_chat_bytes / 2**20:.1f} MiB per chat (--max-chat-bytes); start a new chat", field_name)

    def append_message(self, user_id: int, chat_id: str, role: str, content: str) -> MessageInfo:
        self._check_role(role)
        if role == "tool":
            raise ChatRequestError("a tool result answers a call: send it in a turn (Generate with chat_id, "
                                   "a message with role tool and tool_call_id)", "role")
        if not content:
            raise ChatRequestError("content must not be empty", "content")
        with write_transaction(self.db):
            chat = self._chat(user_id, chat_id, lock=True)
            self._check_size(chat, [content], "content")
            message = self._add(chat, role, content)
        return self._message(message, chat_id)

    def _turn_context(self, chat: Chat, existing: list[Message], new_messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Checks a turn's new messages against the chat; the context it would prompt with."""
        calls = {c["id"]: c["name"] for m in existing for c in _stored_calls(m.tool_calls)}
        # The new messages' calls, read once: a call sent without an id gets one here, and the same one
        # in the prompt, in what a later result may name, and in what begin_turn stores.
        new_calls = [_request_calls(m) for m in new_messages]
        for i, (m, own) in enumerate(zip(new_messages, new_calls, strict=True)):
            self._check_role(m.get("role", ""))
            if m["role"] == "tool":
                call_id = m.get("tool_call_id") or ""
                if call_id not in calls:
                    raise ChatRequestError(
                        f"messages[{i}].tool_call_id {call_id!r} names no tool call of this chat" if call_id else
                        f"messages[{i}]: a tool result needs the tool_call_id of the call it answers",
                        f"messages[{i}].tool_call_id")
            elif not m.get("content") and not (m["role"] == "assistant" and m.get("tool_calls")) \
                    and not (m["role"] == "user" and m.get("images")):
                raise ChatRequestError(f"messages[{i}].content must not be empty", f"messages[{i}].content")
            calls.update((c["id"], c["name"]) for c in own)
        if any(m["role"] == "system" for m in new_messages) and existing:
            raise ChatRequestError("a system message can only start a chat; this chat has messages already", "messages")
        self._check_size(chat, [_message_text(m, own) for m, own in zip(new_messages, new_calls, strict=True)],
                         "messages",
                         sum(len(i["data"]) for m in new_messages for i in m.get("images") or ()))
        kept = [m for m in existing if m.status != "pending" and (m.content or m.tool_calls or m.role == "tool")]
        images = _images_of(kept, with_data=False)  # the prompt needs an image's text, not its bytes
        context = [_context_message(m.role, m.content, _stored_calls(m.tool_calls), m.tool_call_id, m.name,
                                    images.get(m.id)) for m in kept]
        context += [_context_message(m["role"], m.get("content") or "", own, m.get("tool_call_id", ""),
                                     m.get("name") or calls.get(m.get("tool_call_id", ""), ""), m.get("images"))
                    for m, own in zip(new_messages, new_calls, strict=True)]
        if not context or context[-1]["role"] not in ("user", "tool"):
            raise ChatRequestError("nothing to answer: send a user message or tool results (the chat ends with "
                                   "neither)", "messages")
        return context

    def preview_turn(self, user_id: int, chat_id: str, new_messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """What begin_turn would prompt with, checked the same way, writing nothing: so a turn the
        model cannot take (too long for its context) is refused before anything is committed."""
        chat = self._chat(user_id, chat_id)
        return self._turn_context(chat, list(chat.messages.order_by(Message.seq)), new_messages)

    def begin_turn(
        self, user_id: int, chat_id: str, new_messages: list[dict[str, str]], model: str,
        params: dict[str, Any] | None = None,
    ) -> TurnStart:
        """Commits the new messages and a pending reply (in one transaction); returns the chat's
        messages to prompt with. No new messages: answers the chat's last user message again."""
        with write_transaction(self.db):
            chat = self._chat(user_id, chat_id, lock=True)
            existing = list(chat.messages.order_by(Message.seq))
            context = self._turn_context(chat, existing, new_messages)
            user_message_id = 0
            for m, said in zip(new_messages, context[len(context) - len(new_messages):], strict=True):
                added = self._add(chat, m["role"], said["content"], tool_call_id=said.get("tool_call_id", ""),
                                  name=said.get("name", ""), tool_calls=_calls_json(_context_calls(said)))
                for position, image in enumerate(m.get("images") or ()):
                    MessageImage.create(message=added, position=position, media_type=image.get("media_type", ""),
                                        data=image["data"], text=image.get("text", ""))
                existing.append(added)
                user_message_id = added.id
            chat.model = model
            reply = self._add(chat, "assistant", "", status="pending", model=model,
                              params=json.dumps(params or {}, sort_keys=True), writer=self.instance)
        return TurnStart(self._info(chat, len(existing) + 1), context, user_message_id, reply.id)

    def finish_reply(self, reply_id: int, outcome: ReplyOutcome) -> bool:
        """Stores how a pending reply ended; False when it was no longer pending (stored already,
        or its chat deleted meanwhile)."""
        if outcome.status not in FINISHED_STATUSES:
            raise ValueError(f"not a finished status: {outcome.status!r}")
        with write_transaction(self.db):
            updated = Message.update(
                content=outcome.content, status=ReplyStatus(outcome.status).value, error_message=outcome.error_message,
                dropped_messages=outcome.dropped_messages, reasoning=outcome.reasoning,
                tool_calls=_calls_json(outcome.tool_calls),
                **{name: getattr(outcome.usage, name) for name in _USAGE_COLUMNS},
            ).where((Message.id == reply_id) & (Message.status == ReplyStatus.PENDING.value)).execute()
            if updated:
                Chat.update(updated_ms=now_ms()).where(
                    Chat.id == Message.select(Message.chat).where(Message.id == reply_id)).execute()
        return bool(updated)

    def save_partial(self, reply_id: int, content: str, reasoning: str = "") -> bool:
        """The text of a reply still being written, so a crash loses at most what came since;
        False when it is no longer pending (finished meanwhile: the final text wins)."""
        with write_transaction(self.db):
            return bool(Message.update(content=content, reasoning=reasoning).where(
                (Message.id == reply_id) & (Message.status == ReplyStatus.PENDING.value)).execute())

    def renew_lease(self) -> None:
        """Says this server is alive (at start-up, then every LEASE_RENEW_S): the replies it is
        writing stay pending while other servers sharing the database start and stop."""
        with write_transaction(self.db):
            ServerLease.insert(instance=self.instance, host=self.host, pid=self.pid, heartbeat_ms=now_ms()).on_conflict(
                conflict_target=[ServerLease.instance], update={ServerLease.heartbeat_ms: now_ms()}).execute()

    def end_lease(self) -> None:
        """At a clean stop, after the last reply was stored."""
        with write_transaction(self.db):
            ServerLease.delete().where(ServerLease.instance == self.instance).execute()

    def _live_writers(self) -> list[str]:
        """Other servers holding a lease: renewed within LEASE_S and, on this host, still running."""
        oldest = now_ms() - int(LEASE_S * 1000)
        return [lease.instance for lease in ServerLease.select()
                if lease.instance != self.instance and lease.heartbeat_ms >= oldest
                and (lease.host != self.host or _process_alive(lease.pid))]

    def mark_interrupted(self, own: bool = True) -> int:
        """Marks interrupted the pending replies nobody is writing any more: those of servers whose
        lease ran out or whose process is gone, those of servers before leases (no writer), and
        (own=True, at start-up) this process's own. Replies another running server is writing
        stay pending. Run at start-up, and (own=False) with each lease renewal: a server sharing
        the database died."""
        with write_transaction(self.db):
            live = self._live_writers() + ([] if own else [self.instance])
            query = Message.update(status="interrupted", error_message=INTERRUPTED_MESSAGE).where(
                Message.status == "pending")
            if live:
                query = query.where(Message.writer.not_in(live))
            marked = query.execute()
            ServerLease.delete().where(ServerLease.instance.not_in([*live, self.instance])).execute()
        return marked

    # ---- search --------------------------------------------------------------------------------

    def search(self, user_id: int, query: str, limit: int = 0) -> list[SearchResult]:
        limit = min(limit or 20, MAX_SEARCH_RESULTS)
        terms = chat_search.query_terms(query)
        if not terms:
            raise ChatRequestError("query must contain at least one word", "query")
        if self.fts:
            hits = self._fts_hits(user_id, terms, limit)
        elif self.pg:
            hits = self._pg_hits(user_id, terms, limit)
        else:
            hits = self._like_hits(user_id, terms, limit)
        results: dict[int, SearchResult] = {}
        infos = self._chats_by_row_id(user_id, {chat_row for chat_row, *_ in hits})
        for chat_row, message_id, role, spans in hits:
            if chat_row not in infos:
                continue
            result = results.setdefault(chat_row, SearchResult(infos[chat_row], []))
            if len(result.snippets) < SNIPPETS_PER_CHAT:
                result.snippets.append(SearchSnippet(message_id, role, spans))
        return list(results.values())[:limit]

    def _chats_by_row_id(self, user_id: int, rows: set[int]) -> dict[int, ChatInfo]:
        if not rows:
            return {}
        found = self._chats_query(user_id).where(Chat.id.in_(list(rows)))
        return {c.id: self._info(c, c.message_count) for c in found}

    def _fts_hits(self, user_id: int, terms: list[str], limit: int) -> list[tuple[int, int, str, list]]:
        """FTS5 finds and ranks the messages; the snippet is cut here, from a bounded window around
        the first match (FTS5's snippet() is quadratic in a message's matches: one long message of
        one repeated word held a database thread for minutes, found by tests/api/test_fuzz_grpc.py)."""
        sql = (
            "SELECT m.chat_id, m.id, m.role, m.content "
            "FROM message_fts JOIN message AS m ON m.id = message_fts.rowid "
            "JOIN chat AS c ON c.id = m.chat_id "
            "WHERE message_fts MATCH ? AND c.owner_id = ? ORDER BY rank LIMIT ?"
        )
        params = (chat_search.fts_query(terms), user_id, limit * SNIPPETS_PER_CHAT * 4)
        rows = self.db.execute_sql(sql, params).fetchall()
        return [(chat_row, mid, role, chat_search.spans_by_scan(content, terms)) for chat_row, mid, role, content in rows]

    def _pg_hits(self, user_id: int, terms: list[str], limit: int) -> list[tuple[int, int, str, list]]:
        """PostgreSQL's own search: the GIN-indexed tsvector column, ranked, with ts_headline snippets."""
        options = (f"StartSel={chat_search.MARK_OPEN}, StopSel={chat_search.MARK_CLOSE}, "
                   f"MaxWords={2 * chat_search.SNIPPET_TOKENS}, MinWords={chat_search.SNIPPET_TOKENS // 2}, "
                   f"FragmentDelimiter={chat_search.ELLIPSIS}, MaxFragments=2")
        sql = (
            "SELECT m.chat_id, m.id, m.role, ts_headline('simple', m.content, q, %s) "
            "FROM message AS m JOIN chat AS c ON c.id = m.chat_id, to_tsquery('simple', %s) AS q "
            "WHERE m.content_tsv @@ q AND c.owner_id = %s "
            "ORDER BY ts_rank(m.content_tsv, q) DESC, c.updated_ms DESC LIMIT %s"
        )
        rows = self.db.execute_sql(sql, (options, chat_search.tsquery(terms), user_id,
                                         limit * SNIPPETS_PER_CHAT * 4)).fetchall()
        return [(chat_row, mid, role, chat_search.spans_from_marked(marked)) for chat_row, mid, role, marked in rows]

    def _like_hits(self, user_id: int, terms: list[str], limit: int) -> list[tuple[int, int, str, list]]:
        condition = Chat.owner == user_id
        for term in terms:
            condition &= Message.content.contains(term)  # ILIKE on PostgreSQL
        query = (Message.select(Message.chat, Message.id, Message.role, Message.content)
                 .join(Chat, on=(Message.chat == Chat.id)).where(condition)
                 .order_by(Chat.updated_ms.desc(), Message.seq.desc()).limit(limit * SNIPPETS_PER_CHAT * 4))
        return [(m.chat_id, m.id, m.role, chat_search.spans_by_scan(m.content, terms)) for m in query]


# ---- tool calls ------------------------------------------------------------------------------

def _stored_calls(text: str) -> list[dict[str, str]]:
    """A message's tool_calls column: [{"id", "name", "arguments"}] ([] when empty or unreadable)."""
    if not text:
        return []
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return []
    return [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []


def _request_calls(message: dict[str, Any]) -> list[dict[str, str]]:
    """A new message's calls (OpenAI's shape, as GenerateParams holds them) as the store keeps
    them; a call sent without an id is given one, so a result can name it."""
    out = []
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        arguments = function.get("arguments", "")
        out.append({"id": call.get("id") or "call_" + secrets.token_hex(12), "name": function.get("name", ""),
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)})
    return out


def _calls_json(calls: list[dict[str, str]]) -> str:
    return json.dumps(calls, ensure_ascii=False) if calls else ""


def _message_text(message: dict[str, Any], calls: list[dict[str, str]]) -> str:
    return (message.get("content") or "") + "".join(c["arguments"] for c in calls)


def _context_calls(message: dict[str, Any]) -> list[dict[str, str]]:
    """A context message's calls (OpenAI's shape) as the store keeps them."""
    return [{"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            for c in message.get("tool_calls") or ()]


def _context_message(role: str, content: str, calls: list[dict[str, str]], tool_call_id: str,
                     name: str, images: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One message of a turn's prompt, in the shape GenerateParams.messages holds."""
    message: dict[str, Any] = {"role": role, "content": content}
    if images:  # what the prompt reads of each image: its text (the bytes stay in the store)
        message["images"] = [{"media_type": i.get("media_type", ""), "text": i.get("text", "")} for i in images]
    if calls:
        message["tool_calls"] = [{"id": c["id"], "function": {"name": c["name"], "arguments": c["arguments"]}}
                                 for c in calls]
    if role == "tool":
        message["tool_call_id"] = tool_call_id
        if name:
            message["name"] = name
    return message


def _images_of(rows: list[Message], with_data: bool = True) -> dict[int, list[dict[str, Any]]]:
    """The images of these messages, by message id, in their order (one query); without their
    bytes unless `with_data`."""
    ids = [m.id for m in rows if m.role == "user"]
    found: dict[int, list[dict[str, Any]]] = {}
    if not ids:
        return found
    columns = [MessageImage.message, MessageImage.media_type, MessageImage.text]
    query = MessageImage.select(*columns, *([MessageImage.data] if with_data else []))
    for image in query.where(MessageImage.message.in_(ids)).order_by(MessageImage.position):
        item = {"media_type": image.media_type, "text": image.text}
        if with_data:
            item["data"] = bytes(image.data)
        found.setdefault(image.message_id, []).append(item)
    return found
