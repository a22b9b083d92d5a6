"""The Transcribe RPC: audio chunks in, segments out as the speech model recognises them.

The audio is gathered in memory (at most --max-audio-bytes), then handed to the model's
Transcriber (engine/transcriber.py), whose fair queue takes turns across users a segment at a
time; its events cross from the worker thread to this task by call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from tokenwire.server.engine.requests import InvalidRequest
from tokenwire.server.engine.transcriber import (
    Event,
    TranscribeOptions,
    Transcriber,
    TranscriptFailed,
    TranscriptFinished,
    TranscriptionJob,
    TranscriptSegment,
    TranscriptStarted,
)
from tokenwire.server.models.manager import ModelManager, ModelNotFound
from tokenwire.server.models.store import ModelEntry
from tokenwire.v1 import inference_pb2 as pb

from .errors import DOMAIN_ERRORS, abort_for

# The name OpenAI's clients send: here it means "the store's speech model".
OPENAI_MODEL_NAMES = ("whisper-1",)


class AudioTooLarge(InvalidRequest):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"the audio file is over {limit} bytes (--max-audio-bytes); got at least {size}", "file",
                         "AUDIO_TOO_LARGE")


def speech_entry(models: ModelManager, name: str) -> ModelEntry:
    """The model asked for (which must be a speech model), or the store's first speech model."""
    entries = models.store.scan()
    ids = sorted(e.id for e in entries if e.kind == "speech" and not e.error)
    if not name or name in OPENAI_MODEL_NAMES:
        if not ids:
            raise ModelNotFound("(default speech model: `tokenwire pull whisper-tiny-en`)", [e.id for e in entries])
        name = ids[0]
    entry = models.store.find(name, entries)
    if entry is None:
        raise ModelNotFound(name, [e.id for e in entries])
    if entry.kind != "speech":
        raise InvalidRequest(f"model {entry.id} is not a speech model (kind {entry.kind}); speech models: "
                             f"{', '.join(ids) or 'none (tokenwire pull whisper-tiny-en)'}", "model")
    return entry


async def gather_audio(requests: AsyncIterator[pb.TranscribeRequest], max_bytes: int
                       ) -> tuple[pb.TranscribeOptions, bytes]:
    """The options (the first message) and the audio (every later one), at most max_bytes of it."""
    options: pb.TranscribeOptions | None = None
    chunks: list[bytes] = []
    size = 0
    async for message in requests:
        part = message.WhichOneof("part")
        if options is None:
            if part != "options":
                raise InvalidRequest("the first TranscribeRequest must carry the options (then the audio)", "options")
            options = message.options
            continue
        if part == "options":
            raise InvalidRequest("options come once, in the first TranscribeRequest", "options")
        size += len(message.audio)
        if size > max_bytes:
            raise AudioTooLarge(size, max_bytes)
        chunks.append(message.audio)
    if options is None:
        raise InvalidRequest("no TranscribeRequest: send the options, then the audio", "options")
    if size == 0:
        raise InvalidRequest("no audio: send the file's bytes after the options", "audio", "AUDIO_INVALID")
    return options, b"".join(chunks)


def event_to_proto(event: Event, model_id: str) -> pb.TranscribeResponse:
    if isinstance(event, TranscriptStarted):
        return pb.TranscribeResponse(started=pb.TranscribeStarted(model=model_id, duration_s=event.duration_s,
                                                                  language=event.language))
    if isinstance(event, TranscriptSegment):
        return pb.TranscribeResponse(segment=pb.TranscriptSegment(
            index=event.index, start_s=event.start_s, end_s=event.end_s, text=event.text,
            avg_logprob=event.avg_logprob, no_speech_prob=event.no_speech_prob,
            compression_ratio=event.compression_ratio, temperature=event.temperature, tokens=event.tokens))
    assert isinstance(event, TranscriptFinished)
    return pb.TranscribeResponse(finished=pb.TranscribeFinished(
        text=event.text, duration_s=event.duration_s, language=event.language, segments=event.segments,
        processing_ms=event.processing_s * 1000))


async def transcribe(models: ModelManager, requests: AsyncIterator[pb.TranscribeRequest],
                     context: grpc.aio.ServicerContext, *, user: str | None, max_seconds: float, max_bytes: int,
                     keep_alive_for) -> AsyncIterator[pb.TranscribeResponse]:
    """The Transcribe stream. `user`: the key's user (None: the request's own `user` field);
    `keep_alive_for(asked)`: the keep-alive the caller may have."""
    loop = asyncio.get_running_loop()
    model = job = None
    keep_alive = None
    try:
        options, audio = await gather_audio(requests, max_bytes)
        keep_alive = keep_alive_for(options.keep_alive_s if options.HasField("keep_alive_s") else None)
        entry = await loop.run_in_executor(None, speech_entry, models, options.model)
        model = await models.acquire_async(entry)
        transcriber = model.scheduler
        assert isinstance(transcriber, Transcriber)
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = TranscriptionJob(audio, TranscribeOptions(
            language=options.language, prompt=options.prompt,
            temperature=options.temperature if options.HasField("temperature") else None,
            max_seconds=max_seconds, user=options.user if user is None else user),
            emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        del audio
        transcriber.submit(job)
        started = time.perf_counter()
        while True:
            event = await events.get()
            if isinstance(event, TranscriptFailed):
                raise event.error
            if isinstance(event, TranscriptFinished):
                event = TranscriptFinished(event.text, event.duration_s, event.language, event.segments,
                                           time.perf_counter() - started)
            yield event_to_proto(event, entry.id)
            if isinstance(event, TranscriptFinished):
                break
    except DOMAIN_ERRORS as exc:
        await abort_for(context, exc)
    finally:
        if job is not None:
            job.cancel()  # a no-op once it finished; a client gone mid-way frees its turn
        if model is not None:
            models.release(model, keep_alive)
