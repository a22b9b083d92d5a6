"""A Generate call on a stored chat: commit the new messages, prompt with the chat, store the reply.

The turn is checked first (the chat, the model, the context fitting the model's window) and
only then are the user's message and a pending reply committed, before generation starts: a
message the model cannot take is refused with nothing stored. The reply outlives its call (see
live_replies.py) and is stored when its sequence finishes, from the scheduler thread's
on_finished hook, however it ended (StopReply, nobody watching, a deadline), as far as it went.
The stream's `finished` message waits for that commit, so a client that reads the chat right
after its stream ends finds the reply there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass

import grpc

from tokenwire.server.chats.store import ReplyOutcome, TurnStart
from tokenwire.server.chats.worker import STORE_FAILURES, ChatWorker, ReplyNotStored, StoreUnavailable
from tokenwire.server.engine.records import FinishReason, ReplyStatus
from tokenwire.server.engine.reply_shape import ReplyShape
from tokenwire.server.engine.requests import GenerateParams, InvalidRequest, check_shape
from tokenwire.server.engine.sequence import FinishedEvent
from tokenwire.server.engine.tool_calls import ToolCallRecord
from tokenwire.server.models.manager import ModelManager, ModelNotFound
from tokenwire.server.models.store import ModelEntry
from tokenwire.v1 import inference_pb2 as pb

from . import convert
from .auth import Identity

log = logging.getLogger("tokenwire.server")

SAVE_EVERY_S = 1.0  # how often the text of a reply being written is saved


class ChatTurn:
    """One turn of a stored chat inside one Generate call."""

    def __init__(self, worker: ChatWorker, start: TurnStart, entry: ModelEntry) -> None:
        self.worker = worker
        self.start = start  # what was committed; start.context is the prompt
        self.entry = entry  # the model that answers
        self.dropped_messages = 0
        # Who ended a cancelled reply: STOPPED (StopReply, or the call cancelled before the reply
        # began) or CANCELLED (deadline, nobody watching, server shutdown), and why when the
        # reply should say (cancel_note). Set before the sequence is cancelled.
        self.cancelled_as = ReplyStatus.CANCELLED
        self.cancel_note = ""
        self.committed: concurrent.futures.Future | None = None
        self.shape = ReplyShape()  # how the reply's text is read into content, reasoning and calls
        self._text: list[str] = []  # what the client has been sent so far
        self._saved_at = time.monotonic()
        self._saving: concurrent.futures.Future | None = None

    @property
    def chat_id(self) -> str:
        return self.start.chat.id

    def event(self) -> pb.GenerateResponse:
        return convert.chat_turn_to_proto(self.chat_id, self.start.user_message_id, self.start.reply_message_id,
                                          self.dropped_messages)

    def finish(self, event: FinishedEvent) -> None:
        """Stores the reply as it ended (called on the scheduler thread; never blocks)."""
        reply = self.shape.read(event.text)
        self._store(ReplyOutcome(
            content=reply.content, status=ReplyStatus.of(event.reason, self.cancelled_as),
            error_message=event.error_message or (self.cancel_note if event.reason is FinishReason.CANCELLED else ""),
            usage=event.usage, dropped_messages=self.dropped_messages,
            reasoning=reply.reasoning, tool_calls=[_call_dict(c) for c in reply.tool_calls],
        ))

    def streamed(self, text: str) -> None:
        """Text sent to the client. About every SAVE_EVERY_S the reply so far is saved (off the
        event loop, one save at a time), so a crash of the server loses at most that much."""
        self._text.append(text)
        now = time.monotonic()
        if now - self._saved_at < SAVE_EVERY_S or (self._saving is not None and not self._saving.done()):
            return
        self._saved_at = now
        if self.committed is None:
            so_far = self.shape.read("".join(self._text), final=False)
            self._saving = self.worker.submit(self.worker.store.save_partial, self.start.reply_message_id,
                                              so_far.content, so_far.reasoning)
            self._saving.add_done_callback(_log_failure)

    def note_cancel(self, context: grpc.aio.ServicerContext, server_stopping: bool = False) -> None:
        """Before the call ends early: records who ended it (the server, when it is stopping)."""
        self.cancelled_as = ReplyStatus.CANCELLED if server_stopping else ended_by(context)

    def stop(self, status: ReplyStatus, note: str, handles: list) -> None:
        """Ends the reply's sequence; it is stored with `status` (and `note`, when cancelled)."""
        self.cancelled_as, self.cancel_note = status, note
        for handle in handles:
            handle.cancel()

    def fail(self, exc: BaseException | None) -> None:
        """Stores the reply as failed before generation started (the model did not load, the
        queue was full, the client left or its deadline passed while it waited)."""
        while isinstance(exc, grpc.aio.AbortError) and exc.__context__ is not None:
            exc = exc.__context__  # the domain error that the servicer turned into a status
        if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
            outcome = ReplyOutcome("", self.cancelled_as)
        else:
            outcome = ReplyOutcome("", ReplyStatus.ERROR,
                                   error_message=str(exc) if exc else "the reply was not generated")
        self._store(outcome)

    def _store(self, outcome: ReplyOutcome) -> None:
        if self.committed is not None:
            return
        self.committed = self.worker.finish_reply(self.start.reply_message_id, outcome)
        self.committed.add_done_callback(_log_failure)

    async def wait_committed(self) -> None:
        """Returns once the reply is stored; raises ReplyNotStored when the database would not
        take it in time (it is kept and stored later: the stream must not claim success)."""
        if self.committed is not None:
            try:
                await asyncio.shield(asyncio.wrap_future(self.committed))
            except ReplyNotStored:
                raise
            except Exception:  # logged by _log_failure; the stream still ends properly
                pass


