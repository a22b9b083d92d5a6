"""What mutation testing found unpinned in chats/store.py, in-process on a real SQLite file:
GetChat's pages (by count and by bytes, the token), preview_turn (checks, writes nothing),
find_user and describe, the LIKE search (the PostgreSQL path, forced on SQLite), FTS search
limits and snippets, and ChatNotFound."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tokenwire.server.chats import store as store_mod
from tokenwire.server.chats.db import Chat, Message, ServerLease
from tokenwire.server.chats.search import MARK_CLOSE, MARK_OPEN
from tokenwire.server.chats.store import (
    ChatNotFound,
    ChatRequestError,
    ChatStore,
    ChatTooLarge,
    MessageInfo,
    ReplyOutcome,
    decode_cursor,
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ChatStore]:
    s = ChatStore(str(tmp_path / "chats.db"))
    yield s
    s.close()


def chat_with(store: ChatStore, texts: list[str], name: str = "ann") -> tuple[int, str]:
    """A chat of these messages, user and assistant in turn; returns (user id, chat id)."""
    u = store.ensure_user(name)
    chat = store.create_chat(u, title="t")
    for i, text in enumerate(texts):
        store.append_message(u, chat.id, "user" if i % 2 == 0 else "assistant", text)
    return u, chat.id


def all_pages(store: ChatStore, u: int, chat_id: str, size: int) -> list[list[MessageInfo]]:
    pages, token = [], ""
    while True:
        _, messages, token = store.get_chat_page(u, chat_id, size, token)
        pages.append(messages)
        if not token:
            return pages


def weight(m: MessageInfo, stored_params: str = "") -> int:
    """A message's share of a page, by the rule of get_chat_page: its UTF-8 text, its error
    message, its stored params and 256 bytes of overhead."""
    return len(m.content.encode()) + len(m.error_message.encode()) + len(stored_params) + 256


# -- get_chat_page: count, bytes, token ---------------------------------------------------------

def test_pages_by_count_cover_the_chat_once_in_order(store: ChatStore) -> None:
    """page_size 2 over 5 messages: pages of 2, 2, 1, oldest first, a token exactly while more
    remain; the ChatInfo counts the whole chat, not the page."""
    texts = [f"m{i}" for i in range(5)]
    u, chat_id = chat_with(store, texts)
    _, whole = store.get_chat(u, chat_id)
    pages = all_pages(store, u, chat_id, 2)
    assert [[m.content for m in p] for p in pages] == [["m0", "m1"], ["m2", "m3"], ["m4"]]
    assert [m.id for p in pages for m in p] == [m.id for m in whole]
    info, first, token = store.get_chat_page(u, chat_id, 2)
    assert info.message_count == 5 and info.id == chat_id
    assert decode_cursor(token)[0] == 2  # resumes after the second message's seq
    # Exactly a page's worth left: the last full page has no token.
    _, rest, token = store.get_chat_page(u, chat_id, 3, store.get_chat_page(u, chat_id, 2)[2])
    assert [m.content for m in rest] == ["m2", "m3", "m4"] and token == ""


def test_page_size_default_and_cap(store: ChatStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """page_size 0 takes DEFAULT_MESSAGE_PAGE; a bigger one than MAX_MESSAGE_PAGE is cut to it."""
    monkeypatch.setattr(store_mod, "DEFAULT_MESSAGE_PAGE", 2)
    monkeypatch.setattr(store_mod, "MAX_MESSAGE_PAGE", 3)
    u, chat_id = chat_with(store, [f"m{i}" for i in range(5)])
    _, messages, token = store.get_chat_page(u, chat_id, 0)
    assert [m.content for m in messages] == ["m0", "m1"] and token
    _, messages, token = store.get_chat_page(u, chat_id, 100)
    assert [m.content for m in messages] == ["m0", "m1", "m2"] and token
    _, messages, token = store.get_chat_page(u, chat_id, 100, token)
    assert [m.content for m in messages] == ["m3", "m4"] and token == ""


def test_pages_by_bytes_end_before_the_message_that_would_pass(store: ChatStore,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A page holds messages while their weights sum to at most MESSAGE_PAGE_BYTES (UTF-8 bytes,
    so 'é' counts 2); exactly the limit still fits, one byte less does not."""
    texts = ["é" * 100, "x" * 50, "y" * 10, "z"]
    u, chat_id = chat_with(store, texts)
    _, whole = store.get_chat(u, chat_id)
    w = [weight(m) for m in whole]
    assert w[0] == 456  # 200 bytes of text + 256
    monkeypatch.setattr(store_mod, "MESSAGE_PAGE_BYTES", w[0] + w[1])
    _, messages, token = store.get_chat_page(u, chat_id, 10)
    assert [m.content for m in messages] == texts[:2] and token
    monkeypatch.setattr(store_mod, "MESSAGE_PAGE_BYTES", w[0] + w[1] - 1)
    _, messages, token = store.get_chat_page(u, chat_id, 10)
    assert [m.content for m in messages] == texts[:1] and token
    _, messages, token = store.get_chat_page(u, chat_id, 10, token)
    assert w[1] + w[2] <= w[0] + w[1] - 1 < w[1] + w[2] + w[3]
    assert [m.content for m in messages] == texts[1:3] and token  # from where the last page ended


