"""The model RPCs of the Inference service (ListModels, LoadModel, UnloadModel): they translate
between protobuf and the ModelManager, nothing more. InferenceService delegates to these."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

import grpc

from tokenwire.server.engine.requests import InvalidRequest
from tokenwire.server.engine.session import DeviceUnavailable
from tokenwire.server.models.manager import (
    LoadedModel,
    ModelBusy,
    ModelLoadError,
    ModelManager,
    ModelNotFound,
)
from tokenwire.server.models.store import ModelEntry, folder_size
from tokenwire.v1 import inference_pb2 as pb

STATES = {
    "available": pb.MODEL_STATE_AVAILABLE,
    "loading": pb.MODEL_STATE_LOADING,
    "loaded": pb.MODEL_STATE_LOADED,
    "failed": pb.MODEL_STATE_FAILED,
}
STAGES = {
    "waiting": pb.LOAD_STAGE_WAITING,
    "unloading": pb.LOAD_STAGE_UNLOADING,
    "loading": pb.LOAD_STAGE_LOADING,
    "ready": pb.LOAD_STAGE_READY,
}


def keep_alive_of(request) -> float | None:
    """The request's `keep_alive_s`, None when unset; raises InvalidRequest when not a number."""
    if not request.HasField("keep_alive_s"):
        return None
    value = float(request.keep_alive_s)
    if math.isnan(value):
        raise InvalidRequest("keep_alive_s must be a number of seconds (0: unload at once, negative: forever)")
    return value


async def acquire(models: ModelManager, model_id: str) -> LoadedModel:
    """ModelManager.acquire off the event loop. If the call is cancelled while the model loads,
    the lease taken when the load ends is handed back, so the model can still unload."""
    job = asyncio.get_running_loop().run_in_executor(None, models.acquire, model_id)
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        def give_back(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None:
                models.release(done.result())

        job.add_done_callback(give_back)
        raise


def _ms(unix_s: float | None) -> int:
    return int(unix_s * 1000) if unix_s else 0


def model_info(models: ModelManager, entry: ModelEntry, aliases: dict[str, str], default_id: str) -> pb.ModelInfo:
    store = models.store
    status = models.status(entry.id, entry)
    if entry.error:
        status.state, status.error = "failed", entry.error
    try:
        size = folder_size(entry.path)
    except OSError:
        size = 0
    return pb.ModelInfo(
        id=entry.id,
        architecture=entry.architecture,
        parameter_count=entry.parameter_count,
        precision=entry.precision,
        context_length=entry.context_length,
        loaded=status.state == "loaded",
        state=STATES[status.state],
        size_bytes=size,
        error_message=status.error,
        aliases=sorted(a for a in aliases if store.resolve(a) == entry.id and a != "default"),
        is_default=entry.id == default_id,
        memory_bytes=status.memory_bytes,
        kv_cache_bytes=status.kv_cache_bytes,
        last_used_unix_ms=_ms(status.last_used),
        load_time_ms=status.load_seconds * 1000,
        load_count=status.load_count,
        expires_unix_ms=_ms(status.expires_at),
        active_requests=status.active_requests,
    )


def list_models(models: ModelManager) -> pb.ListModelsResponse:
    store = models.store
    aliases, default_id = store.aliases(), store.default_id()
    infos = [model_info(models, entry, aliases, default_id) for entry in store.scan()]
    return pb.ListModelsResponse(
        models=infos,
        memory_budget_bytes=models.limits.memory_budget_bytes,
        max_loaded_models=models.limits.max_loaded,
        memory_in_use_bytes=models.memory_in_use(),
    )


def describe(models: ModelManager, model_id: str) -> pb.ModelInfo:
    store = models.store
    entry = store.get(model_id)
    if entry is None:  # removed from the store meanwhile
        status = models.status(model_id)
        return pb.ModelInfo(id=model_id, state=STATES[status.state], loaded=status.state == "loaded")
    return model_info(models, entry, store.aliases(), store.default_id())


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext) -> None:
    if isinstance(exc, ModelNotFound):
        await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
    if isinstance(exc, ModelBusy):
        context.set_trailing_metadata((("retry-after", str(exc.retry_after_s)),))
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, DeviceUnavailable):
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, ModelLoadError):
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    raise exc


async def load_model(
    models: ModelManager, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
) -> AsyncIterator[pb.LoadModelEvent]:
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def progress(stage: str, message: str) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (stage, message))

    def event(stage: str, message: str, **kw) -> pb.LoadModelEvent:
        return pb.LoadModelEvent(stage=STAGES[stage], message=message,
                                 elapsed_ms=(time.perf_counter() - started) * 1000, **kw)

    try:
        keep_alive = keep_alive_of(request)
        entry = models.resolve(request.model)
    except ValueError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except ModelNotFound as exc:
        await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
    job = loop.run_in_executor(None, models.preload, entry.id, keep_alive, progress)
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
    except Exception as exc:
        await _abort_for(exc, context)
    yield event("ready", f"{model_id} is ready", model=describe(models, model_id))


async def unload_model(
    models: ModelManager, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
) -> pb.UnloadModelResponse:
    loop = asyncio.get_running_loop()
    try:
        result = await loop.run_in_executor(None, models.unload, request.model)
    except Exception as exc:
        await _abort_for(exc, context)
    return pb.UnloadModelResponse(model=describe(models, result.model_id), was_loaded=result.was_loaded,
                                  drain_ms=result.drain_seconds * 1000)
