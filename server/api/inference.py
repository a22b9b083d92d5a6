"""The Inference gRPC service (Generate and the model RPCs): it translates, nothing more.

Requests become domain objects through `convert`, domain errors become statuses through
`errors.abort_for`; the engine, the model manager and the chat store do the work. Anything that
touches the disk or the models (resolving a name scans the store) runs off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from tokenwire.server.chats.worker import ChatWorker
from tokenwire.server.config import ServerConfig
from tokenwire.server.engine.context_fit import build_chat_request
from tokenwire.server.engine.records import ReplyStatus
from tokenwire.server.engine.reply_shape import ReplyShape
from tokenwire.server.engine.requests import (
    GenerateParams,
    InvalidRequest,
    build_request,
    check_shape,
    choices,
)
from tokenwire.server.engine.scheduler import SequenceHandle
from tokenwire.server.engine.sequence import FinishedEvent, QueuedEvent, RefusedEvent, Sequence, TokenEvent
from tokenwire.server.models.manager import ModelManager, ModelNotFound
from tokenwire.server.models.pull_runner import InvalidPullName, PullFailed, pull_lines
from tokenwire.server.models.store import ModelEntry, folder_size
from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc

from . import convert
from .auth import Authenticator, Identity
from .chat_turns import ChatTurn, commit_turn, plan_turn
from .embeddings import embed
from .errors import DOMAIN_ERRORS, PermissionDenied, ServerDraining, abort_for, with_statuses
from .images import read_images
from .live_replies import LiveReplies, LiveReply
from .reply_watch import watch_reply
from .speech import transcribe

log = logging.getLogger("tokenwire.server")


async def _events_of(handles: list[SequenceHandle]) -> AsyncIterator[tuple[int, object]]:
    """(choice, event) of every handle's stream, as they come, until each has ended."""
    if len(handles) == 1:
        async for event in handles[0].events():
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: int, handle: SequenceHandle) -> None:
        async for event in handle.events():
            await queue.put((choice, event))
        await queue.put((choice, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        live = len(tasks)
        while live:
            choice, event = await queue.get()
            if event is None:
                live -= 1
            else:
                yield choice, event
    finally:
        for task in tasks:
            task.cancel()


async def relay_events(model_id: str, request_id: str, handles: list[SequenceHandle], calls: list, thinking: list,
                       turn: ChatTurn | None) -> AsyncIterator[pb.GenerateResponse]:
    """A Generate stream's responses: `started` (and `chat`), then every event as protobuf, to
    the last `finished`. Raises the domain error that ends it early (its place in a full queue
    went to another user; a chat's reply the database would not take)."""
    yield convert.started_to_proto(model_id, request_id)
    if turn is not None:
        yield turn.event()
    async for choice, event in _events_of(handles):
        if isinstance(event, RefusedEvent):
            if turn is not None:
                turn.fail(event.error)
            raise event.error
        if isinstance(event, QueuedEvent) and choice:
            continue  # the first choice's place speaks for the request
        if isinstance(event, TokenEvent) and turn is not None:
            turn.streamed(event.text)
        if isinstance(event, FinishedEvent) and turn is not None:
            # The reply is in the chat before the stream ends; ReplyNotStored (kept and retried)
            # ends it with an error instead, as the stream must not say "done".
            await turn.wait_committed()
        if calls[choice] is None and thinking[choice] is None:
            yield convert.with_choice(convert.event_to_proto(event, model_id), choice)
        else:
            for response in convert.shaped_event_to_proto(event, model_id, calls[choice], thinking[choice]):
                yield convert.with_choice(response, choice)


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, config: ServerConfig, models: ModelManager, chats: ChatWorker | None = None,
                 auth: Authenticator | None = None, replies: LiveReplies | None = None) -> None:
        self.config = config
        self.models = models
        self.chats = chats  # the chat store, for requests with chat_id
        self.auth = auth  # who is calling (None: nobody is told apart)
        self.replies = replies or LiveReplies()  # chat replies being written (History watches and stops them)
        self.stopping = False  # set by the drain: no new generations; calls cancelled now were ended by the server
        self.generating = 0  # Generate and Transcribe calls in progress, and chat replies being written
        self._idle: asyncio.Event | None = None

    async def _read_images(self, params: GenerateParams, keep_alive: float | None) -> GenerateParams:
        """The request's images read for their text by the store's OCR model (loaded on demand,
        under the same budget and keep-alive as any model)."""
        if not any(m.get("images") for m in params.messages):
            return params
        loop = asyncio.get_running_loop()
        entries = await loop.run_in_executor(None, self.models.store.scan)
        ocr = [e for e in entries if e.kind == "ocr"]
        if not ocr:
            raise ModelNotFound("(OCR model, which reads the text of images: `tokenwire pull ppocr-v6`)",
                                [e.id for e in entries])
        model = await self.models.acquire_async(ocr[0])
        try:
            return await read_images(params, model.scheduler)
        finally:
            self.models.release(model, keep_alive)

    async def drained(self) -> None:
        """Returns once no Generate call is in progress and no chat reply is being written."""
        self._idle = self._idle or asyncio.Event()
        if self.generating == 0:
            return
        self._idle.clear()
        await self._idle.wait()

    # ---- Generate ----------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        if self.stopping:
            await abort_for(context, ServerDraining())
        self.generating += 1
        try:
            async for response in self._generate(request, context):
                yield response
        finally:
            self._ended_one()

    async def _generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        received = time.perf_counter()
        request_id = request.request_id or uuid.uuid4().hex[:12]
        loop = asyncio.get_running_loop()
        model, keep_alive, streaming, turn = None, None, False, None
        handles: list[SequenceHandle] = []
        identity = await self.auth.identity(context) if self.auth is not None else None
        # Who it is for (fair turns) and whose prefix cache it shares: the key's user; without keys
        # the request's `user` ("" is one shared anonymous user) and everyone's cache.
        by_key = identity is not None and identity.by_key
        try:
            params = convert.params_from_proto(request, identity.name if by_key else request.user,
                                               cache_scope=f"key-user:{identity.user_id}" if by_key else "")
            convert.check_request_id(request.request_id)
            params = await self._read_images(params, None)  # the OCR model keeps the server's keep-alive
            keep_alive = self._keep_alive_for(identity, convert.keep_alive_of(request))
            detached_s = self._detached_for(request)
            plan = None
            if request.chat_id and self.chats is not None and identity is not None:
                # A stored chat: its messages are the prompt; the new ones are committed once the
                # turn is known to fit the model.
                plan = await plan_turn(self.chats, identity, request, params, self.models,
                                       self.config.max_request_bytes)
                entry = plan.entry
            else:
                check_shape(params, self.config.max_request_bytes)
                entry = await loop.run_in_executor(None, self.models.resolve, params.model)
            if entry.kind == "embedding":
                raise InvalidRequest(f"model {entry.id} makes embeddings and generates no text: use Embed "
                                     "(/v1/embeddings, /api/embed)", "model")
            if entry.kind not in ("generate", ""):
                raise InvalidRequest(f"model {entry.id} is a {entry.kind} model and generates no text"
                                     + (": use Transcribe (/v1/audio/transcriptions)" if entry.kind == "speech" else ""),
                                     "model")
            model = await self.models.acquire_async(entry)  # a lease, released below
            if plan is not None:
                gen_request, dropped = await loop.run_in_executor(
                    None, build_chat_request, params, plan.context, model, self.config.default_max_tokens, received)
                turn = await commit_turn(self.chats, identity, request, params, entry, context)
                if turn.start.context != plan.context:  # another turn of this chat came in between
                    gen_request, dropped = await loop.run_in_executor(
                        None, build_chat_request, params, turn.start.context, model,
                        self.config.default_max_tokens, received)
                turn.dropped_messages = dropped
            else:
                gen_request = await loop.run_in_executor(
                    None, build_request, params, model, self.config.default_max_tokens, received)

            def on_finished(event: FinishedEvent) -> None:
                u = event.usage
                log.info(
                    "request %s model=%s prompt_tokens=%d cached=%d generated=%d ttft_ms=%.0f tok/s=%.1f finish=%s%s",
                    request_id, entry.id, u.prompt_tokens, u.cached_prompt_tokens, u.completion_tokens,
                    u.time_to_first_token_ms, u.decode_tokens_per_second, event.reason.value,
                    f" error={event.error_message!r}" if event.error_message else "",
                )
                if turn is not None:
                    turn.finish(event)  # stores the reply, however it ended

            tools = params.tools
            shapes = [ReplyShape(gen_request.thinking,
                                 tools.callable_tools() if tools is not None and tools.calls_allowed else None,
                                 secrets.token_hex(8)) for _ in range(params.n)]
            calls = [shape.calls_stream() for shape in shapes]
            thinking = [shape.think_splitter() for shape in shapes]
            if turn is not None:
                turn.shape = shapes[0]  # the reply is stored in the parts its stream sends
            for choice_request in choices(gen_request, params.n):
                handle = SequenceHandle(Sequence(choice_request, model.tokenizer), loop, on_finished)
                model.scheduler.submit(handle)  # each choice is a stream of the user's
                handles.append(handle)
            streaming = True
        except DOMAIN_ERRORS as exc:
            await abort_for(context, exc)
        finally:
            if model is not None and not streaming:
                for submitted in handles:  # a later choice was refused: the earlier ones go too
                    submitted.cancel()
                self.models.release(model, keep_alive)
            if turn is not None and not streaming:
                turn.note_cancel(context, self.stopping)
                turn.fail(sys.exc_info()[1])  # the user's message stays; the reply says why it is empty

        events = relay_events(entry.id, request_id, handles, calls, thinking, turn)
        if turn is not None:  # the reply outlives this call: start it, then watch it
            live = self._start_reply(turn, identity, handles, model, keep_alive, events, detached_s)
            async for response in watch_reply(live, 0, context, owns=True):
                yield response
            return
        try:
            async for response in with_statuses(events, context):
                yield response
        finally:
            await events.aclose()
            for handle in handles:
                handle.cancel()  # no-op when finished; stops the sequence when the client went away
            self.models.release(model, keep_alive)  # starts its keep-alive (0: unload once idle)

    # ---- chat replies that outlive their call ------------------------------------------------

    def _start_reply(self, turn: ChatTurn, identity: Identity, handles: list[SequenceHandle], model,
                     keep_alive: float | None, events: AsyncIterator[pb.GenerateResponse],
                     detached_s: float) -> LiveReply:
        """Hands a chat's reply to the live replies: it counts as a generation (the drain waits
        for it) until its events end, and then its sequence ends and its model is released."""
        def stop(status: ReplyStatus, note: str) -> None:
            turn.stop(status, note, handles)

        def ended() -> None:
            for handle in handles:
                handle.cancel()
            self.models.release(model, keep_alive)
            self._ended_one()

        live = LiveReply(turn.chat_id, turn.start.reply_message_id, identity.user_id, detached_s, stop)
        self.generating += 1
        self.replies.start(live, events, ended)
        return live

    def stop_replies(self) -> int:
        """Stops every chat reply still being written (the drain's end: stored as CANCELLED)."""
        return self.replies.stop_all(ReplyStatus.CANCELLED)

    def _ended_one(self) -> None:
        self.generating -= 1
        if self.generating == 0 and self._idle is not None:
            self._idle.set()

    # ---- models ------------------------------------------------------------------------------

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        return await asyncio.get_running_loop().run_in_executor(None, list_models, self.models)

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        identity = await self.auth.identity(context) if self.auth is not None else None
        keep_alive = self._keep_alive_for(identity, request.keep_alive_s if request.HasField("keep_alive_s") else None)
        return await embed(self.models, request, context, keep_alive)

    async def Transcribe(self, request_iterator, context: grpc.aio.ServicerContext):  # noqa: N802
        if self.stopping:
            await abort_for(context, ServerDraining())
        identity = await self.auth.identity(context) if self.auth is not None else None
        user = identity.name if identity is not None and identity.by_key else None
        self.generating += 1  # the drain lets a running transcription finish as it does a generation
        try:
            async for response in transcribe(
                    self.models, request_iterator, context, user=user, max_seconds=self.config.max_audio_seconds,
                    max_bytes=self.config.max_audio_bytes,
                    keep_alive_for=lambda asked: self._keep_alive_for(identity, asked)):
                yield response
        finally:
            self._ended_one()

    def _detached_for(self, request: pb.GenerateRequest) -> float:
        """How long a chat reply goes on with nobody watching: the request's detached_reply_s, at
        most the server's --detached-reply-s."""
        if not request.HasField("detached_reply_s"):
            return self.config.detached_reply_s
        asked = request.detached_reply_s
        if not asked >= 0:  # negative, NaN
            raise InvalidRequest(f"detached_reply_s must be >= 0 seconds, got {asked}", "detached_reply_s")
        return min(asked, self.config.detached_reply_s)

    def _keep_alive_for(self, identity: Identity | None, asked: float | None) -> float | None:
        """A key holder without the admin role may shorten a model's keep-alive, not pin it: their
        keep_alive is at most the server's (negative, "forever", counts as the server's)."""
        if asked is None or identity is None or not identity.restricted:
            return asked
        default = self.models.limits.keep_alive_s
        if asked < 0:
            return default
        return asked if default < 0 else min(asked, default)

    async def _require_admin(self, context: grpc.aio.ServicerContext, what: str = "loading and unloading models") -> None:
        identity = await self.auth.identity(context) if self.auth is not None else None
        if identity is not None and identity.restricted:
            await abort_for(context, PermissionDenied(
                f"{what} needs an admin key (user {identity.name}'s key is not one; "
                "`tokenwire keys create NAME --admin`)"))

    async def LoadModel(self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        await self._require_admin(context)
        async for event in load_model(self.models, request, context):
            yield event

    async def PullModel(self, request: pb.PullModelRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        await self._require_admin(context, "pulling models")
        try:
            async for line in pull_lines(request.name, self.models.store.root, request.force):
                yield pb.PullModelEvent(status=line)
        except InvalidPullName as exc:
            await abort_for(context, InvalidRequest(str(exc), "name"))
        except PullFailed as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        yield pb.PullModelEvent(status="success", done=True)

    async def DeleteModel(self, request: pb.DeleteModelRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        await self._require_admin(context, "deleting models")
        try:
            result = await asyncio.get_running_loop().run_in_executor(self.models.pool, self.models.delete,
                                                                      request.model)
        except DOMAIN_ERRORS as exc:
            await abort_for(context, exc)
        return pb.DeleteModelResponse(model=result.model_id, aliases_removed=result.aliases,
                                      freed_bytes=result.freed_bytes)

    async def UnloadModel(self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        await self._require_admin(context)
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self.models.pool, self.models.unload, request.model)
        except DOMAIN_ERRORS as exc:
            await abort_for(context, exc)
        info = await loop.run_in_executor(None, describe, self.models, result.model_id)
        return pb.UnloadModelResponse(model=info, was_loaded=result.was_loaded, drain_ms=result.drain_seconds * 1000)


def model_info(models: ModelManager, entry: ModelEntry, aliases: dict[str, str], default_id: str) -> pb.ModelInfo:
    """One model's listing (reads the disk: call off the event loop)."""
    store = models.store
    status = models.status(entry.id, entry)
    if entry.error:
        status.state, status.error = "failed", entry.error
    try:
        size = folder_size(entry.path)
    except OSError:
        size = 0
    names = sorted(a for a in aliases if store.resolve(a) == entry.id and a != "default")
    return convert.model_info_to_proto(entry, status, size, names, entry.id == default_id)


def list_models(models: ModelManager) -> pb.ListModelsResponse:
    store = models.store
    aliases, default_id = store.aliases(), store.default_id()
    infos = [model_info(models, entry, aliases, default_id) for entry in store.scan()]
    return pb.ListModelsResponse(
        models=infos,
        memory_budget_bytes=models.limits.memory_budget_bytes,
        max_loaded_models=models.limits.max_loaded,
        # The sum of what the listing shows, so the reply adds up (a separate reading of the
        # manager could differ by KV that moved in between).
        memory_in_use_bytes=sum(info.memory_bytes for info in infos),
    )


def describe(models: ModelManager, model_id: str) -> pb.ModelInfo:
    store = models.store
    entry = store.get(model_id)
    if entry is None:  # removed from the store meanwhile
        status = models.status(model_id)
        return pb.ModelInfo(id=model_id, state=convert.MODEL_STATE[status.state], loaded=status.state == "loaded")
    return model_info(models, entry, store.aliases(), store.default_id())


async def load_model(
    models: ModelManager, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
) -> AsyncIterator[pb.LoadModelEvent]:
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def progress(stage: str, message: str) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (stage, message))

    def event(stage: str, message: str, **kw) -> pb.LoadModelEvent:
        return pb.LoadModelEvent(stage=convert.LOAD_STAGE[stage], message=message,
                                 elapsed_ms=(time.perf_counter() - started) * 1000, **kw)

    try:
        keep_alive = convert.keep_alive_of(request)
        entry = await loop.run_in_executor(None, models.resolve, request.model)
    except DOMAIN_ERRORS as exc:
        await abort_for(context, exc)
    job = loop.run_in_executor(models.pool, models.preload, entry, keep_alive, progress)
    while True:
        getter = asyncio.ensure_future(events.get())
        await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            break
        stage, message = getter.result()
        if stage != "ready":
            yield event(stage, message)
    while not events.empty():  # progress sent just before the job ended
        stage, message = events.get_nowait()
        if stage != "ready":
            yield event(stage, message)
    try:
        model_id = job.result()
    except DOMAIN_ERRORS as exc:
        await abort_for(context, exc)
    info = await loop.run_in_executor(None, describe, models, model_id)
    yield event("ready", f"{model_id} is ready", model=info)
