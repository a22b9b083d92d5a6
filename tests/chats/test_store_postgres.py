"""The chat store on a real PostgreSQL server (the replicas issue, item 1): the same operations as
on SQLite, keyword search in PostgreSQL itself (tsvector, GIN, ts_headline), concurrent writers
on one chat from threads and from separate processes (no message lost or duplicated), and a
starting replica that leaves the replies another live replica is writing alone."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from tokenwire.server.chats.db import Message, ServerLease, is_postgres
from tokenwire.server.chats.store import ChatNotFound, ChatStore, ReplyOutcome
from tokenwire.server.chats.worker import ChatWorker
from tokenwire.server.engine.records import Usage


@pytest.fixture
def store(pg_url):
    s = ChatStore(pg_url)
    yield s
    s.close()


def test_the_store_works_on_postgres(store) -> None:
    assert is_postgres(store.db)
    ann, bob = store.ensure_user("ann"), store.ensure_user("bob")
    chat = store.create_chat(ann, system_prompt="Be brief.")
    turn = store.begin_turn(ann, chat.id, [{"role": "user", "content": "Tell me about Zürich's lakes"}], "m:1")
    assert [m["role"] for m in turn.context] == ["system", "user"]
    assert store.finish_reply(turn.reply_message_id, ReplyOutcome("Lake Zurich is long.", "complete",
                                                                  usage=Usage(prompt_tokens=9, completion_tokens=5)))
    info, messages = store.get_chat(ann, chat.id)
    assert [m.content for m in messages] == ["Be brief.", "Tell me about Zürich's lakes", "Lake Zurich is long."]
    assert messages[-1].usage.completion_tokens == 5 and info.message_count == 3 and info.title.startswith("Tell")
    with pytest.raises(ChatNotFound):
        store.get_chat(bob, chat.id)
    for i in range(3):
        store.create_chat(ann, title=f"chat {i}")
    first, token = store.list_chats(ann, page_size=2)
    rest, last = store.list_chats(ann, page_size=2, page_token=token)
    assert len(first) == 2 and len(rest) == 2 and last == ""
    assert len({c.id for c in first + rest}) == 4
    renamed = store.rename_chat(ann, chat.id, "  lakes  ")
    assert renamed.title == "lakes"
    assert store.delete_chat(ann, chat.id) == 3


def test_search_is_postgres_native_with_highlights(store) -> None:
    ann, bob = store.ensure_user("ann"), store.ensure_user("bob")
    chat = store.create_chat(ann)
    store.append_message(ann, chat.id, "user", "The quick brown fox jumps over the lazy dog near the river bank")
    store.append_message(ann, chat.id, "assistant", "Foxes are quick.")
    other = store.create_chat(bob)
    store.append_message(bob, other.id, "user", "a quick fox of bob's")
    results = store.search(ann, "quick jum")  # every word; the last one as a prefix
    assert [r.chat.id for r in results] == [chat.id]
    spans = results[0].snippets[0].spans
    assert ("quick", True) in spans and ("jumps", True) in spans, spans
    assert "quick brown fox jumps over" in "".join(t for t, _ in spans)
    assert [r.chat.id for r in store.search(bob, "quick")] == [other.id], "only the caller's chats"
    assert store.search(ann, "it's & | ! :*") == [], "nothing the user types is tsquery syntax"
    plan = store.db.execute_sql("EXPLAIN SELECT id FROM message WHERE content_tsv @@ to_tsquery('simple', 'fox')")
    assert any("content_tsv" in row[0] for row in plan.fetchall())


def test_threads_writing_one_chat_lose_and_duplicate_nothing(store) -> None:
    ann = store.ensure_user("ann")
    chat = store.create_chat(ann)
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(15):
                store.append_message(ann, chat.id, "user", f"w{n}-{i}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    _, messages = store.get_chat(ann, chat.id)
    assert sorted(m.content for m in messages) == sorted(f"w{n}-{i}" for n in range(6) for i in range(15))
    assert [m for m in messages] and [m.id for m in messages] == sorted(m.id for m in messages)
    assert len({m.id for m in messages}) == 90


REPLICA = """
import json, sys, time
from tokenwire.server.chats.store import ChatStore
store = ChatStore(sys.argv[1])
user = store.ensure_user("ann")
mode = sys.argv[2]
if mode == "append":
    for i in range(int(sys.argv[4])):
        store.append_message(user, sys.argv[3], "user", f"{sys.argv[5]}-{i}")
elif mode == "pending":  # a replica writing a reply, alive until killed
    store.renew_lease()
    turn = store.begin_turn(user, sys.argv[3], [{"role": "user", "content": "hi"}], "m:1")
    print(json.dumps({"reply": turn.reply_message_id}), flush=True)
    time.sleep(600)
"""


def test_two_replicas_append_to_one_chat_at_once(store, pg_url) -> None:
    ann = store.ensure_user("ann")
    chat = store.create_chat(ann)
    replicas = [subprocess.Popen([sys.executable, "-c", REPLICA, pg_url, "append", chat.id, "40", name])
                for name in ("a", "b")]
    assert [r.wait(120) for r in replicas] == [0, 0]
    _, messages = store.get_chat(ann, chat.id)
    assert sorted(m.content for m in messages) == sorted(f"{n}-{i}" for n in "ab" for i in range(40))
    assert sorted(m.id for m in messages) == [m.id for m in messages]


def test_a_starting_replica_leaves_a_live_replicas_reply_alone(store, pg_url) -> None:
    ann = store.ensure_user("ann")
    chat = store.create_chat(ann)
    replica = subprocess.Popen([sys.executable, "-c", REPLICA, pg_url, "pending", chat.id],
                               stdout=subprocess.PIPE, text=True)
    try:
        reply = json.loads(replica.stdout.readline())["reply"]
        second = ChatWorker.open(pg_url)  # another replica starts
        try:
            assert second.store.interrupted_at_start == 0
            assert Message.get_by_id(reply).status == "pending"
            replica.send_signal(signal.SIGKILL)  # the first replica dies
            replica.wait(30)
            assert second.store.mark_interrupted(own=False) == 1  # its next lease renewal
            assert Message.get_by_id(reply).status == "interrupted"
            assert [lease.instance for lease in ServerLease.select()] == [second.store.instance]
        finally:
            second.close()
    finally:
        if replica.poll() is None:
            replica.kill()
        time.sleep(0)
