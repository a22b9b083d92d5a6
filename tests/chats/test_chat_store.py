"""The chat store on its own (in-process, a real SQLite file): ownership, turns, paging, search,
export, keys, schema, and fitting a chat into the context window."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from tokenwire.server.chats import db as chat_db
from tokenwire.server.chats import export as chat_export
from tokenwire.server.chats.api_keys import KeyRing
from tokenwire.server.chats.search import fts_query, query_terms, spans_by_scan, spans_from_marked
from tokenwire.server.chats.store import ChatNotFound, ChatRequestError, ChatStore, ReplyOutcome
from tokenwire.server.engine.context_fit import fit_messages, reply_reserve
from tokenwire.server.engine.records import Usage


@pytest.fixture
def store(tmp_path):
    s = ChatStore(str(tmp_path / "chats.db"))
    yield s
    s.close()


def test_sqlite_is_wal_with_a_busy_timeout_and_versioned(store, tmp_path) -> None:
    assert store.db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute_sql("PRAGMA busy_timeout").fetchone()[0] >= 1000
    assert chat_db.SchemaVersion.get().version == chat_db.SCHEMA_VERSION
    # Opening it again (a restart) keeps everything and migrates nothing twice.
    user = store.ensure_user("local")
    chat = store.create_chat(user, title="kept")
    store.close()
    again = ChatStore(str(tmp_path / "chats.db"))
    assert [c.title for c in again.list_chats(user)[0]] == ["kept"] == [chat.title]
    assert chat_db.SchemaVersion.select().count() == 1


def test_a_turn_commits_the_user_message_then_the_reply(store) -> None:
    user = store.ensure_user("local")
    chat = store.create_chat(user, system_prompt="Be brief.")
    turn = store.begin_turn(user, chat.id, [{"role": "user", "content": "Hello there, model"}], "m:int4",
                            {"sampling": {"temperature": 0.0}, "max_tokens": 8})
    assert turn.context == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, model"}]
    info, messages = store.get_chat(user, chat.id)
    assert info.title == "Hello there, model" and info.model == "m:int4"
    assert [(m.role, m.status) for m in messages] == [("system", "complete"), ("user", "complete"),
                                                        ("assistant", "pending")]
    assert store.finish_reply(turn.reply_message_id, ReplyOutcome("Hi!", "stopped", usage=Usage(completion_tokens=2)))
    assert not store.finish_reply(turn.reply_message_id, ReplyOutcome("again", "complete"))  # once only
    _, messages = store.get_chat(user, chat.id)
    reply = messages[-1]
    assert (reply.content, reply.status, reply.usage.completion_tokens) == ("Hi!", "stopped", 2)
    assert reply.params == {"sampling": {"temperature": 0.0}, "max_tokens": 8}
    # Next turn: the partial reply is context; a system message cannot come now.
    nxt = store.begin_turn(user, chat.id, [{"role": "user", "content": "More"}], "m:int4")
    assert [m["role"] for m in nxt.context] == ["system", "user", "assistant", "user"]
    with pytest.raises(ChatRequestError):
        store.begin_turn(user, chat.id, [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}], "m")
    # A crash leaves the pending reply; the next start marks it.
    assert store.mark_interrupted() == 1
    assert store.get_chat(user, chat.id)[1][-1].status == "interrupted"
    # Nothing new: answer the last user message again.
    retry = store.begin_turn(user, chat.id, [], "m:int4")
    assert retry.context[-1] == {"role": "user", "content": "More"} and retry.user_message_id == 0


def test_other_users_chats_are_not_found(store) -> None:
    alice, bob = store.ensure_user("alice"), store.ensure_user("bob")
    chat = store.create_chat(alice, title="secret plans")
    store.append_message(alice, chat.id, "user", "the password is swordfish")
    for attempt in (lambda: store.get_chat(bob, chat.id), lambda: store.rename_chat(bob, chat.id, "mine"),
                    lambda: store.delete_chat(bob, chat.id), lambda: store.append_message(bob, chat.id, "user", "x"),
                    lambda: store.begin_turn(bob, chat.id, [{"role": "user", "content": "x"}], "m")):
        with pytest.raises(ChatNotFound):
            attempt()
    assert store.list_chats(bob) == ([], "")
    assert store.search(bob, "swordfish") == []
    assert [r.chat.id for r in store.search(alice, "swordfish")] == [chat.id]
    assert store.get_chat(alice, chat.id)[0].message_count == 1


def test_list_pages_newest_first(store) -> None:
    user = store.ensure_user("local")
    made = [store.create_chat(user, title=f"chat {i}").id for i in range(7)]
    time.sleep(0.005)  # times are in milliseconds
    store.append_message(user, made[2], "user", "bump")  # activity moves it to the front
    seen, token = [], ""
    while True:
        page, token = store.list_chats(user, 3, token)
        seen += [c.id for c in page]
        if not token:
            break
    expected = [made[2]] + [c for c in reversed(made) if c != made[2]]
    assert seen == expected
    with pytest.raises(ChatRequestError):
        store.list_chats(user, 3, "not-a-token!")


def test_search_highlights_and_deletes_with_the_chat(store) -> None:
    user = store.ensure_user("local")
    a = store.create_chat(user)
    store.append_message(user, a.id, "user", "How do I bake sourdough bread at home?")
    store.append_message(user, a.id, "assistant", "Feed the starter, then bake the bread hot.")
    b = store.create_chat(user)
    store.append_message(user, b.id, "user", "Tell me about rockets")
    results = store.search(user, "bread")
    assert [r.chat.id for r in results] == [a.id]
    spans = results[0].snippets[0].spans
    assert ("bread", True) in spans or ("Bread", True) in spans
    assert "".join(t for t, _ in spans).strip().rstrip("?.").endswith(("home", "hot"))
    assert [r.chat.id for r in store.search(user, "sourd")] == [a.id]  # prefix of the last word
    assert store.search(user, 'bread "OR rockets') == []  # every word must match; no FTS5 syntax error
    assert store.search(user, "rockets")[0].chat.id == b.id
    with pytest.raises(ChatRequestError):
        store.search(user, "  ?! ")
    assert store.delete_chat(user, a.id) == 2
    assert store.search(user, "bread") == []
    count = store.db.execute_sql("SELECT count(*) FROM message_fts WHERE message_fts MATCH 'bread'").fetchone()[0]
    assert count == 0


def test_search_helpers() -> None:
    assert query_terms("it's a \"test\" (OR) NEAR*") == ["it", "s", "a", "test", "OR", "NEAR"]
    assert fts_query(["a", 'b"c']) == '"a" AND "b""c"*'
    assert spans_from_marked("x \x02hit\x03 y") == [("x ", False), ("hit", True), (" y", False)]
    assert spans_by_scan("one two three", ["two"]) == [("one ", False), ("two", True), (" three", False)]


def test_export_json_and_markdown(store) -> None:
    user = store.ensure_user("local")
    chat = store.create_chat(user, title="Export me", system_prompt="sys")
    turn = store.begin_turn(user, chat.id, [{"role": "user", "content": "hi"}], "m:int4")
    store.finish_reply(turn.reply_message_id, ReplyOutcome("hello **there**", "length"))
    info, messages = store.get_chat(user, chat.id)
    doc = json.loads(chat_export.to_json(info, messages))
    assert doc["chat"]["title"] == "Export me"
    assert [(m["role"], m["content"], m["status"]) for m in doc["messages"]] == [
        ("system", "sys", "complete"), ("user", "hi", "complete"), ("assistant", "hello **there**", "length")]
    md = chat_export.to_markdown(info, messages)
    assert md.startswith("# Export me\n")
    assert "## You\n\nhi\n" in md and "## Assistant (m:int4, cut at the token limit)\n\nhello **there**" in md


def test_keys_are_stored_hashed_and_revocable(store, tmp_path) -> None:
    keys = KeyRing(store.db)
    assert not keys.any_active()
    key, info = keys.create("alice")
    assert key.startswith("tw_") and len(key) > 40 and info.user == "alice"
    assert keys.any_active() and keys.owner_of(key).user == "alice" and keys.owner_of(key + "x") is None
    raw = sqlite3.connect(tmp_path / "chats.db")
    stored = [row[0] for row in raw.execute("SELECT key_hash FROM api_key")]
    assert key not in stored and len(stored[0]) == 64
    assert [k.id for k in keys.revoke(info.prefix)] == [info.id]
    assert keys.owner_of(key) is None and not keys.any_active()
    assert keys.required(), "revoking the last key must not turn authentication off"
    admin_key, admin = keys.create("root", admin=True)
    assert admin.admin and keys.owner_of(admin_key).admin and not keys.owner_of(admin_key + "x")
    assert [k.admin for k in keys.list()] == [False, True]
    assert keys.disable() == 2 and not keys.required() and keys.list() == []
    with pytest.raises(ValueError):
        keys.create("two words")


def test_fit_messages_drops_oldest_turns_keeping_the_system_prompt() -> None:
    def words(messages):  # one "token" per word
        return sum(len(m["content"].split()) for m in messages)

    chat = [{"role": "system", "content": "s s"}]
    for i in range(5):
        chat += [{"role": "user", "content": f"u{i} " * 3}, {"role": "assistant", "content": f"a{i} " * 3}]
    chat.append({"role": "user", "content": "last question"})
    assert fit_messages(chat, words, 1000) == (chat, 0)
    kept, dropped = fit_messages(chat, words, 2 + 6 * 2 + 2)  # system, two whole turns, the question
    assert dropped == 6 and kept[0]["role"] == "system" and kept[1]["content"].startswith("u3")
    assert kept[-1]["content"] == "last question"
    kept, dropped = fit_messages(chat, words, 3)  # nothing fits: the last turn alone comes back
    assert kept == [chat[0], chat[-1]] and dropped == 10
    assert reply_reserve(0, 1024, 8192) == 1024 and reply_reserve(0, 1024, 2048) == 512
    assert reply_reserve(16, 1024, 2048) == 16


def test_a_schema_1_database_is_migrated_keeping_its_messages(tmp_path) -> None:
    """Schema 2 adds message.cached_prompt_tokens (part of a reply's Usage), schema 3 admin keys; a
    database written by schema 1 is migrated on open and keeps its messages."""
    path = tmp_path / "old.db"
    store = ChatStore(str(path))
    user = store.ensure_user("local")
    chat = store.create_chat(user, title="old")
    old = store.begin_turn(user, chat.id, [{"role": "user", "content": "before the upgrade"}], "m")
    store.finish_reply(old.reply_message_id, ReplyOutcome("kept", "complete"))
    store.close()
    with sqlite3.connect(path) as conn:  # as schema 1 left it
        conn.execute("ALTER TABLE message DROP COLUMN cached_prompt_tokens")
        conn.execute("ALTER TABLE api_key DROP COLUMN admin")
        conn.execute("UPDATE schema_version SET version = 1")
    store = ChatStore(str(path))
    try:
        assert chat_db.SchemaVersion.get().version == chat_db.SCHEMA_VERSION >= 2
        turn = store.begin_turn(user, chat.id, [{"role": "user", "content": "after"}], "m")
        usage = Usage(prompt_tokens=30, completion_tokens=4, cached_prompt_tokens=21, time_to_first_token_ms=12.5)
        assert store.finish_reply(turn.reply_message_id, ReplyOutcome("new", "length", usage=usage))
        messages = store.get_chat(user, chat.id)[1]
        assert [m.content for m in messages if m.role == "assistant"] == ["kept", "new"]
        assert messages[-1].usage == usage and messages[-1].status == "length"
        key, info = KeyRing(store.db).create("admin-after-upgrade", admin=True)  # schema 3's column
        assert KeyRing(store.db).owner_of(key).admin
    finally:
        store.close()


def test_a_new_database_and_its_folder_are_private(tmp_path) -> None:
    """Chats are private: 0700 folder, 0600 database (and its WAL), whatever the umask."""
    import os

    old = os.umask(0o022)
    try:
        path = tmp_path / "new-folder" / "chats.db"
        store = ChatStore(str(path))
        try:
            store.create_chat(store.ensure_user("local"), title="secret")
            modes = {p.name: p.stat().st_mode & 0o777 for p in path.parent.iterdir()}
            assert path.parent.stat().st_mode & 0o777 == 0o700
            assert modes["chats.db"] == 0o600 and modes.get("chats.db-wal", 0o600) == 0o600, modes
        finally:
            store.close()
    finally:
        os.umask(old)