def test_a_message_bigger_than_a_page_still_comes_alone(store: ChatStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first message of a page is always taken (else a big one could never be read)."""
    monkeypatch.setattr(store_mod, "MESSAGE_PAGE_BYTES", 10)
    texts = ["a" * 40, "b" * 40, "c"]
    u, chat_id = chat_with(store, texts)
    assert [[m.content for m in p] for p in all_pages(store, u, chat_id, 10)] == [[t] for t in texts]


def test_page_weight_counts_error_text_and_params(store: ChatStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished reply's error message and stored params weigh on the page like its text."""
    u = store.ensure_user("ann")
    chat = store.create_chat(u)
    params = {"max_tokens": 5, "sampling": {"temperature": 0.5}}
    turn = store.begin_turn(u, chat.id, [{"role": "user", "content": "q"}], "m", params)
    store.finish_reply(turn.reply_message_id, ReplyOutcome("partial", "error", "é" * 20))
    store.append_message(u, chat.id, "user", "next")
    _, whole = store.get_chat(u, chat.id)
    stored = json.dumps(params, sort_keys=True)
    w = [weight(whole[0]), weight(whole[1], stored), weight(whole[2])]
    assert w[1] == len("partial") + 40 + len(stored) + 256
    monkeypatch.setattr(store_mod, "MESSAGE_PAGE_BYTES", w[0] + w[1])
    assert [m.content for m in store.get_chat_page(u, chat.id, 10)[1]] == ["q", "partial"]
    monkeypatch.setattr(store_mod, "MESSAGE_PAGE_BYTES", w[0] + w[1] - 1)
    assert [m.content for m in store.get_chat_page(u, chat.id, 10)[1]] == ["q"]


def test_page_of_another_users_chat_and_a_bad_token(store: ChatStore) -> None:
    u, chat_id = chat_with(store, ["hello"])
    bob = store.ensure_user("bob")
    with pytest.raises(ChatNotFound):
        store.get_chat_page(bob, chat_id)
    with pytest.raises(ChatRequestError) as exc:
        store.get_chat_page(u, chat_id, 10, "%%%")
    assert exc.value.field == "page_token"
    info, messages, token = store.get_chat_page(u, store.create_chat(u).id)
    assert (messages, token, info.message_count) == ([], "", 0)


# -- preview_turn: the same checks and context as begin_turn, nothing written -----------------

def test_preview_turn_is_begin_turns_context_without_writing(store: ChatStore) -> None:
    u = store.ensure_user("ann")
    chat = store.create_chat(u, system_prompt="sys")
    new = [{"role": "user", "content": "hi"}]
    preview = store.preview_turn(u, chat.id, new)
    assert preview == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]
    assert store.chat_info(u, chat.id).message_count == 1  # nothing committed
    assert store.begin_turn(u, chat.id, new, "m").context == preview
    # A pending reply is left out, as begin_turn leaves it out.
    more = [{"role": "user", "content": "again"}]
    assert store.preview_turn(u, chat.id, more) == preview + more
    assert store.chat_info(u, chat.id).message_count == 3