def _call_dict(call: ToolCallRecord) -> dict[str, str]:
    return {"id": call.id, "name": call.name, "arguments": call.arguments}


def ended_by(context: grpc.aio.ServicerContext) -> ReplyStatus:
    """How a call that ends early left its reply: a passed deadline is the server's
    cancellation (CANCELLED); anything else (the client cancelled or went away) is STOPPED."""
    remaining = context.time_remaining()
    return ReplyStatus.CANCELLED if remaining is not None and remaining <= 0.05 else ReplyStatus.STOPPED


def _log_failure(future: concurrent.futures.Future) -> None:
    if not future.cancelled() and future.exception() is not None and not isinstance(future.exception(), ReplyNotStored):
        log.error("could not store a chat reply: %s", future.exception())


@dataclass
class TurnPlan:
    """A turn checked but not committed yet: the model to answer and the context it would have."""

    entry: ModelEntry
    context: list[dict]


async def plan_turn(
    worker: ChatWorker, identity: Identity, request: pb.GenerateRequest, params: GenerateParams,
    models: ModelManager, max_request_bytes: int,
) -> TurnPlan:
    """Checks the request against the chat and resolves its model, writing nothing (the caller
    checks that the context fits the model before `commit_turn`). Raises ChatNotFound,
    ChatRequestError, InvalidRequest, ModelNotFound, StoreUnavailable."""
    if params.prompt:
        raise InvalidRequest("with chat_id, send the new message in messages (prompt is raw text without a chat)",
                             "prompt")
    check_shape(params, max_request_bytes, chat=True)  # the new messages may be none (answer again)
    chat = await worker.read(worker.store.chat_info, identity.user_id, request.chat_id)
    entry = await asyncio.get_running_loop().run_in_executor(None, _chat_model, models, params.model, chat.model)
    context = await worker.read(worker.store.preview_turn, identity.user_id, request.chat_id, list(params.messages))
    return TurnPlan(entry, context)


async def commit_turn(
    worker: ChatWorker, identity: Identity, request: pb.GenerateRequest, params: GenerateParams, entry: ModelEntry,
    context: grpc.aio.ServicerContext | None = None,
) -> ChatTurn:
    """Commits the new messages and a pending reply; the returned turn's start.context is what
    was committed (it differs from the plan's when another turn of the chat came in between)."""
    committing = worker.submit(worker.store.begin_turn, identity.user_id, request.chat_id, list(params.messages),
                               entry.id, convert.stored_params(request))
    try:
        start = await asyncio.shield(asyncio.wrap_future(committing))
    except asyncio.CancelledError:
        # The call ended while the turn was being committed: once it is, its reply says so.
        status = ended_by(context) if context is not None else ReplyStatus.STOPPED
        committing.add_done_callback(lambda done: _end_unanswered(worker, done, status))
        raise
    except STORE_FAILURES as exc:
        raise StoreUnavailable(exc) from exc
    return ChatTurn(worker, start, entry)


def _chat_model(models: ModelManager, asked: str, chat_model: str) -> ModelEntry:
    """The model that answers: the one asked for, else the chat's own, else (when the chat's
    model is gone from the store) the default."""
    try:
        return models.resolve(asked or chat_model)
    except ModelNotFound:
        if asked or not chat_model:
            raise
        return models.resolve("")


def _end_unanswered(worker: ChatWorker, done: concurrent.futures.Future, status: ReplyStatus) -> None:
    if not done.cancelled() and done.exception() is None:
        worker.finish_reply(done.result().reply_message_id, ReplyOutcome("", status))
