"""Chat replies being written: each one's events, numbered, and who watches it.

A Generate on a stored chat hands its reply to `LiveReplies.start`: a task of its own relays the
sequence's events into the reply's log and, however the reply ends, ends the sequence and
releases the model. The Generate call then watches the reply like any other watcher
(History.WatchReply), so its call ending only detaches it. Every event is numbered in the log
(GenerateResponse.event_id, from 1), so a client that lost its stream asks for what came after
the last one it saw, and gets exactly the events the others got.

A reply ends when its sequence does: by itself, by StopReply (stored as STOPPED), when its Generate
call's deadline passes, when the server drains, or when nobody has watched it for its
`detached_s` (CANCELLED, with a note saying so). Until then its sequence runs in the scheduler
like any other, so it keeps its user's stream slot (`--max-streams-per-user`). A reply that ended
stays watchable for LINGER_S (a client that reconnects just after the end still gets the end),
then only the store has it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from tokenwire.server.engine.records import ReplyStatus
from tokenwire.v1 import inference_pb2 as pb

log = logging.getLogger("tokenwire.server")

LINGER_S = 30.0  # how long a reply that ended can still be watched (replayed to its end)
# Replies one user may have running with nobody watching: one more stops the oldest, so a client
# that posts messages and hangs up cannot fill the batch without holding a connection.
MAX_DETACHED_PER_USER = 4


class MessageNotFound(LookupError):
    """The chat has no message of that id."""

    reason = "MESSAGE_NOT_FOUND"
    field = "message_id"

    def __init__(self, chat_id: str, message_id: int) -> None:
        super().__init__(f"chat {chat_id!r} has no message {message_id}")


class ReplyNotLive(RuntimeError):
    """The message is not a reply being written here (REPLY_FINISHED: it is stored as it ended;
    REPLY_ON_ANOTHER_SERVER: pending, but another server of the cluster writes it)."""

    field = "message_id"

    def __init__(self, message: str, reason: str = "REPLY_FINISHED") -> None:
        super().__init__(message)
        self.reason = reason


# Stops a reply's sequence; the reply is stored with this status and, when not empty, this note.
Stopper = Callable[[ReplyStatus, str], None]


class LiveReply:
    """One reply being written: its log of events so far, its watchers, its end."""

    def __init__(self, chat_id: str, message_id: int, user_id: int, detached_s: float, stop: Stopper) -> None:
        self.chat_id = chat_id
        self.message_id = message_id
        self.user_id = user_id  # its chat's owner: the only one who may watch or stop it
        self.detached_s = detached_s  # how long it goes on with nobody watching
        self.events: list[pb.GenerateResponse] = []
        self.error: BaseException | None = None  # what ended it early, when it did not end with `finished`
        self.done = False
        self.stopping = False  # asked to stop (done follows once its sequence has ended)
        self.ended = asyncio.Event()  # set once it is over (its outcome handed to the store)
        self._stop = stop
        self._watchers = 0
        self._loop = asyncio.get_running_loop()
        self._changed: asyncio.Future = self._loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self.on_detached: Callable[[LiveReply], None] | None = None  # set by LiveReplies.start

    @property
    def watchers(self) -> int:
        return self._watchers

    def append(self, response: pb.GenerateResponse) -> None:
        response.event_id = len(self.events) + 1
        self.events.append(response)
        self._wake()

    def end(self, error: BaseException | None = None) -> None:
        if self.done:
            return
        self.done, self.error = True, error
        self._cancel_timer()
        self.ended.set()
        self._wake()

    def stop(self, status: ReplyStatus, note: str = "") -> None:
        """Ends the reply's sequence (within one scheduler step); no-op once it is over."""
        if not self.done:
            self.stopping = True
            self._stop(status, note)

    async def watch(self, after: int = 0) -> AsyncIterator[pb.GenerateResponse]:
        """The events after event `after`, then the next ones as they come, to the end; raises
        what ended the reply early. Close it (aclose) when leaving early: the last watcher to
        leave starts the reply's detached timer."""
        self._watchers += 1
        self._cancel_timer()
        try:
            at = after
            while True:
                while at < len(self.events):
                    at += 1
                    yield self.events[at - 1]
                if self.done:
                    break
                await asyncio.shield(self._changed)
            if self.error is not None:
                raise self.error
        finally:
            self._watchers -= 1
            if not self._watchers and not self.done:
                self._detached()

    def _detached(self) -> None:
        if self.on_detached is not None:
            self.on_detached(self)
        if self.done:
            return
        if self.detached_s <= 0:
            self._abandon()
        else:
            self._timer = self._loop.call_later(self.detached_s, self._abandon)

    def _abandon(self) -> None:
        self._timer = None
        if self._watchers or self.done:
            return
        log.info("chat %s: reply %d stopped, nobody watched it for %gs", self.chat_id, self.message_id,
                 self.detached_s)
        self.stop(ReplyStatus.CANCELLED, f"stopped after {self.detached_s:g} s with no client watching it "
                                         "(--detached-reply-s)")

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake(self) -> None:
        if not self._changed.done():
            self._changed.set_result(None)
        self._changed = self._loop.create_future()


