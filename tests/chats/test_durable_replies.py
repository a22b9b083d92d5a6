"""A reply is never lost to a failing database write (the Security issue, item 3): reads stay
answered while another process holds the write lock, an outcome that cannot be stored is kept
(in memory and in the journal beside the database), retried until it is stored, and stored at
the next start after a crash; a pending reply is marked interrupted only when the server writing
it is gone. A real SQLite file, locked by a second real connection."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess

import pytest
from conftest import wait_until

from tokenwire.server.chats import db as chat_db
from tokenwire.server.chats import worker as chat_worker
from tokenwire.server.chats.db import Message, ServerLease, now_ms
from tokenwire.server.chats.reply_journal import ReplyJournal
from tokenwire.server.chats.store import INTERRUPTED_MESSAGE, ChatStore, ReplyOutcome
from tokenwire.server.chats.worker import ChatWorker, ReplyNotStored, StoreUnavailable
from tokenwire.server.engine.records import Usage


@pytest.fixture(autouse=True)
def short_waits(monkeypatch) -> None:
    """A locked database fails in 0.1 s instead of 5, and a stream waits 0.6 s for its reply."""
    monkeypatch.setattr(chat_db, "BUSY_TIMEOUT_S", 0.1)
    monkeypatch.setitem(chat_db.SQLITE_PRAGMAS, "busy_timeout", 100)
    monkeypatch.setattr(chat_worker, "STORE_GRACE_S", 0.6)
    monkeypatch.setattr(chat_worker, "RETRY_FIRST_S", 0.05)
    monkeypatch.setattr(chat_worker, "RETRY_MAX_S", 0.2)


class Lock:
    """Another process's write transaction on the database (BEGIN IMMEDIATE holds the write lock)."""

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=5)

    def __enter__(self) -> Lock:
        self.conn.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, *exc) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


def pending_turn(worker: ChatWorker, text: str = "hello") -> tuple[int, str, int]:
    store = worker.store
    user = store.ensure_user("ann")
    chat = store.create_chat(user)
    turn = store.begin_turn(user, chat.id, [{"role": "user", "content": text}], "m:1")
    return user, chat.id, turn.reply_message_id


def outcome(text: str) -> ReplyOutcome:
    return ReplyOutcome(text, "complete", usage=Usage(prompt_tokens=3, completion_tokens=5))


async def test_a_locked_database_keeps_the_reply_until_it_is_stored_and_reads_go_on(tmp_path) -> None:
    path = str(tmp_path / "chats.db")
    worker = ChatWorker.open(path)
    try:
        user, chat_id, reply_id = pending_turn(worker)
        with Lock(path):
            # Reads never wait for the writer: a key lookup and the chat itself, while it is locked.
            assert await asyncio.wait_for(worker.read(worker.keys.required), 2) is False
            chat, messages = await asyncio.wait_for(worker.read(worker.store.get_chat, user, chat_id), 2)
            assert [m.status for m in messages] == ["complete", "pending"]
            # A write through the API is a clear StoreUnavailable, not a crash.
            with pytest.raises(StoreUnavailable, match="database is locked"):
                await worker.call(worker.store.create_chat, user, "another")
            future = worker.finish_reply(reply_id, outcome("the whole reply"))
            with pytest.raises(ReplyNotStored, match="kept and stored"):
                await asyncio.wait_for(asyncio.wrap_future(future), 5)
            assert worker.unstored()[reply_id].content == "the whole reply"
            journaled = dict(worker.journal.entries())
            assert journaled[reply_id].content == "the whole reply"
            assert journaled[reply_id].usage.completion_tokens == 5
            assert oct(os.stat(worker.journal.folder).st_mode & 0o777) == "0o700"
        # The lock is gone: the retry stores it, and the journal entry goes.
        wait_until(lambda: not worker.unstored())
        _, messages = await worker.read(worker.store.get_chat, user, chat_id)
        assert (messages[-1].status, messages[-1].content) == ("complete", "the whole reply")
        assert messages[-1].usage.prompt_tokens == 3
        assert worker.journal.entries() == []
    finally:
        worker.close()


