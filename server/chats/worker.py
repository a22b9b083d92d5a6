"""Runs ChatStore calls off the event loop: writes on one thread, reads on a few others.

One writer thread serialises every write of the server: SQLite takes one writer at a time
anyway, nothing in this process waits on another of its own writes, and the work queued by
the scheduler threads (replies that ended) lands in order with the rest. Reads (API key
lookups, listings, a chat's messages, search) run on reader threads with connections of their
own: in WAL mode they never wait for a writer, so a write stuck on a lock held by another
process does not stall requests that only read.

How a reply ended is stored durably (`finish_reply`): when the write fails, the outcome is kept
in memory and, for an SQLite file, in a journal beside it (reply_journal.py), and retried with
back-off until it is stored; the caller's future fails with ReplyNotStored after
STORE_GRACE_S, so the stream can say so instead of claiming success. A server starting stores
what the journal holds before it marks the replies of gone servers interrupted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import peewee as pw

from .api_keys import KeyRing
from .db import is_sqlite
from .reply_journal import ReplyJournal
from .store import LEASE_RENEW_S, ChatStore, ReplyOutcome

T = TypeVar("T")
log = logging.getLogger("tokenwire.chats")

READER_THREADS = 2
STORE_GRACE_S = 3.0  # how long a reply's stream waits for its outcome to be stored
RETRY_FIRST_S, RETRY_MAX_S = 0.25, 30.0  # back-off between attempts to store an outcome
# What a failed database call raises: peewee's wrappers, the driver's own, the disk's.
STORE_FAILURES = (pw.PeeweeException, sqlite3.Error, OSError)


class StoreUnavailable(RuntimeError):
    """The chat database could not do the call (locked by another process, disk full, gone)."""

    retry_after_s = 1

    def __init__(self, exc: BaseException) -> None:
        super().__init__(f"the chat database is unavailable ({' '.join(str(exc).split())[:200] or type(exc).__name__}); "
                         "retry shortly")


class ReplyNotStored(RuntimeError):
    """A reply was generated (and streamed) but could not be stored yet; it is kept and retried."""

    def __init__(self, reply_id: int, exc: BaseException) -> None:
        super().__init__(
            f"the reply was generated but the chat database could not store it yet ({' '.join(str(exc).split())[:200]}); "
            "it is kept and stored as soon as the database takes writes again: reload the chat later "
            "rather than asking again")
        self.reply_id = reply_id


class ChatWorker:
    def __init__(self, store: ChatStore, executor: concurrent.futures.ThreadPoolExecutor | None = None,
                 journal: ReplyJournal | None = None) -> None:
        self.store = store
        self.keys = KeyRing(store.db)
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="chat-store")
        self._readers = concurrent.futures.ThreadPoolExecutor(READER_THREADS, thread_name_prefix="chat-read")
        self.journal = journal
        self._unstored: dict[int, ReplyOutcome] = {}  # outcomes not stored yet (also in the journal)
        self._lock = threading.Lock()
        self._timers: set[threading.Timer] = set()
        self._closing = False
        self._lease_timer: threading.Timer | None = None

    @classmethod
    def open(cls, target: str | None) -> ChatWorker:
        """Opens (creating, migrating) the database on the store's writer thread, where every later
        write runs too; stores the outcomes a previous run journaled, takes this server's lease and
        marks interrupted the replies left pending by servers that are gone."""
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="chat-store")

        def open_store() -> ChatStore:
            return ChatStore(target)

        try:
            store = executor.submit(open_store).result()
        except BaseException:
            executor.shutdown(wait=False)
            raise
        journal = ReplyJournal.beside(store.db.database) if is_sqlite(store.db) else None
        worker = cls(store, executor, journal)
        try:
            executor.submit(worker._start).result()
        except BaseException:
            worker.close()
            raise
        return worker

    def _start(self) -> None:
        replayed = 0
        for reply_id, outcome in self.journal.entries() if self.journal else ():
            self.store.finish_reply(reply_id, outcome)  # only changes a reply still pending
            self.journal.remove(reply_id)
            replayed += 1
        if replayed:
            log.info("stored %d reply outcome(s) journaled by an earlier run", replayed)
        self.store.renew_lease()
        self.store.interrupted_at_start = self.store.mark_interrupted()
        self._schedule_lease()

    # ---- running calls ---------------------------------------------------------------------------

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Awaits fn(*args, **kwargs) run on the writer thread (anything that writes)."""
        return await self._run(self._executor, fn, *args, **kwargs)

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Awaits fn(*args, **kwargs) run on a reader thread: it must only read."""
        return await self._run(self._readers, fn, *args, **kwargs)

    @staticmethod
    async def _run(pool: concurrent.futures.Executor, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(pool, functools.partial(fn, *args, **kwargs))
        except STORE_FAILURES as exc:
            log.warning("chat database call %s failed: %s", getattr(fn, "__name__", fn), exc)
            raise StoreUnavailable(exc) from exc

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        """Queues fn on the writer thread from any thread (e.g. a scheduler thread); never blocks."""
        return self._executor.submit(fn, *args, **kwargs)

    # ---- outcomes that must not be lost ------------------------------------------------------------

    def finish_reply(self, reply_id: int, outcome: ReplyOutcome) -> concurrent.futures.Future[bool]:
        """Stores how a reply ended, from any thread, never blocking. The future is the store's
        answer (False: the reply was no longer pending), or ReplyNotStored when it could not be
        stored within STORE_GRACE_S; the outcome is kept and retried until it is stored."""
        result: concurrent.futures.Future[bool] = concurrent.futures.Future()
        self._attempt(reply_id, outcome, result, 0, time.monotonic())
        return result

    def unstored(self) -> dict[int, ReplyOutcome]:
        """Outcomes waiting for the database (for tests and the shutdown log)."""
        with self._lock:
            return dict(self._unstored)

    def _attempt(self, reply_id: int, outcome: ReplyOutcome, result: concurrent.futures.Future,
                 attempt: int, first: float) -> None:
        try:
            self._executor.submit(self._store_outcome, reply_id, outcome, result, attempt, first)
        except RuntimeError:  # shutting down: the journal keeps it for the next start
            if not result.done():
                result.set_exception(ReplyNotStored(reply_id, RuntimeError("the server is stopping")))

    def _store_outcome(self, reply_id: int, outcome: ReplyOutcome, result: concurrent.futures.Future,
                       attempt: int, first: float) -> None:
        try:
            stored = self.store.finish_reply(reply_id, outcome)
        except ValueError as exc:  # a programming error (not a finished status): no retry helps
            if not result.done():
                result.set_exception(exc)
            return
        except STORE_FAILURES as exc:
            self._keep(reply_id, outcome, attempt, exc)
            delay = min(RETRY_FIRST_S * 2 ** attempt, RETRY_MAX_S)
            if not result.done() and time.monotonic() + delay - first > STORE_GRACE_S:
                result.set_exception(ReplyNotStored(reply_id, exc))
            self._retry_later(delay, reply_id, outcome, result, attempt + 1, first)
            return
        with self._lock:
            was_kept = self._unstored.pop(reply_id, None) is not None
        if was_kept:
            if self.journal:
                self.journal.remove(reply_id)
            log.info("stored reply %d after %d failed attempt(s)", reply_id, attempt)
        if not result.done():
            result.set_result(stored)

    def _keep(self, reply_id: int, outcome: ReplyOutcome, attempt: int, exc: BaseException) -> None:
        with self._lock:
            new = reply_id not in self._unstored
            self._unstored[reply_id] = outcome
        if new:
            log.error("could not store reply %d (%s): kept%s, retrying", reply_id, exc,
                      " in the journal" if self.journal and self.journal.add(reply_id, outcome) else " in memory")
        elif attempt % 8 == 0:
            log.warning("still cannot store reply %d (attempt %d): %s", reply_id, attempt, exc)

    def _retry_later(self, delay: float, *args: Any) -> None:
        with self._lock:
            if self._closing:
                return
            timer = threading.Timer(delay, self._fire, args=args)
            timer.daemon = True
            self._timers.add(timer)
        timer.start()

    def _fire(self, *args: Any) -> None:
        with self._lock:
            self._timers = {t for t in self._timers if t.is_alive() and t is not threading.current_thread()}
        self._attempt(*args)

    # ---- the lease ---------------------------------------------------------------------------------

    def _schedule_lease(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._lease_timer = threading.Timer(LEASE_RENEW_S, self._renew)
            self._lease_timer.daemon = True
            self._lease_timer.start()

    def _renew(self) -> None:
        def renew() -> None:
            try:
                self.store.renew_lease()
                marked = self.store.mark_interrupted(own=False)
                if marked:
                    log.info("marked %d reply(ies) of a server that is gone as interrupted", marked)
            except STORE_FAILURES as exc:
                log.warning("could not renew this server's lease on the chat database: %s", exc)
            finally:
                self._schedule_lease()

        try:
            self._executor.submit(renew)
        except RuntimeError:
            pass

    # ---- closing -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Finishes the queued work (replies still being stored, one last try for those that
        failed), ends the lease and closes the database; what is still unstored stays journaled."""
        with self._lock:
            self._closing = True
            timers, self._timers = self._timers, set()
            if self._lease_timer is not None:
                self._lease_timer.cancel()
        for timer in timers:
            timer.cancel()

        def last_try() -> None:
            for reply_id, outcome in self.unstored().items():
                try:
                    self.store.finish_reply(reply_id, outcome)
                except STORE_FAILURES as exc:
                    log.error("reply %d is still not stored (%s); %s", reply_id, exc,
                              "the journal keeps it for the next start" if self.journal else "it is lost")
                    continue
                with self._lock:
                    self._unstored.pop(reply_id, None)
                if self.journal:
                    self.journal.remove(reply_id)
            try:
                self.store.end_lease()
            except STORE_FAILURES:
                pass
            self.store.close()

        try:
            self._executor.submit(last_try).result(timeout=30)
        except (RuntimeError, concurrent.futures.TimeoutError):
            pass
        self._executor.shutdown(wait=True)
        self._readers.shutdown(wait=True)