def test_preview_turn_refuses_like_begin_turn(store: ChatStore) -> None:
    u = store.ensure_user("ann")
    chat = store.create_chat(u)
    store.append_message(u, chat.id, "user", "hello")
    with pytest.raises(ChatRequestError) as exc:
        store.preview_turn(u, chat.id, [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}])
    assert exc.value.field == "messages"
    with pytest.raises(ChatRequestError) as exc:
        store.preview_turn(u, chat.id, [{"role": "assistant", "content": "x"}])
    assert exc.value.field == "messages"
    assert store.preview_turn(u, chat.id, []) == [{"role": "user", "content": "hello"}]
    store.max_chat_bytes = len("hello") + 3
    with pytest.raises(ChatTooLarge) as too_large:
        store.preview_turn(u, chat.id, [{"role": "user", "content": "four"}])
    assert too_large.value.field == "messages"
    assert store.preview_turn(u, chat.id, [{"role": "user", "content": "th3"}])[-1]["content"] == "th3"
    with pytest.raises(ChatNotFound):
        store.preview_turn(store.ensure_user("bob"), chat.id, [{"role": "user", "content": "x"}])
    assert store.chat_info(u, chat.id).message_count == 1


# -- users, describe, ChatNotFound --------------------------------------------------------------

def test_find_user_finds_only_existing_users(store: ChatStore) -> None:
    assert store.find_user("ann") is None
    ann = store.ensure_user("ann")
    bob = store.ensure_user("bob")
    assert store.find_user("ann") == ann and store.find_user("bob") == bob and ann != bob
    assert store.find_user("Ann") is None


def test_describe_names_the_database_file(store: ChatStore, tmp_path: Path) -> None:
    assert store.describe() == str(tmp_path / "chats.db")


def test_chat_not_found_names_the_chat() -> None:
    error = ChatNotFound("abc123")
    assert error.chat_id == "abc123" and error.field == "chat_id"
    assert str(error) == "chat 'abc123' not found"


# -- search: FTS limits and snippets, and the LIKE path ----------------------------------------

def test_fts_snippet_marks_every_match_and_keeps_the_context(store: ChatStore) -> None:
    """The snippet is the message's text around the match with the match highlighted, no marker
    characters left in the text."""
    u, chat_id = chat_with(store, ["alpha beta gamma delta"])
    [result] = store.search(u, "gamma")
    [snippet] = result.snippets
    assert snippet.spans == [("alpha beta ", False), ("gamma", True), (" delta", False)]
    assert snippet.role == "user"
    assert all(MARK_OPEN not in t and MARK_CLOSE not in t for t, _ in snippet.spans)
    assert result.chat.id == chat_id and result.chat.message_count == 1 and result.chat.owner == "ann"


def test_fts_snippet_of_a_long_message_is_cut_with_an_ellipsis(store: ChatStore) -> None:
    words = [f"w{i}" for i in range(40)]
    words[20] = "needle"
    u, _ = chat_with(store, [" ".join(words)])
    spans = store.search(u, "needle")[0].snippets[0].spans
    text = "".join(t for t, _ in spans)
    assert ("needle", True) in spans
    assert text.startswith("…") and text.endswith("…")
    assert len(text.split()) < len(words)  # a window around the match, not the whole message