def test_a_reply_journaled_before_a_crash_is_stored_at_the_next_start(tmp_path) -> None:
    path = str(tmp_path / "chats.db")
    worker = ChatWorker.open(path)
    user, chat_id, reply_id = pending_turn(worker)
    instance = worker.store.instance
    with Lock(path):
        future = worker.finish_reply(reply_id, outcome("finished before the crash"))
        with pytest.raises(ReplyNotStored):
            future.result(5)
        # The crash: this server's threads stop before the database takes the write again.
        worker._closing = True
        worker._executor.shutdown(wait=True, cancel_futures=True)
        worker._readers.shutdown(wait=True)
    ServerLease.update(pid=dead_pid()).where(ServerLease.instance == instance).execute()
    again = ChatWorker.open(path)  # the next start
    try:
        _, messages = again.store.get_chat(user, chat_id)
        assert (messages[-1].status, messages[-1].content) == ("complete", "finished before the crash")
        assert again.store.interrupted_at_start == 0, "a journaled reply is not 'interrupted'"
        assert ReplyJournal.beside(path).entries() == []
    finally:
        again.close()


def test_the_journal_skips_a_torn_entry(tmp_path) -> None:
    journal = ReplyJournal(tmp_path / "replies")
    assert journal.add(7, outcome("seven"))
    (journal.folder / "8.json").write_text('{"reply_id": 8, "content": "cut sh')
    assert [(rid, o.content) for rid, o in journal.entries()] == [(7, "seven")]
    assert oct(os.stat(journal.folder / "7.json").st_mode & 0o777) == "0o600"


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def other_servers_reply(store: ChatStore, writer: str) -> int:
    user = store.ensure_user("bob")
    chat = store.create_chat(user)
    reply = store.begin_turn(user, chat.id, [{"role": "user", "content": "hi"}], "m:1").reply_message_id
    Message.update(writer=writer).where(Message.id == reply).execute()
    return reply


def status_of(reply_id: int) -> str:
    return Message.get_by_id(reply_id).status


def test_replies_another_running_server_writes_stay_pending(tmp_path) -> None:
    store = ChatStore(str(tmp_path / "chats.db"))
    try:
        store.renew_lease()
        ServerLease.create(instance="peer", host=store.host, pid=os.getpid(), heartbeat_ms=now_ms())
        ServerLease.create(instance="far", host="another-host", pid=dead_pid(), heartbeat_ms=now_ms())
        peer, far = other_servers_reply(store, "peer"), other_servers_reply(store, "far")
        legacy = other_servers_reply(store, "")
        own = other_servers_reply(store, store.instance)
        assert store.mark_interrupted(own=False) == 1  # only the reply from before leases
        assert [status_of(r) for r in (peer, far, legacy, own)] == ["pending", "pending", "interrupted", "pending"]
        # The peer's process exits (same host): its replies are interrupted at once.
        ServerLease.update(pid=dead_pid()).where(ServerLease.instance == "peer").execute()
        assert store.mark_interrupted(own=False) == 1 and status_of(peer) == "interrupted"
        assert Message.get_by_id(peer).error_message == INTERRUPTED_MESSAGE
        # The far server stops renewing: gone once its lease is older than LEASE_S.
        ServerLease.update(heartbeat_ms=now_ms() - 61_000).where(ServerLease.instance == "far").execute()
        assert store.mark_interrupted(own=False) == 1 and status_of(far) == "interrupted"
        assert [lease.instance for lease in ServerLease.select()] == [store.instance], "gone leases are removed"
        assert status_of(own) == "pending"
        assert store.mark_interrupted(own=True) == 1 and status_of(own) == "interrupted"  # at start-up
    finally:
        store.close()
