"""Tool calls, tool results and thinking in stored chats (schema 6), on SQLite and on PostgreSQL:
a reply's calls are stored with it and prompt the next turn in the shape the engine renders, a
result must answer a call of the chat, and an older database gains the columns keeping its rows."""

from __future__ import annotations

import sqlite3

import pytest

from tokenwire.server.chats import db as chat_db
from tokenwire.server.chats import export as chat_export
from tokenwire.server.chats.store import ChatRequestError, ChatStore, ReplyOutcome

CALL = {"id": "call_abc", "name": "get_weather", "arguments": '{"city": "Paris"}'}


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    target = str(tmp_path / "chats.db") if request.param == "sqlite" else request.getfixturevalue("pg_url")
    s = ChatStore(target)
    yield s
    s.close()


def _called(store: ChatStore) -> tuple[int, str]:
    """A chat whose reply called get_weather (and thought first)."""
    user = store.ensure_user("ann")
    chat = store.create_chat(user)
    turn = store.begin_turn(user, chat.id, [{"role": "user", "content": "Weather in Paris?"}], "m")
    assert store.finish_reply(turn.reply_message_id, ReplyOutcome("", "complete", reasoning="Look it up.",
                                                                  tool_calls=[CALL]))
    return user, chat.id


def test_a_reply_s_calls_and_a_result_prompt_the_next_turn(store) -> None:
    user, chat_id = _called(store)
    reply = store.get_chat(user, chat_id)[1][-1]
    assert (reply.content, reply.tool_calls, reply.reasoning) == ("", [CALL], "Look it up.")
    result = {"role": "tool", "tool_call_id": "call_abc", "content": "18 degrees"}
    turn = store.begin_turn(user, chat_id, [result], "m")
    assert turn.context == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_abc", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "18 degrees", "tool_call_id": "call_abc", "name": "get_weather"},
    ], "the call (its reasoning left out) and the result, named from the call"
    stored = store.get_chat(user, chat_id)[1]
    assert turn.user_message_id == stored[2].id
    assert (stored[2].role, stored[2].tool_call_id, stored[2].name) == ("tool", "call_abc", "get_weather")
    store.finish_reply(turn.reply_message_id, ReplyOutcome("It is 18 degrees.", "complete"))
    # A turn may also bring its own call and result (an agent replaying what it ran itself).
    own = [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_time", "arguments": {}}}]}]
    own_call = store.preview_turn(user, chat_id, [*own, {"role": "user", "content": "and the time?"}])[-2]
    assert own_call["tool_calls"][0]["function"] == {"name": "get_time", "arguments": "{}"}
    assert own_call["tool_calls"][0]["id"].startswith("call_"), "a call sent without an id is given one"
    later = store.begin_turn(user, chat_id, [*own, {"role": "user", "content": "and the time?"}], "m")
    prompted = later.context[-2]["tool_calls"][0]["id"]
    stored = store.get_chat(user, chat_id)[1][-3]
    assert stored.tool_calls[0]["id"] == prompted, "the id the prompt showed is the one stored"


def test_results_must_answer_a_call_of_the_chat(store) -> None:
    user, chat_id = _called(store)
    cases = [
        ([{"role": "tool", "content": "x"}],
         "messages[0]: a tool result needs the tool_call_id of the call it answers", "messages[0].tool_call_id"),
        ([{"role": "tool", "tool_call_id": "call_other", "content": "x"}],
         "messages[0].tool_call_id 'call_other' names no tool call of this chat", "messages[0].tool_call_id"),
        ([{"role": "assistant", "content": ""}], "messages[0].content must not be empty", "messages[0].content"),
    ]
    for new, message, field in cases:
        with pytest.raises(ChatRequestError) as exc:
            store.begin_turn(user, chat_id, new, "m")
        assert (str(exc.value), exc.value.field) == (message, field)
    with pytest.raises(ChatRequestError) as exc:
        store.append_message(user, chat_id, "tool", "18 degrees")
    assert exc.value.field == "role" and "tool_call_id" in str(exc.value)
    assert len(store.get_chat(user, chat_id)[1]) == 2, "nothing refused was stored"
    # Another user's call ids are not this chat's.
    bob = store.ensure_user("bob")
    bobs = store.create_chat(bob)
    with pytest.raises(ChatRequestError):
        store.begin_turn(bob, bobs.id, [{"role": "user", "content": "q"},
                                        {"role": "tool", "tool_call_id": "call_abc", "content": "x"}], "m")


def test_export_shows_calls_results_and_thinking(store) -> None:
    user, chat_id = _called(store)
    store.begin_turn(user, chat_id, [{"role": "tool", "tool_call_id": "call_abc", "content": "18 degrees"}], "m")
    info, messages = store.get_chat(user, chat_id)
    text = chat_export.to_markdown(info, messages)
    assert "> _Thinking:_ Look it up." in text
    assert 'Calls `get_weather` (`call_abc`):\n\n```json\n{"city": "Paris"}\n```' in text
    assert "## Tool result (get_weather `call_abc`)\n\n18 degrees" in text


def test_a_schema_5_database_gains_the_tool_columns(tmp_path) -> None:
    path = tmp_path / "old.db"
    store = ChatStore(str(path))
    user = store.ensure_user("local")
    chat = store.create_chat(user)
    old = store.begin_turn(user, chat.id, [{"role": "user", "content": "before"}], "m")
    store.finish_reply(old.reply_message_id, ReplyOutcome("kept", "complete"))
    store.close()
    with sqlite3.connect(path) as conn:  # as schema 5 left it
        for column in ("tool_calls", "tool_call_id", "name", "reasoning"):
            conn.execute(f"ALTER TABLE message DROP COLUMN {column}")
        conn.execute("UPDATE schema_version SET version = 5")
    store = ChatStore(str(path))
    try:
        assert chat_db.SchemaVersion.get().version == chat_db.SCHEMA_VERSION >= 6
        assert [m.content for m in store.get_chat(user, chat.id)[1]] == ["before", "kept"]
        turn = store.begin_turn(user, chat.id, [{"role": "user", "content": "after"}], "m")
        assert store.finish_reply(turn.reply_message_id, ReplyOutcome("", "complete", tool_calls=[CALL]))
        assert store.get_chat(user, chat.id)[1][-1].tool_calls == [CALL]
    finally:
        store.close()
