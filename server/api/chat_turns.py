"""A Generate call on a stored chat: commit the new messages, prompt with the chat, store the reply.

The user's message (and a pending reply) are committed before generation starts. The reply
is stored when its sequence finishes, from the scheduler thread's on_finished hook, so a
reply whose client has gone (Ctrl-C, closed tab) is stored too, as far as it went. The
stream's `finished` message waits for that commit, so a client that reads the chat right
after its stream ends finds the reply there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from dataclasses import replace

import grpc
from google.protobuf.json_format import MessageToDict

from tokenwire.server.chats.store import ReplyOutcome, TurnStart
from tokenwire.server.chats.worker import ChatWorker
from tokenwire.server.engine.requests import GenerateParams, InvalidRequest, check_shape
from tokenwire.server.engine.sequence import FinishedEvent, FinishReason
from tokenwire.server.models.manager import ModelManager, ModelNotFound
from tokenwire.v1 import inference_pb2 as pb

from .auth import Identity

log = logging.getLogger("tokenwire.server")

_STATUS = {FinishReason.STOP: "complete", FinishReason.LENGTH: "length", FinishReason.ERROR: "error"}


class ChatTurn:
    """One turn of a stored chat inside one Generate call."""

    def __init__(self, worker: ChatWorker, start: TurnStart) -> None:
        self.worker = worker
        self.start = start
        self.dropped_messages = 0
        # Who ended a cancelled reply: "stopped" (the client cancelled the call) or "cancelled"
        # (deadline, server shutdown). Set before the sequence is cancelled.
        self.cancelled_as = "cancelled"
        self.committed: concurrent.futures.Future | None = None

    @property
    def chat_id(self) -> str:
        return self.start.chat.id

    def event(self) -> pb.GenerateResponse:
        return pb.GenerateResponse(chat=pb.ChatTurn(
            chat_id=self.chat_id, user_message_id=self.start.user_message_id,
            reply_message_id=self.start.reply_message_id, dropped_messages=self.dropped_messages,
        ))

    def finish(self, event: FinishedEvent) -> None:
        """Stores the reply as it ended (called on the scheduler thread; never blocks)."""
        status = self.cancelled_as if event.reason == FinishReason.CANCELLED else _STATUS[event.reason]
        self._store(ReplyOutcome(
            content=event.text, status=status, error_message=event.error_message,
            prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
            dropped_messages=self.dropped_messages, time_to_first_token_ms=event.time_to_first_token_ms,
            decode_tokens_per_second=event.decode_tokens_per_second, total_time_ms=event.total_time_ms,
            queue_time_ms=event.queue_time_ms,
        ))

    def note_cancel(self, context: grpc.aio.ServicerContext) -> None:
        """Before the call ends early: records who ended it."""
        self.cancelled_as = ended_by(context)

    def fail(self, exc: BaseException | None) -> None:
        """Stores the reply as failed before generation started (the model did not load, the
        queue was full, the client left or its deadline passed while it waited)."""
        while isinstance(exc, grpc.aio.AbortError) and exc.__context__ is not None:
            exc = exc.__context__  # the domain error that the servicer turned into a status
        if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
            outcome = ReplyOutcome("", self.cancelled_as)
        else:
            outcome = ReplyOutcome("", "error", error_message=str(exc) if exc else "the reply was not generated")
        self._store(outcome)

    def _store(self, outcome: ReplyOutcome) -> None:
        if self.committed is not None:
            return
        self.committed = self.worker.submit(self.worker.store.finish_reply, self.start.reply_message_id, outcome)
        self.committed.add_done_callback(_log_failure)

    async def wait_committed(self) -> None:
        if self.committed is not None:
            try:
                await asyncio.wrap_future(self.committed)
            except Exception:  # logged by _log_failure; the stream still ends properly
                pass


def ended_by(context: grpc.aio.ServicerContext) -> str:
    """How a call that ends early left its reply: a passed deadline is the server's
    cancellation ("cancelled"); anything else (the client cancelled or went away) is "stopped"."""
    remaining = context.time_remaining()
    return "cancelled" if remaining is not None and remaining <= 0.05 else "stopped"


def _log_failure(future: concurrent.futures.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("could not store a chat reply: %s", future.exception())


def stored_params(request: pb.GenerateRequest) -> dict:
    """The generation parameters stored with a reply."""
    params: dict = {"sampling": MessageToDict(request.sampling, preserving_proto_field_name=True)}
    if request.max_tokens:
        params["max_tokens"] = request.max_tokens
    if request.stop:
        params["stop"] = list(request.stop)
    return params


async def begin_turn(
    worker: ChatWorker, identity: Identity, request: pb.GenerateRequest, params: GenerateParams,
    models: ModelManager, max_request_bytes: int, context: grpc.aio.ServicerContext | None = None,
):
    """Checks the request, resolves the chat's model and commits the new messages.
    Returns (turn, model entry). Raises ChatNotFound, ChatRequestError, InvalidRequest, ModelNotFound."""
    if params.prompt:
        raise InvalidRequest("with chat_id, send the new message in messages (prompt is raw text without a chat)")
    # The checks that need no model (sampling, stop strings, size), on the new messages alone.
    check_shape(replace(params, messages=params.messages or [{"role": "user", "content": "-"}]), max_request_bytes)
    chat = await worker.call(worker.store.chat_info, identity.user_id, request.chat_id)
    name = params.model or chat.model
    try:
        entry = models.resolve(name)
    except ModelNotFound:
        if params.model or not name:
            raise
        entry = models.resolve("")  # the chat's model is gone: continue with the default
    committing = worker.submit(worker.store.begin_turn, identity.user_id, request.chat_id, params.messages,
                              entry.id, stored_params(request))
    try:
        start = await asyncio.shield(asyncio.wrap_future(committing))
    except asyncio.CancelledError:
        # The call ended while the turn was being committed: once it is, its reply says so.
        status = ended_by(context) if context is not None else "stopped"
        committing.add_done_callback(lambda done: _end_unanswered(worker, done, status))
        raise
    params.messages = start.context
    return ChatTurn(worker, start), entry


def _end_unanswered(worker: ChatWorker, done: concurrent.futures.Future, status: str) -> None:
    if not done.cancelled() and done.exception() is None:
        worker.submit(worker.store.finish_reply, done.result().reply_message_id, ReplyOutcome("", status))