@pytest.mark.parametrize("fts", [True, False])
def test_search_limits_chats_and_snippets(store: ChatStore, fts: bool) -> None:
    """At most `limit` chats, at most 3 snippets per chat, newest chat first; on both paths."""
    u = store.ensure_user("ann")
    ids = []
    for c in range(4):
        chat = store.create_chat(u, title=f"c{c}")
        for i in range(5):
            store.append_message(u, chat.id, "user", f"common word {c} {i}")
        ids.append(chat.id)
    store.fts = fts
    results = store.search(u, "common", limit=3)
    assert len(results) == 3
    assert all(len(r.snippets) == 3 for r in results)
    assert {r.chat.id for r in results} <= set(ids)
    assert all(r.chat.message_count == 5 for r in results)
    assert len(store.search(u, "common", limit=10)) == 4
    if not fts:
        assert [r.chat.id for r in store.search(u, "common", limit=10)] == ids[::-1]


def test_like_search_matches_every_term_case_insensitively_within_the_users_chats(store: ChatStore) -> None:
    """The LIKE path (used on PostgreSQL), on SQLite: every word must appear, any case; another
    user's chats are never found; snippets highlight each term."""
    u, a = chat_with(store, ["How do I bake Sourdough bread?", "Feed the starter."])
    _, b = chat_with(store, ["Tell me about rockets and bread"])
    bob, secret = chat_with(store, ["bob's sourdough bread recipe"], name="bob")
    store.fts = False
    results = store.search(u, "sourdough BREAD")
    assert [r.chat.id for r in results] == [a]
    [snippet] = results[0].snippets
    assert snippet.role == "user"
    assert ("Sourdough", True) in snippet.spans and ("bread", True) in snippet.spans
    assert "".join(t for t, _ in snippet.spans) == "How do I bake Sourdough bread?"
    assert {r.chat.id for r in store.search(u, "bread")} == {a, b}
    assert [r.chat.id for r in store.search(bob, "bread")] == [secret]
    assert store.search(u, "sourdough rockets") == []
    # The newest message of a chat comes first among its snippets.
    store.fts = True
    store.append_message(u, a, "assistant", "More bread is better.")
    store.fts = False
    spans = [s.message_id for s in store.search(u, "bread")[0].snippets]
    _, messages = store.get_chat(u, a)
    assert spans == [messages[2].id, messages[0].id]


# -- page tokens: a round trip over SQLite's INTEGER range, URL-friendly, exact refusals ------

@pytest.mark.parametrize("updated", [0, 1, 1_733_000_000_123, (1 << 63) - 1])
def test_cursor_round_trips_without_padding(updated: int) -> None:
    """Every (updated, row) in [0, 2**63) comes back as given, whatever the base64 length (so
    every amount of stripped padding); tokens carry no '=' (they travel in URLs)."""
    for row in [0, (1 << 63) - 1, *range(1, 200)]:
        token = store_mod.encode_cursor(updated, row)
        assert "=" not in token
        assert decode_cursor(token) == (updated, row)


@pytest.mark.parametrize("raw", [f"{1 << 63}:1", f"1:{1 << 63}", f"1:{1 << 64}", "-1:1", "1:-1", "1:2:3", "x:1"])
def test_cursor_out_of_range_is_refused_with_the_clients_message(raw: str) -> None:
    with pytest.raises(ChatRequestError) as exc:
        decode_cursor(base64.urlsafe_b64encode(raw.encode()).decode().rstrip("="))
    assert exc.value.field == "page_token"
    assert str(exc.value) == "page_token is not one this server gave out"


def test_chat_request_error_names_no_field_by_default() -> None:
    assert ChatRequestError("no").field == ""


# -- refusals' messages and fields, what append_message returns --------------------------------

def test_append_message_refusals_and_result(store: ChatStore) -> None:
    u = store.ensure_user("ann")
    chat = store.create_chat(u)
    with pytest.raises(ChatRequestError) as exc:
        store.append_message(u, chat.id, "user", "")
    assert str(exc.value) == "content must not be empty" and exc.value.field == "content"
    added = store.append_message(u, chat.id, "user", "héllo")
    assert (added.chat_id, added.role, added.content, added.status) == (chat.id, "user", "héllo", "complete")
    store.max_chat_bytes = len("héllo".encode()) + 2
    with pytest.raises(ChatTooLarge) as too_large:
        store.append_message(u, chat.id, "user", "abc")
    assert too_large.value.field == "content"
    assert store.append_message(u, chat.id, "user", "ab").content == "ab"  # exactly the cap fits


