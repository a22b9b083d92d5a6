"""Runs generations on worker threads and hands their events to asyncio.

Admission is a bounded FIFO: at most `max_running` generations run at once, at most
`queue_size` wait; one more is refused at once (QueueFull) rather than left to wait without
bound. A waiting request is told its place whenever it changes. Events cross from the
worker thread to the event loop through `call_soon_threadsafe`, so the loop never blocks.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .generation import Event, FinishedEvent, Generation


class QueueFull(RuntimeError):
    def __init__(self, queue_size: int, retry_after_s: int = 1) -> None:
        super().__init__(f"the server is busy: {queue_size} requests are already waiting; retry shortly")
        self.retry_after_s = retry_after_s


@dataclass
class QueuedEvent:
    position: int


class _Ticket:
    def __init__(self) -> None:
        self.ready = asyncio.Event()
        self.position_changed = asyncio.Event()


class GenerationRunner:
    def __init__(self, max_running: int = 4, queue_size: int = 32) -> None:
        self.max_running = max_running
        self.queue_size = queue_size
        self._executor = ThreadPoolExecutor(max_workers=max_running, thread_name_prefix="generate")
        self._running = 0
        self._waiting: collections.deque[_Ticket] = collections.deque()
        self.active_cancel_flags: set[threading.Event] = set()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def admit(self) -> _Ticket:
        """Takes a place (refusing at once when the queue is full); call before any slow work."""
        ticket = _Ticket()
        if self._running < self.max_running and not self._waiting:
            self._running += 1
            ticket.ready.set()
            return ticket
        if len(self._waiting) >= self.queue_size:
            raise QueueFull(self.queue_size)
        self._waiting.append(ticket)
        return ticket

    def _release(self) -> None:
        self._running -= 1
        while self._waiting and self._running < self.max_running:
            ticket = self._waiting.popleft()
            self._running += 1
            ticket.ready.set()
        for ticket in self._waiting:
            ticket.position_changed.set()

    def _abandon(self, ticket: _Ticket) -> None:
        if ticket in self._waiting:
            self._waiting.remove(ticket)
            for other in self._waiting:
                other.position_changed.set()
        elif ticket.ready.is_set():
            self._release()

    async def wait_turn(self, ticket: _Ticket) -> AsyncIterator[QueuedEvent]:
        """Yields the ticket's queue position each time it changes, until its turn comes."""
        try:
            while not ticket.ready.is_set():
                yield QueuedEvent(self._waiting.index(ticket) + 1)
                ticket.position_changed.clear()
                waiters = [asyncio.ensure_future(ticket.ready.wait()), asyncio.ensure_future(ticket.position_changed.wait())]
                try:
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waiters:
                        w.cancel()
        except BaseException:
            self._abandon(ticket)
            raise

    async def run(
        self,
        ticket: _Ticket,
        make_generation: Callable[[threading.Event], Generation],
        on_finished: Callable[[FinishedEvent], None] | None = None,
    ) -> AsyncIterator[Event]:
        """Runs the generation (the ticket must be ready); cancelling the consumer stops it within a step.

        `on_finished` is called on the worker thread with the final event, even when the
        consumer has gone away (a cancelled call), so the ending is always recorded.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event | BaseException | None] = asyncio.Queue()
        cancelled = threading.Event()
        self.active_cancel_flags.add(cancelled)

        def work() -> None:
            try:
                for event in make_generation(cancelled):
                    if isinstance(event, FinishedEvent) and on_finished is not None:
                        on_finished(event)
                    loop.call_soon_threadsafe(queue.put_nowait, event)
            except BaseException as exc:  # loading or validation failed on the worker
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        future = loop.run_in_executor(self._executor, work)
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, FinishedEvent):
                    break
        finally:
            cancelled.set()
            self.active_cancel_flags.discard(cancelled)
            try:
                await asyncio.shield(future)
            except BaseException:
                pass
            self._release()
