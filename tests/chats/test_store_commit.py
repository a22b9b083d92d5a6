"""ChatStore details: turn commits, the field of each refusal, paging at the edge, titles,
replies finished, partial and interrupted."""

from __future__ import annotations

import base64
import time

import pytest

from tokenwire.server.chats.store import (
    AUTO_TITLE_CHARS,
    INTERRUPTED_MESSAGE,
    MAX_TITLE_CHARS,
    ChatNotFound,
    ChatRequestError,
    ChatStore,
    ReplyOutcome,
    auto_title,
)


@pytest.fixture
def store(tmp_path):
    s = ChatStore(str(tmp_path / "chats.db"))
    yield s
    s.close()


def user(store: ChatStore, name: str = "ann") -> int:
    return store.ensure_user(name)


def test_begin_turn_ids_context_and_count(store) -> None:
    u = user(store)
    chat = store.create_chat(u, system_prompt="be brief")
    turn = store.begin_turn(u, chat.id, [{"role": "user", "content": "hi"}], "m1", {"seed": 1})
    _, messages = store.get_chat(u, chat.id)
    assert [m.role for m in messages] == ["system", "user", "assistant"]
    assert turn.user_message_id == messages[1].id
    assert turn.reply_message_id == messages[2].id
    assert messages[2].status == "pending" and messages[2].params == {"seed": 1} and messages[2].model == "m1"
    assert turn.context == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert turn.chat.message_count == 3
    assert turn.chat.model == "m1"
    # A second turn while the first reply is still pending: that reply is left out of the context.
    turn2 = store.begin_turn(u, chat.id, [{"role": "user", "content": "again"}], "m1")
    assert turn2.context == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                             {"role": "user", "content": "again"}]
    assert turn2.chat.message_count == 5
    assert store.chat_info(u, chat.id).message_count == 5


def test_begin_turn_with_several_messages_names_the_last_user_one(store) -> None:
    u = user(store)
    chat = store.create_chat(u)
    turn = store.begin_turn(u, chat.id, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                         {"role": "user", "content": "c"}], "m")
    _, messages = store.get_chat(u, chat.id)
    assert turn.user_message_id == messages[2].id


def test_nothing_to_answer(store) -> None:
    u = user(store)
    chat = store.create_chat(u)
    with pytest.raises(ChatRequestError, match="nothing to answer") as exc:
        store.begin_turn(u, chat.id, [], "m")
    assert exc.value.field == "messages"
    turn = store.begin_turn(u, chat.id, [{"role": "user", "content": "q"}], "m")
    assert store.finish_reply(turn.reply_message_id, ReplyOutcome("answer", "complete"))
    with pytest.raises(ChatRequestError, match="nothing to answer") as exc:
        store.begin_turn(u, chat.id, [], "m")
    assert exc.value.field == "messages"
    with pytest.raises(ChatRequestError) as exc:
        store.begin_turn(u, chat.id, [{"role": "assistant", "content": "x"}], "m")
    assert exc.value.field == "messages"
    # Nothing was committed by the refused turns.
    assert store.chat_info(u, chat.id).message_count == 2


def test_refusals_name_their_field(store) -> None:
    u = user(store)
    chat = store.create_chat(u)
    cases = [
        (lambda: store.rename_chat(u, chat.id, "  \n "), "title"),
        (lambda: store.rename_chat(u, chat.id, "x" * (MAX_TITLE_CHARS + 1)), "title"),
        (lambda: store.create_chat(u, title="x" * (MAX_TITLE_CHARS + 1)), "title"),
        (lambda: store.append_message(u, chat.id, "robot", "hi"), "role"),
        (lambda: store.append_message(u, chat.id, "user", ""), "content"),
        (lambda: store.begin_turn(u, chat.id, [{"role": "wizard", "content": "x"}], "m"), "role"),
        (lambda: store.begin_turn(u, chat.id, [{"role": "user", "content": "a"}, {"role": "user"}], "m"),
         "messages[1].content"),
        (lambda: store.list_chats(u, 10, "!!not-a-token"), "page_token"),
        (lambda: store.list_chats(u, 10, base64.urlsafe_b64encode(b"1:x").decode()), "page_token"),
        (lambda: store.list_chats(u, 10, base64.urlsafe_b64encode(f"{1 << 63}:1".encode()).decode()), "page_token"),
        (lambda: store.search(u, "   "), "query"),
    ]
    for call, field in cases:
        with pytest.raises(ChatRequestError) as exc:
            call()
        assert exc.value.field == field
    assert store.rename_chat(u, chat.id, "x" * MAX_TITLE_CHARS).title == "x" * MAX_TITLE_CHARS