class LiveReplies:
    """The replies being written on this server (and those that ended within LINGER_S), by
    (chat id, message id)."""

    def __init__(self) -> None:
        self._replies: dict[tuple[str, int], LiveReply] = {}
        self._tasks: set[asyncio.Task] = set()

    def start(self, reply: LiveReply, events: AsyncIterator[pb.GenerateResponse], on_end: Callable[[], None]) -> None:
        """Relays `events` into the reply's log on a task of its own; `on_end` runs when they
        stop, however they stop (it cancels the sequence and releases the model)."""
        self._replies[(reply.chat_id, reply.message_id)] = reply
        reply.on_detached = self._limit_detached
        task = asyncio.create_task(self._relay(reply, events, on_end), name=f"reply-{reply.message_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, reply: LiveReply, events: AsyncIterator[pb.GenerateResponse],
                     on_end: Callable[[], None]) -> None:
        error: BaseException | None = None
        try:
            async for response in events:
                reply.append(response)
        except asyncio.CancelledError:  # the event loop is closing
            error = ReplyNotLive("the server stopped while this reply was being written")
            raise
        except Exception as exc:  # noqa: BLE001 - every watcher ends with it (a status, or UNKNOWN)
            log.info("chat %s: reply %d ended early: %s: %s", reply.chat_id, reply.message_id, type(exc).__name__, exc)
            error = exc
        finally:
            try:
                on_end()
            except Exception:  # noqa: BLE001 - the reply must still end for its watchers
                log.exception("ending reply %d failed", reply.message_id)
            reply.end(error)
            self._linger(reply)

    def _linger(self, reply: LiveReply) -> None:
        try:
            asyncio.get_running_loop().call_later(LINGER_S, self._forget, reply)
        except RuntimeError:  # no loop any more
            self._forget(reply)

    def _forget(self, reply: LiveReply) -> None:
        key = (reply.chat_id, reply.message_id)
        if self._replies.get(key) is reply:
            del self._replies[key]

    def _limit_detached(self, reply: LiveReply) -> None:
        """A reply lost its last watcher: its user keeps at most MAX_DETACHED_PER_USER unwatched
        replies running (the oldest beyond that are stopped, as far as they went)."""
        unwatched = [r for r in self._replies.values()
                     if r.user_id == reply.user_id and not (r.done or r.stopping or r.watchers)]
        for old in unwatched[: max(0, len(unwatched) - MAX_DETACHED_PER_USER)]:
            log.info("chat %s: reply %d stopped, its user has more than %d replies nobody watches", old.chat_id,
                     old.message_id, MAX_DETACHED_PER_USER)
            old.stop(ReplyStatus.CANCELLED, f"stopped: more than {MAX_DETACHED_PER_USER} of this user's replies "
                                             "were running with no client watching them")

    def stop_chat(self, user_id: int, chat_id: str) -> int:
        """Stops the user's replies being written in a chat (it is being deleted); how many."""
        live = [r for r in self._replies.values() if r.chat_id == chat_id and r.user_id == user_id and not r.done]
        for reply in live:
            reply.stop(ReplyStatus.CANCELLED, "the chat was deleted")
        return len(live)

    def find(self, user_id: int, chat_id: str, message_id: int) -> LiveReply | None:
        """The reply, if it is this user's and being written here (or ended within LINGER_S)."""
        reply = self._replies.get((chat_id, message_id))
        return reply if reply is not None and reply.user_id == user_id else None

    @property
    def running(self) -> int:
        return sum(not r.done for r in self._replies.values())

    def stop_all(self, status: ReplyStatus = ReplyStatus.CANCELLED) -> int:
        """Stops every reply still being written (the drain's end); how many there were."""
        live = [r for r in self._replies.values() if not r.done]
        for reply in live:
            reply.stop(status)
        return len(live)