def test_search_refusal_message_and_default_limit(store: ChatStore) -> None:
    """No word: refused with the client's message. No limit: 20 chats at most."""
    u = store.ensure_user("ann")
    with pytest.raises(ChatRequestError) as exc:
        store.search(u, " ?! ")
    assert str(exc.value) == "query must contain at least one word" and exc.value.field == "query"
    for i in range(21):
        store.append_message(u, store.create_chat(u, title=f"c{i}").id, "user", f"topic number {i}")
    assert len(store.search(u, "topic")) == 20
    assert len(store.search(u, "topic", limit=0)) == 20
    assert len(store.search(u, "topic", limit=21)) == 21


def test_chats_with_the_same_updated_ms_page_by_id_newest_first(store: ChatStore) -> None:
    """Ties in updated_ms are broken by creation (row id, newest first), so pages neither skip nor
    repeat a chat however many share a millisecond."""
    u = store.ensure_user("ann")
    ids = [store.create_chat(u, title=f"c{i}").id for i in range(5)]
    Chat.update(updated_ms=1_700_000_000_000).execute()
    seen, token = [], ""
    while True:
        page, token = store.list_chats(u, 2, token)
        seen += [c.id for c in page]
        if not token:
            break
    assert seen == ids[::-1]
    assert store.last_chat(u).id == ids[-1]


# -- messages as stored and read back ------------------------------------------------------------

def test_messages_carry_their_chat_id_outcome_and_params(store: ChatStore) -> None:
    """get_chat's messages name their chat; a finished reply keeps its error message and its
    dropped_messages; params that are not JSON read back as {}."""
    u = store.ensure_user("ann")
    chat = store.create_chat(u)
    turn = store.begin_turn(u, chat.id, [{"role": "user", "content": "q"}], "m", {"seed": 3})
    assert store.finish_reply(turn.reply_message_id,
                              ReplyOutcome("part", "error", "boom", dropped_messages=2))
    _, messages = store.get_chat(u, chat.id)
    assert [m.chat_id for m in messages] == [chat.id, chat.id]
    reply = messages[-1]
    assert (reply.content, reply.status, reply.error_message, reply.dropped_messages, reply.params) == (
        "part", "error", "boom", 2, {"seed": 3})
    Message.update(params="{not json").where(Message.id == turn.reply_message_id).execute()
    assert store.get_chat(u, chat.id)[1][-1].params == {}
    assert store.get_chat_page(u, chat.id)[1][-1].params == {}  # the default page size
    with pytest.raises(ValueError, match="not a finished status: 'pending'"):
        store.finish_reply(turn.reply_message_id, ReplyOutcome("x", "pending"))


def test_finishing_a_reply_bumps_only_its_own_chat(store: ChatStore) -> None:
    u = store.ensure_user("ann")
    first = store.create_chat(u, title="first")
    store.append_message(u, first.id, "user", "hello")
    second = store.create_chat(u, title="second")
    turn = store.begin_turn(u, second.id, [{"role": "user", "content": "q"}], "m")
    Chat.update(updated_ms=1_000).execute()
    assert store.finish_reply(turn.reply_message_id, ReplyOutcome("a", "complete"))
    assert store.chat_info(u, first.id).updated_ms == 1_000
    assert store.chat_info(u, second.id).updated_ms > 1_000


def test_list_chats_counts_each_chats_messages_and_names_the_owner(store: ChatStore) -> None:
    u = store.ensure_user("ann")
    counts = {}
    for n in (0, 1, 3):
        chat = store.create_chat(u, title=f"n{n}")
        for i in range(n):
            store.append_message(u, chat.id, "user", f"m{i}")
        counts[chat.id] = n
    store.create_chat(store.ensure_user("bob"), title="not ann's")
    chats, _ = store.list_chats(u)
    assert {c.id: c.message_count for c in chats} == counts
    assert {c.owner for c in chats} == {"ann"}