def test_system_message_only_starts_a_chat(store) -> None:
    u = user(store)
    chat = store.create_chat(u)
    store.append_message(u, chat.id, "user", "hello")
    with pytest.raises(ChatRequestError) as exc:
        store.begin_turn(u, chat.id, [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "m")
    assert exc.value.field == "messages"


def test_next_page_token_exactly_when_more_remain(store) -> None:
    u = user(store)
    ids = []
    for i in range(3):
        ids.append(store.create_chat(u, title=f"c{i}").id)
        time.sleep(0.002)
    chats, token = store.list_chats(u, 3)
    assert [c.id for c in chats] == ids[::-1] and token == ""  # a full page, nothing after: no token
    chats, token = store.list_chats(u, 2)
    assert [c.id for c in chats] == [ids[2], ids[1]] and token
    chats, token = store.list_chats(u, 2, token)
    assert [c.id for c in chats] == [ids[0]] and token == ""
    chats, token = store.list_chats(u, 1)
    chats2, token2 = store.list_chats(u, 1, token)
    chats3, token3 = store.list_chats(u, 1, token2)
    assert [c.id for c in chats + chats2 + chats3] == ids[::-1] and token3 == ""
    assert store.last_chat(u).id == ids[2]
    assert store.last_chat(user(store, "nobody")) is None


def test_auto_title_truncation() -> None:
    exact = "a" * AUTO_TITLE_CHARS
    assert auto_title(exact) == exact
    long = "b" * (AUTO_TITLE_CHARS + 1)
    assert auto_title(long) == "b" * (AUTO_TITLE_CHARS - 1) + "…"
    assert len(auto_title(long)) == AUTO_TITLE_CHARS
    assert auto_title("  many   spaces\nhere ") == "many spaces here"
    words = "word " * 30
    t = auto_title(words)
    assert t == ("word " * 30)[: AUTO_TITLE_CHARS - 1].rstrip() + "…"


def test_first_user_message_titles_an_untitled_chat_once(store) -> None:
    u = user(store)
    chat = store.create_chat(u)
    text = "q" * (AUTO_TITLE_CHARS + 10)
    store.begin_turn(u, chat.id, [{"role": "user", "content": text}], "m")
    assert store.chat_info(u, chat.id).title == "q" * (AUTO_TITLE_CHARS - 1) + "…"
    store.append_message(u, chat.id, "user", "second")
    assert store.chat_info(u, chat.id).title == "q" * (AUTO_TITLE_CHARS - 1) + "…"
    titled = store.create_chat(u, title="  My   chat ")
    assert titled.title == "My chat"
    store.append_message(u, titled.id, "user", "hello")
    assert store.chat_info(u, titled.id).title == "My chat"


def test_rename_and_chat_info(store) -> None:
    u = user(store)
    chat = store.create_chat(u, title="old", model="m")
    time.sleep(0.002)
    renamed = store.rename_chat(u, chat.id, "  new   name ")
    assert renamed.title == "new name"
    assert renamed.updated_ms > chat.updated_ms
    info = store.chat_info(u, chat.id)
    assert (info.id, info.title, info.model, info.owner, info.message_count) == (chat.id, "new name", "m", "ann", 0)
    assert info.created_ms == chat.created_ms
    other = user(store, "bob")
    with pytest.raises(ChatNotFound):
        store.chat_info(other, chat.id)
    with pytest.raises(ChatNotFound):
        store.rename_chat(other, chat.id, "mine")


def test_finish_reply_bumps_updated_ms_and_moves_the_chat_to_the_top(store) -> None:
    u = user(store)
    first = store.create_chat(u, title="first")
    turn = store.begin_turn(u, first.id, [{"role": "user", "content": "q"}], "m")
    time.sleep(0.002)
    second = store.create_chat(u, title="second")
    assert [c.id for c in store.list_chats(u)[0]] == [second.id, first.id]
    time.sleep(0.002)
    before = int(time.time() * 1000)
    assert store.finish_reply(turn.reply_message_id, ReplyOutcome("done", "complete"))
    info = store.chat_info(u, first.id)
    assert info.updated_ms >= before
    assert info.updated_ms > second.updated_ms
    assert [c.id for c in store.list_chats(u)[0]] == [first.id, second.id]
    assert store.last_chat(u).id == first.id
    # Finished already: a second outcome is not stored, and updated_ms stays.
    assert not store.finish_reply(turn.reply_message_id, ReplyOutcome("other", "error", "boom"))
    assert store.chat_info(u, first.id).updated_ms == info.updated_ms
    _, messages = store.get_chat(u, first.id)
    assert (messages[-1].content, messages[-1].status, messages[-1].error_message) == ("done", "complete", "")
    with pytest.raises(ValueError):
        store.finish_reply(turn.reply_message_id, ReplyOutcome("x", "pending"))


def test_save_partial_only_while_pending(store) -> None:
    u = user(store)
    chat = store.create_chat(u)
    turn = store.begin_turn(u, chat.id, [{"role": "user", "content": "q"}], "m")
    assert store.save_partial(turn.reply_message_id, "par")
    assert store.get_chat(u, chat.id)[1][-1].content == "par"
    assert store.finish_reply(turn.reply_message_id, ReplyOutcome("final", "length"))
    assert not store.save_partial(turn.reply_message_id, "late")
    last = store.get_chat(u, chat.id)[1][-1]
    assert (last.content, last.status) == ("final", "length")
    assert not store.save_partial(10_000, "nobody")


def test_mark_interrupted_keeps_content(store) -> None:
    u = user(store)
    a = store.create_chat(u)
    b = store.create_chat(u)
    ta = store.begin_turn(u, a.id, [{"role": "user", "content": "q"}], "m")
    tb = store.begin_turn(u, b.id, [{"role": "user", "content": "q"}], "m")
    store.save_partial(ta.reply_message_id, "half an ans")
    store.finish_reply(tb.reply_message_id, ReplyOutcome("whole", "complete"))
    assert store.mark_interrupted() == 1
    la = store.get_chat(u, a.id)[1][-1]
    assert (la.status, la.error_message, la.content) == ("interrupted", INTERRUPTED_MESSAGE, "half an ans")
    lb = store.get_chat(u, b.id)[1][-1]
    assert (lb.status, lb.error_message, lb.content) == ("complete", "", "whole")
    assert store.mark_interrupted() == 0
    assert not store.finish_reply(ta.reply_message_id, ReplyOutcome("late", "complete"))
