"""POST /v1/audio/transcriptions in OpenAI's shape (multipart/form-data), over the server's Transcribe RPC.

The form's fields are read first (OpenAI's clients, curl -F and the web page send them before the
file, but any order works), the file is held in memory up to MAX_UPLOAD_BYTES (the server's own
--max-audio-bytes, 25 MiB by default, is the limit that applies below that) and streamed to the
server in chunks. Too long or too large: 413; not audio the server can decode: 400.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
from aiohttp import BodyPartReader, web

from tokenwire.bridge.credentials import grpc_metadata
from tokenwire.bridge.errors import ApiError, error_reason, invalid_param
from tokenwire.bridge.openapi_parts import _errors, _json
from tokenwire.bridge.proto_request import request_id_for
from tokenwire.bridge.relay import note
from tokenwire.bridge.upstream import UPSTREAM
from tokenwire.v1 import inference_pb2 as pb

# The bridge's own cap on one upload (the server's --max-audio-bytes decides below it).
MAX_UPLOAD_BYTES = 64 << 20
MAX_FIELD_BYTES = 64 << 10  # a text field (the prompt is the longest)
CHUNK_BYTES = 1 << 20  # per gRPC message (the server's messages are at most 4 MiB)
TIMEOUT_S = 1800
FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
TEXT_FIELDS = ("model", "language", "prompt", "response_format", "temperature", "timestamp_granularities[]",
               "stream")
FIELDS = ("file", *TEXT_FIELDS)
# The reasons of the server's refusals that are HTTP 413 here.
TOO_BIG = {"AUDIO_TOO_LONG": "audio_too_long", "AUDIO_TOO_LARGE": "audio_too_large"}
# ISO 639-1 -> the name OpenAI's verbose_json gives the language.
LANGUAGE_NAMES = {"en": "english", "de": "german", "fr": "french", "es": "spanish", "it": "italian",
                  "nl": "dutch", "pt": "portuguese", "ja": "japanese", "zh": "chinese"}


class Upload:
    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.audio = bytearray()
        self.filename = ""
        self.has_file = False


async def read_form(request: web.Request) -> Upload:
    if request.content_type != "multipart/form-data":
        raise ApiError(415, "send multipart/form-data with the audio in a `file` field (as OpenAI's "
                            "/v1/audio/transcriptions takes it)", code="unsupported_media_type")
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError) as exc:
        raise invalid_param("file", f"malformed multipart body: {exc}") from exc
    upload = Upload()
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise invalid_param("file", "nested multipart bodies are not supported")
            name = part.name or ""
            if name not in FIELDS:
                raise invalid_param(name or "(unnamed)", f"unknown field {name[:60]!r}; fields: {', '.join(FIELDS)}")
            if name == "file":
                if upload.has_file:
                    raise invalid_param("file", "one file per request")
                upload.has_file, upload.filename = True, part.filename or ""
                while chunk := await part.read_chunk(CHUNK_BYTES):
                    upload.audio += chunk
                    if len(upload.audio) > MAX_UPLOAD_BYTES:
                        raise ApiError(413, f"the audio file is over {MAX_UPLOAD_BYTES} bytes, the bridge's limit",
                                       param="file", code="audio_too_large")
                continue
            raw = await part.read(decode=True)
            if len(raw) > MAX_FIELD_BYTES:
                raise invalid_param(name, f"{name} is over {MAX_FIELD_BYTES} bytes")
            try:
                value = raw.decode()
            except UnicodeDecodeError as exc:
                raise invalid_param(name, f"{name} is not UTF-8 text") from exc
            if name in upload.fields and name != "timestamp_granularities[]":
                raise invalid_param(name, f"{name} is given twice")
            upload.fields[name] = value if name not in upload.fields else upload.fields[name] + "," + value
    except ValueError as exc:  # aiohttp's multipart parser on a malformed body
        raise invalid_param("file", f"malformed multipart body: {exc}") from exc
    return upload


def options_of(upload: Upload) -> tuple[pb.TranscribeOptions, str]:
    """The gRPC options and the response format, checked."""
    f = upload.fields
    if not upload.has_file:
        raise invalid_param("file", "file is required: the audio (wav, mp3, ogg/opus, webm, m4a, flac)")
    if not f.get("model"):
        raise invalid_param("model", "model is required: a speech model from GET /v1/models, or whisper-1 for the "
                                     "server's speech model")
    fmt = f.get("response_format") or "json"
    if fmt not in FORMATS:
        raise invalid_param("response_format", f"response_format must be one of {', '.join(FORMATS)}, got {fmt[:40]!r}")
    for granularity in filter(None, f.get("timestamp_granularities[]", "").split(",")):
        if granularity != "segment":
            raise invalid_param("timestamp_granularities[]", "only segment timestamps are given (word: not supported)")
    if f.get("stream", "false").lower() not in ("false", "0", ""):
        raise invalid_param("stream", "stream is not supported for transcriptions (the gRPC Transcribe streams)")
    options = pb.TranscribeOptions(model=f["model"], language=f.get("language", ""), prompt=f.get("prompt", ""))
    if f.get("temperature"):
        try:
            temperature = float(f["temperature"])
        except ValueError as exc:
            raise invalid_param("temperature", "temperature must be a number from 0 to 1") from exc
        if not 0 <= temperature <= 1:
            raise invalid_param("temperature", "temperature must be a number from 0 to 1")
        options.temperature = temperature
    return options, fmt


async def _messages(options: pb.TranscribeOptions, audio: bytes):
    yield pb.TranscribeRequest(options=options)
    for at in range(0, len(audio), CHUNK_BYTES):
        yield pb.TranscribeRequest(audio=audio[at:at + CHUNK_BYTES])


async def run_transcription(request: web.Request, options: pb.TranscribeOptions, audio: bytes
                            ) -> tuple[pb.TranscribeStarted, list[pb.TranscriptSegment], pb.TranscribeFinished]:
    upstream = request.app[UPSTREAM]
    started, segments, finished = pb.TranscribeStarted(), [], None
    try:
        call = upstream.stub.Transcribe(_messages(options, audio), timeout=TIMEOUT_S, metadata=grpc_metadata())
        async for reply in call:
            kind = reply.WhichOneof("event")
            if kind == "started":
                started = reply.started
            elif kind == "segment":
                segments.append(reply.segment)
            elif kind == "finished":
                finished = reply.finished
    except grpc.aio.AioRpcError as exc:
        error = upstream.error(exc)
        reason, _ = error_reason(exc)
        if reason in TOO_BIG:
            error.status, error.code = 413, TOO_BIG[reason]
        elif reason == "AUDIO_INVALID":
            error.code = "invalid_audio"
        raise error from exc
    if finished is None:
        raise ApiError(502, "the model server ended the transcription without its result", type="server_error",
                       code="upstream_error")
    return started, segments, finished


def _clock(seconds: float, comma: bool) -> str:
    ms = int(round(max(seconds, 0.0) * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{',' if comma else '.'}{ms:03d}"


def subtitles(segments: list[pb.TranscriptSegment], vtt: bool) -> str:
    cues = []
    for i, seg in enumerate(segments, 1):
        span = f"{_clock(seg.start_s, not vtt)} --> {_clock(seg.end_s, not vtt)}"
        cues.append(f"{span}\n{seg.text.strip()}\n" if vtt else f"{i}\n{span}\n{seg.text.strip()}\n")
    return ("WEBVTT\n\n" if vtt else "") + "\n".join(cues)


def verbose(started: pb.TranscribeStarted, segments: list[pb.TranscriptSegment],
            finished: pb.TranscribeFinished) -> dict[str, Any]:
    return {
        "task": "transcribe", "language": LANGUAGE_NAMES.get(finished.language, finished.language),
        "duration": round(finished.duration_s, 3), "text": finished.text, "model": started.model,
        "segments": [{"id": s.index, "seek": 0, "start": round(s.start_s, 3), "end": round(s.end_s, 3),
                      "text": s.text, "tokens": list(s.tokens), "temperature": s.temperature,
                      "avg_logprob": s.avg_logprob, "compression_ratio": s.compression_ratio,
                      "no_speech_prob": s.no_speech_prob} for s in segments],
        "usage": {"type": "duration", "seconds": int(round(finished.duration_s + 0.499))},
    }


async def transcriptions(request: web.Request) -> web.Response:
    note(request, id=request_id_for(request))
    upload = await read_form(request)
    options, fmt = options_of(upload)
    note(request, audio_bytes=len(upload.audio))
    started, segments, finished = await run_transcription(request, options, bytes(upload.audio))
    upload.audio = bytearray()
    note(request, model=started.model, audio_s=round(finished.duration_s, 1))
    if fmt == "text":
        return web.Response(text=finished.text + "\n", content_type="text/plain")
    if fmt in ("srt", "vtt"):
        return web.Response(text=subtitles(segments, fmt == "vtt"), content_type="text/plain")
    if fmt == "verbose_json":
        return web.json_response(verbose(started, segments, finished))
    return web.json_response({"text": finished.text, "usage": {
        "type": "duration", "seconds": int(round(finished.duration_s + 0.499))}}, dumps=json.dumps)


_SEGMENT = {"type": "object", "required": ["id", "start", "end", "text"], "properties": {
    "id": {"type": "integer"}, "seek": {"type": "integer"}, "start": {"type": "number"}, "end": {"type": "number"},
    "text": {"type": "string"}, "tokens": {"type": "array", "items": {"type": "integer"}},
    "temperature": {"type": "number"}, "avg_logprob": {"type": "number"},
    "compression_ratio": {"type": "number"}, "no_speech_prob": {"type": "number"}}}
_USAGE = {"type": "object", "properties": {"type": {"const": "duration"}, "seconds": {"type": "integer"}}}
REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["file", "model"], "properties": {
        "file": {"type": "string", "contentMediaType": "application/octet-stream",
                 "description": "The audio file: wav, mp3, ogg/opus, webm, m4a or flac, decoded on the server. It "
                                "must be audio the server can decode (else 400 invalid_audio); at most the server's "
                                "--max-audio-seconds (600 s) and --max-audio-bytes (25 MiB), else 413."},
        "model": {"type": "string", "minLength": 1,
                  "description": "A speech model's id or alias (GET /v1/models), or whisper-1: the server's speech "
                                 "model."},
        "language": {"type": "string", "description": "ISO 639-1; whisper-tiny-en knows English (en) only."},
        "prompt": {"type": "string", "description": "Text that came before the audio: names, spelling, style."},
        "response_format": {"enum": list(FORMATS), "default": "json"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1,
                        "description": "0 (default): greedy, with fallbacks to higher temperatures."},
        "timestamp_granularities[]": {"type": "array", "items": {"const": "segment"},
                                      "description": "segment only (word timestamps are not given)."},
        "stream": {"const": False, "description": "Not supported here: the gRPC Transcribe streams segments."},
    }}
RESPONSE_SCHEMA: dict[str, Any] = {"oneOf": [
    {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}, "usage": _USAGE},
     "additionalProperties": False},
    {"type": "object", "required": ["task", "language", "duration", "text", "segments"], "properties": {
        "task": {"const": "transcribe"}, "language": {"type": "string"}, "duration": {"type": "number"},
        "text": {"type": "string"}, "model": {"type": "string"}, "segments": {"type": "array", "items": _SEGMENT},
        "usage": _USAGE}}]}


def add_audio_docs(document: dict[str, Any]) -> None:
    """/v1/audio/transcriptions in the bridge's OpenAPI document."""
    ok = _json(RESPONSE_SCHEMA, "json: {text}; verbose_json: with segments. text, srt and vtt: text/plain.")
    ok["content"]["text/plain"] = {"schema": {"type": "string"}}
    document["paths"]["/v1/audio/transcriptions"] = {"post": {
        "summary": "OpenAI: speech to text with the server's speech model (English: whisper-tiny-en).",
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": REQUEST_SCHEMA}}},
        "responses": {"200": ok, **_errors(400, 401, 404, 413, 415, 429, 503)}}}


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/audio/transcriptions", transcriptions)