def test_a_pending_replys_partial_text_is_not_context(store: ChatStore) -> None:
    """A reply still being written (pending, some text saved) is left out of the next turn."""
    u = store.ensure_user("ann")
    chat = store.create_chat(u)
    turn = store.begin_turn(u, chat.id, [{"role": "user", "content": "q"}], "m")
    assert store.save_partial(turn.reply_message_id, "half an answer")
    more = [{"role": "user", "content": "more"}]
    assert store.preview_turn(u, chat.id, more) == [{"role": "user", "content": "q"}, *more]


def test_turn_refusals_say_what_is_wrong(store: ChatStore) -> None:
    u = store.ensure_user("ann")
    chat = store.create_chat(u)
    cases = [
        ([{"content": "x"}], "role must be one of system, user, assistant, tool, got ''", "role"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": ""}],
         "messages[1].content must not be empty", "messages[1].content"),
    ]
    for new, message, field in cases:
        with pytest.raises(ChatRequestError) as exc:
            store.preview_turn(u, chat.id, new)
        assert (str(exc.value), exc.value.field) == (message, field)
    store.append_message(u, chat.id, "user", "hello")
    with pytest.raises(ChatRequestError) as exc:
        store.begin_turn(u, chat.id, [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "m")
    assert str(exc.value) == "a system message can only start a chat; this chat has messages already"
    store.max_chat_bytes = 6
    with pytest.raises(ChatTooLarge) as too_large:
        store.begin_turn(u, chat.id, [{"role": "user", "content": "ab"}], "m")
    assert too_large.value.field == "messages"


def test_title_refusals_say_what_is_wrong(store: ChatStore) -> None:
    u = store.ensure_user("ann")
    chat = store.create_chat(u)
    with pytest.raises(ChatRequestError) as exc:
        store.rename_chat(u, chat.id, " \t ")
    assert str(exc.value) == "title must not be empty"
    with pytest.raises(ChatRequestError) as exc:
        store.rename_chat(u, chat.id, "x" * 201)
    assert str(exc.value) == "title is 201 characters; at most 200"


def test_auto_title_drops_the_space_before_the_ellipsis() -> None:
    text = "a" * (store_mod.AUTO_TITLE_CHARS - 2) + " " + "b" * 10
    assert store_mod.auto_title(text) == "a" * (store_mod.AUTO_TITLE_CHARS - 2) + "…"


# -- leases: renewal, the window, a clean stop, whether a process lives -------------------------

def test_leases_window_renewal_and_end(store: ChatStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lease renewed exactly LEASE_S ago still holds its server's replies; one millisecond
    older it is gone. end_lease removes this server's lease only."""
    store.renew_lease()
    ServerLease.create(instance="other", host="elsewhere", pid=1, heartbeat_ms=0)
    u = store.ensure_user("bob")
    chat = store.create_chat(u)
    reply = store.begin_turn(u, chat.id, [{"role": "user", "content": "hi"}], "m").reply_message_id
    Message.update(writer="other").where(Message.id == reply).execute()
    now = 5_000_000
    monkeypatch.setattr(store_mod, "now_ms", lambda: now)
    ServerLease.update(heartbeat_ms=now - 60_000).where(ServerLease.instance == "other").execute()
    assert store.mark_interrupted(own=False) == 0
    ServerLease.update(heartbeat_ms=now - 60_001).where(ServerLease.instance == "other").execute()
    assert store.mark_interrupted(own=False) == 1
    monkeypatch.undo()
    ServerLease.create(instance="third", host="elsewhere", pid=1)
    store.end_lease()
    assert [lease.instance for lease in ServerLease.select()] == ["third"]


def test_process_alive_probes_without_signalling() -> None:
    """A live process is alive and is not sent a signal (kill with signal 0); an exited one is
    not alive; a pid the OS cannot even check (out of range) counts as alive (no guessing)."""
    child = subprocess.Popen([sys.executable, "-c",
                              "import signal, sys, time; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
                              "print('ready', flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        assert store_mod._process_alive(child.pid) is True
        time.sleep(0.05)
        assert child.poll() is None, "the probe must not signal the process"
    finally:
        child.kill()
        child.wait()
    assert store_mod._process_alive(child.pid) is False
    assert store_mod._process_alive(1 << 40) is True


# -- the size cap: what counts, the boundary, the message ----------------------------------------

def test_size_cap_counts_this_chat_only_from_zero_and_says_how_much(store: ChatStore) -> None:
    """The cap counts this chat's UTF-8 bytes (not other chats'; an empty chat holds 0), exactly
    the cap fits, and the refusal gives both sizes in MiB."""
    u = store.ensure_user("ann")
    empty = store.create_chat(u)
    store.max_chat_bytes = 3
    assert store.append_message(u, empty.id, "user", "abc").content == "abc"
    big = store.create_chat(u)
    store.max_chat_bytes = 2 << 20
    store.append_message(u, big.id, "user", "x" * (3 << 19))  # 1.5 MiB
    small = store.create_chat(u)
    assert store.append_message(u, small.id, "user", "y" * (1 << 20)).content  # 1 MiB: fits beside the big one
    with pytest.raises(ChatTooLarge) as exc:
        store.append_message(u, big.id, "user", "z" * (1 << 19) + "z")
    assert str(exc.value) == ("this chat holds 1.5 MiB of messages and the server keeps at most 2.0 MiB per chat "
                              "(--max-chat-bytes); start a new chat")


def test_new_chats_and_replies_as_stored(store: ChatStore) -> None:
    """A chat's id is 16 hex digits and its model "" by default; a pending reply names this
    server as its writer and stores its params as sorted JSON; a missing chat names its id."""
    u = store.ensure_user("ann")
    chat = store.create_chat(u)
    assert len(chat.id) == 16 and int(chat.id, 16) >= 0 and chat.model == ""
    turn = store.begin_turn(u, chat.id, [{"role": "user", "content": "q"}], "m", {"b": 2, "a": 1})
    row = Message.get_by_id(turn.reply_message_id)
    assert row.writer == store.instance and row.params == '{"a": 1, "b": 2}'
    with pytest.raises(ChatNotFound) as exc:
        store.chat_info(u, "0123456789abcdef")
    assert exc.value.chat_id == "0123456789abcdef"


def test_store_defaults_counts_and_close(tmp_path: Path) -> None:
    """A store names itself host:pid:8 hex digits (unique per store), caps chats at 16 MiB by
    default, counts a new chat's messages (0, or 1 with a system prompt), pages 200 messages by
    default with their chat's id, says why a turn has nothing to answer, and close() closes."""
    a = ChatStore(str(tmp_path / "a.db"))
    a.close()
    s = ChatStore(str(tmp_path / "b.db"))
    try:
        assert re.fullmatch(rf"{re.escape(s.host[:60])}:{os.getpid()}:[0-9a-f]{{8}}", s.instance)
        assert s.instance != a.instance
        assert s.max_chat_bytes == 16 << 20
        u = s.ensure_user("ann")
        assert s.create_chat(u).message_count == 0
        chat = s.create_chat(u, system_prompt="sys")
        assert chat.message_count == 1
        s.append_message(u, chat.id, "user", "hi")
        _, page, _ = s.get_chat_page(u, chat.id)
        assert [m.content for m in page] == ["sys", "hi"] and {m.chat_id for m in page} == {chat.id}
        s.append_message(u, chat.id, "assistant", "yo")
        with pytest.raises(ChatRequestError) as exc:
            s.begin_turn(u, chat.id, [], "m")
        assert str(exc.value) == "nothing to answer: send a user message or tool results (the chat ends with neither)"
    finally:
        s.close()
    assert s.db.is_closed()
