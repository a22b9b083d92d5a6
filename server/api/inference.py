"""The Inference gRPC service: translates between protobuf and the domain, nothing more."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid

import grpc

from tokenwire.server.chats.store import ChatNotFound, ChatRequestError
from tokenwire.server.chats.worker import ChatWorker
from tokenwire.server.config import ServerConfig
from tokenwire.server.engine.context_fit import build_chat_request
from tokenwire.server.engine.requests import GenerateParams, InvalidRequest, build_request, check_shape
from tokenwire.server.engine.sampling import SamplingConfig
from tokenwire.server.engine.scheduler import QueueFull, SchedulerUnavailable, SequenceHandle
from tokenwire.server.engine.sequence import FinishedEvent, FinishReason, QueuedEvent, Sequence, TokenEvent
from tokenwire.server.engine.session import DeviceUnavailable
from tokenwire.server.models.manager import ModelBusy, ModelLoadError, ModelManager, ModelNotFound
from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc

from . import model_rpcs as model_service
from .auth import Authenticator
from .chat_turns import begin_turn

log = logging.getLogger("tokenwire.server")

_REASONS = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingConfig:
    def opt(name: str, default):
        return getattr(msg, name) if msg.HasField(name) else default

    return SamplingConfig(
        temperature=float(opt("temperature", 1.0)),
        top_p=float(opt("top_p", 1.0)),
        top_k=int(opt("top_k", 0)),
        min_p=float(opt("min_p", 0.0)),
        repetition_penalty=float(opt("repetition_penalty", 1.0)),
        presence_penalty=float(opt("presence_penalty", 0.0)),
        frequency_penalty=float(opt("frequency_penalty", 0.0)),
        seed=int(msg.seed) if msg.HasField("seed") else None,
    )


def params_from_proto(request: pb.GenerateRequest) -> GenerateParams:
    return GenerateParams(
        model=request.model,
        prompt=request.prompt,
        messages=[{"role": m.role, "content": m.content} for m in request.messages],
        sampling=sampling_from_proto(request.sampling),
        max_tokens=int(request.max_tokens),
        stop=list(request.stop),
        include_logprobs=request.include_logprobs,
        ignore_eos=request.ignore_eos,
    )


def finished_to_proto(event: FinishedEvent, model_id: str) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        finished=pb.Finished(
            reason=_REASONS[event.reason],
            usage=pb.Usage(
                prompt_tokens=event.prompt_tokens,
                completion_tokens=event.completion_tokens,
                time_to_first_token_ms=event.time_to_first_token_ms,
                decode_tokens_per_second=event.decode_tokens_per_second,
                total_time_ms=event.total_time_ms,
                queue_time_ms=event.queue_time_ms,
            ),
            error_message=event.error_message,
            model=model_id,
            matched_stop=event.matched_stop,
        )
    )


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, config: ServerConfig, models: ModelManager, chats: ChatWorker | None = None,
                 auth: Authenticator | None = None) -> None:
        self.config = config
        self.models = models
        self.chats = chats  # the chat store, for requests with chat_id
        self.auth = auth  # who is calling (None: nobody is told apart)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        received = time.perf_counter()
        request_id = request.request_id or uuid.uuid4().hex[:12]
        params = params_from_proto(request)
        loop = asyncio.get_running_loop()
        model, keep_alive, streaming, turn = None, None, False, None
        identity = await self.auth.identity(context) if self.auth is not None else None
        try:
            keep_alive = model_service.keep_alive_of(request)
            if request.chat_id and self.chats is not None and identity is not None:
                # A stored chat: its messages are the prompt; the new ones are committed first.
                turn, entry = await begin_turn(self.chats, identity, request, params, self.models,
                                               self.config.max_request_bytes, context)
            else:
                check_shape(params, self.config.max_request_bytes)
                entry = self.models.resolve(params.model)
            model = await model_service.acquire(self.models, entry.id)  # a lease, released below
            if turn is not None:
                gen_request, turn.dropped_messages = await loop.run_in_executor(
                    None, build_chat_request, params, model, self.config.default_max_tokens, received
                )
            else:
                gen_request = await loop.run_in_executor(
                    None, build_request, params, model, self.config.default_max_tokens, received
                )
            gen_request.user = identity.name if identity and identity.by_key else self.user_of(request, context)

            def log_finished(event: FinishedEvent) -> None:
                log.info(
                    "request %s model=%s prompt_tokens=%d cached=%d generated=%d ttft_ms=%.0f tok/s=%.1f finish=%s%s",
                    request_id, entry.id, event.prompt_tokens, event.cached_prompt_tokens, event.completion_tokens,
                    event.time_to_first_token_ms, event.decode_tokens_per_second, event.reason.value,
                    f" error={event.error_message!r}" if event.error_message else "",
                )
                if turn is not None:
                    turn.finish(event)  # stores the reply, however it ended

            handle = SequenceHandle(Sequence(gen_request, model.tokenizer), loop, log_finished)
            model.scheduler.submit(handle)
            streaming = True
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ModelNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except QueueFull as exc:
            context.set_trailing_metadata((("retry-after", str(exc.retry_after_s)),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except (DeviceUnavailable, SchedulerUnavailable) as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except ModelLoadError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ModelBusy as exc:
            context.set_trailing_metadata((("retry-after", str(exc.retry_after_s)),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except ChatNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except ChatRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            if model is not None and not streaming:
                self.models.release(model, keep_alive)
            if turn is not None and not streaming:
                turn.note_cancel(context)
                turn.fail(sys.exc_info()[1])  # the user's message stays; the reply says why it is empty

        try:
            if turn is not None:
                await context.write(turn.event())
            async for event in handle.events():
                if isinstance(event, TokenEvent):
                    delta = pb.TokenDelta(text=event.text, token_id=event.token_id, index=event.index)
                    if event.logprob is not None:
                        delta.logprob = event.logprob
                    await context.write(pb.GenerateResponse(token=delta))
                elif isinstance(event, QueuedEvent):
                    await context.write(pb.GenerateResponse(queued=pb.QueueStatus(position=event.position)))
                elif isinstance(event, FinishedEvent):
                    if turn is not None:
                        await turn.wait_committed()  # the reply is in the chat before the stream ends
                    await context.write(finished_to_proto(event, entry.id))
        finally:
            if turn is not None and not handle.sequence.done:
                turn.note_cancel(context)  # before the cancel: the reply's status says who ended it
            handle.cancel()  # no-op when finished; stops the sequence when the client went away
            self.models.release(model, keep_alive)  # starts its keep-alive (0: unload once idle)

    @staticmethod
    def user_of(request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> str:
        """Who is asking, for fair turns: the request's `user` ("" is one shared anonymous user)."""
        return request.user

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        return model_service.list_models(self.models)

    async def LoadModel(self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        async for event in model_service.load_model(self.models, request, context):
            yield event

    async def UnloadModel(self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        return await model_service.unload_model(self.models, request, context)
