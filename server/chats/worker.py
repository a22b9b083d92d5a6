"""Runs ChatStore calls on one dedicated thread, so peewee never blocks the event loop.

One thread serialises every database call of the server: SQLite takes one writer at a time
anyway, nothing in this process ever waits on "database is locked", and the work queued by
the scheduler threads (replies that ended) lands in order with the rest.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any, TypeVar

from .api_keys import KeyRing
from .store import ChatStore

T = TypeVar("T")


class ChatWorker:
    def __init__(self, store: ChatStore, executor: concurrent.futures.ThreadPoolExecutor | None = None) -> None:
        self.store = store
        self.keys = KeyRing(store.db)
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="chat-store")

    @classmethod
    def open(cls, target: str | None) -> ChatWorker:
        """Opens (creating, migrating) the database on the store's own thread, where every later
        call runs too; replies left pending by a server that died are marked interrupted."""
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="chat-store")

        def open_store() -> ChatStore:
            store = ChatStore(target)
            store.interrupted_at_start = store.mark_interrupted()
            return store

        try:
            return cls(executor.submit(open_store).result(), executor)
        except BaseException:
            executor.shutdown(wait=False)
            raise

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Awaits fn(*args, **kwargs) run on the store's thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        """Queues fn on the store's thread from any thread (e.g. a scheduler thread); never blocks."""
        return self._executor.submit(fn, *args, **kwargs)

    def close(self) -> None:
        """Finishes the queued work (replies still being stored), then closes the database."""
        try:
            self._executor.submit(self.store.close).result(timeout=30)
        except (RuntimeError, concurrent.futures.TimeoutError):
            pass
        self._executor.shutdown(wait=True)
