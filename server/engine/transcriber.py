"""Speech to text: one loaded Whisper model (faster-whisper on CTranslate2) and its fair queue.

A Transcriber stands where a decoder's Scheduler stands for the model manager (`busy`, `stop()`):
it owns one worker thread that serves every transcription of its model. Jobs wait per user and the
worker takes turns round-robin across users, one step per turn: a step is decoding the audio, or
recognising the next segment (faster-whisper yields segments one at a time, decoding a window of at
most 30 s when it needs the next). So one long file does not starve a short one sent after it by
another user: they advance alternately, as the scheduler's fair turns admit generations.

Audio arrives as bytes and stays in memory: PyAV (inside faster-whisper) decodes wav, mp3, ogg/opus,
webm, m4a, flac... from a BytesIO to 16 kHz mono, nothing is written to disk. The container's
stated duration is checked against the request's limit before decoding (and the decoded length
after), so a too-long file is refused without decoding it. faster-whisper's Silero VAD (an ONNX
graph shipped inside faster-whisper) drops silence and splits long audio at pauses.

Transport-free: events are handed to the job's `emit` callable from the worker thread.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .requests import InvalidRequest
from .scheduler import QueueFull, SchedulerUnavailable

log = logging.getLogger("tokenwire.speech")

SAMPLE_RATE = 16000
MAX_QUEUED = 64  # transcriptions waiting for one model, all users together
# Temperatures faster-whisper falls back through when a window decodes badly (OpenAI's temperature 0).
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


class AudioError(InvalidRequest):
    """The audio cannot be transcribed: not a format PyAV decodes, damaged, or empty."""

    def __init__(self, message: str, field: str = "file", reason: str = "AUDIO_INVALID") -> None:
        super().__init__(message, field, reason)


class AudioTooLong(AudioError):
    """Longer than the server's --max-audio-seconds (HTTP 413)."""

    def __init__(self, seconds: float | None, limit: float) -> None:
        length = f"{seconds:.0f} s long" if seconds is not None else f"longer than {limit:.0f} s"
        super().__init__(f"the audio is {length}; this server transcribes at most {limit:.0f} s "
                         "(--max-audio-seconds): split it", "file", "AUDIO_TOO_LONG")


@dataclass
class TranscribeOptions:
    language: str = ""  # "" = the model's language (tiny.en: English)
    prompt: str = ""  # text that came before: names, spelling, style
    temperature: float | None = None  # None or 0: greedy with faster-whisper's fallbacks
    max_seconds: float = 600.0
    user: str = ""  # whose turn it is (the fair queue)
    beam_size: int = 5


@dataclass(frozen=True)
class TranscriptStarted:
    duration_s: float
    language: str


@dataclass(frozen=True)
class TranscriptSegment:
    index: int
    start_s: float
    end_s: float
    text: str
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    compression_ratio: float = 0.0
    temperature: float = 0.0
    tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class TranscriptFinished:
    text: str
    duration_s: float
    language: str
    segments: int
    processing_s: float


@dataclass(frozen=True)
class TranscriptFailed:
    error: BaseException


Event = TranscriptStarted | TranscriptSegment | TranscriptFinished | TranscriptFailed


@dataclass
class TranscriptionJob:
    """One file to transcribe. `emit` gets its events, in order, on the worker thread; the last
    is TranscriptFinished or TranscriptFailed."""

    audio: bytes
    options: TranscribeOptions
    emit: Callable[[Event], None]
    cancelled: bool = False
    _segments: Iterator | None = field(default=None, repr=False)
    _texts: list[str] = field(default_factory=list, repr=False)
    _duration: float = 0.0
    _language: str = ""
    _started: float = field(default_factory=time.perf_counter, repr=False)

    def cancel(self) -> None:
        """The caller went away: the worker drops the job at its next turn."""
        self.cancelled = True


def stated_duration(audio: bytes) -> float | None:
    """The duration the container states (seconds), without decoding; None when it states none."""
    import av

    with av.open(io.BytesIO(audio), mode="r", metadata_errors="ignore") as container:
        if container.duration:
            return container.duration / 1_000_000
        for stream in container.streams.audio:
            if stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
    return None


def _decode_bounded(audio: bytes, max_samples: int):
    """faster_whisper.audio.decode_audio's pipeline (PyAV: decode, resample to 16 kHz mono s16), but
    stopping once the audio passes `max_samples`, so a file that states no length (a MediaRecorder
    webm, a raw stream) cannot make the server decode hours of audio into memory. Returns
    (float32 samples, whether it stopped early)."""
    import av
    import numpy as np

    resampler = av.audio.resampler.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    parts: list = []
    total = 0
    with av.open(io.BytesIO(audio), mode="r", metadata_errors="ignore") as container:
        frames = container.decode(audio=0)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                frame = None
            except av.error.InvalidDataError:
                continue  # a damaged frame: skipped, as faster-whisper does
            if frame is not None:
                frame.pts = None
            for out in resampler.resample(frame):
                array = out.to_ndarray().reshape(-1)
                parts.append(array)
                total += len(array)
            if total > max_samples:
                return None, True
            if frame is None:
                break
    samples = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)
    return samples.astype(np.float32) / 32768.0, False


def decode(audio: bytes, max_seconds: float):
    """16 kHz mono float32 samples of the audio; AudioError / AudioTooLong when it cannot be."""
    if not audio:
        raise AudioError("the audio file is empty")
    try:
        stated = stated_duration(audio)
    except Exception as exc:  # noqa: BLE001 - PyAV raises many kinds (InvalidDataError, ValueError, ...)
        raise AudioError(f"could not read the audio ({_short(exc)}): send wav, mp3, ogg/opus, webm, m4a or "
                         "flac") from exc
    if stated is not None and stated > max_seconds:
        raise AudioTooLong(stated, max_seconds)
    try:
        samples, too_long = _decode_bounded(audio, int((max_seconds + 1) * SAMPLE_RATE))
    except Exception as exc:  # noqa: BLE001
        raise AudioError(f"could not decode the audio ({_short(exc)}): the file is damaged or not audio") from exc
    if too_long:
        raise AudioTooLong(None, max_seconds)  # its container stated no length: found decoding
    if len(samples) == 0:
        raise AudioError("the file holds no audio samples")
    return samples


def _short(exc: BaseException) -> str:
    """PyAV's message without its errno and file name ("[Errno 1094995529] ...: '<none>'")."""
    text = re.sub(r"^\[Errno -?\d+\]\s*|:\s*'<none>'$", "", str(exc).strip()) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


class Transcriber:
    def __init__(self, folder: Path, device: str = "cpu", threads: int = 0, max_queued: int = MAX_QUEUED,
                 whisper=None) -> None:
        """`whisper`: a loaded faster_whisper.WhisperModel (or a stand-in with its `transcribe`);
        None loads the folder's."""
        folder = Path(folder)
        manifest = json.loads((folder / "tokenwire.json").read_text()) if (folder / "tokenwire.json").is_file() else {}
        self.languages: list[str] = list(manifest.get("languages") or [])
        self.name = str(manifest.get("id") or folder.name)
        # CTranslate2 on the CPU, int8 (the weights are fp16 on disk; int8 is faster and as accurate
        # on tiny.en); CUDA is not offered: tokenwire's CUDA wheels bring no CTranslate2 build.
        if whisper is None:
            try:
                from faster_whisper import WhisperModel
            except ImportError as exc:
                raise RuntimeError("speech models need the 'voice' extra: pip install 'tokenwire[voice]'") from exc
            whisper = WhisperModel(str(folder), device="cpu", compute_type="int8",
                                   cpu_threads=threads or os.cpu_count() or 1, num_workers=1)
        self.model = whisper
        self.max_queued = max_queued
        self._cond = threading.Condition()
        self._waiting: dict[str, deque[TranscriptionJob]] = {}
        self._users: deque[str] = deque()  # users with jobs, in turn order
        self._running = 0
        self._stopping = False
        self.steps = 0  # turns taken (tests read it)
        self._thread = threading.Thread(target=self._loop, name=f"speech-{self.name}", daemon=True)
        self._thread.start()

    # ---- what the manager sees -----------------------------------------------------------------

    @property
    def busy(self) -> bool:
        with self._cond:
            return bool(self._users) or self._running > 0

    @property
    def queued(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._waiting.values())

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            jobs = [job for q in self._waiting.values() for job in q]
            self._waiting.clear()
            self._users.clear()
            self._cond.notify_all()
        for job in jobs:
            job.emit(TranscriptFailed(SchedulerUnavailable(f"speech model {self.name} was unloaded")))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)
        self.model = None

    # ---- jobs ----------------------------------------------------------------------------------

    def check_language(self, language: str) -> str:
        """The language to decode in: the one asked (ISO 639-1) if the model knows it."""
        language = (language or "").strip().lower()
        if self.languages and language and language not in self.languages:
            raise InvalidRequest(f"model {self.name} knows {', '.join(self.languages)} only, not {language!r}",
                                 "language", "LANGUAGE_UNSUPPORTED")
        return language or (self.languages[0] if len(self.languages) == 1 else "")

    def submit(self, job: TranscriptionJob) -> None:
        job.options.language = self.check_language(job.options.language)
        with self._cond:
            if self._stopping:
                raise SchedulerUnavailable(f"speech model {self.name} is unloading; retry")
            waiting = sum(len(q) for q in self._waiting.values())
            if waiting >= self.max_queued:
                raise QueueFull(waiting)
            user = job.options.user
            if user not in self._waiting:
                self._waiting[user] = deque()
                self._users.append(user)
            self._waiting[user].append(job)
            self._cond.notify_all()

    def transcribe(self, audio: bytes, options: TranscribeOptions | None = None) -> list[Event]:
        """The whole transcription at once, through the queue (tools and tests)."""
        events: list[Event] = []
        done = threading.Event()

        def emit(event: Event) -> None:
            events.append(event)
            if isinstance(event, TranscriptFinished | TranscriptFailed):
                done.set()

        self.submit(TranscriptionJob(audio, options or TranscribeOptions(), emit))
        done.wait()
        return events

    # ---- the worker ----------------------------------------------------------------------------

    def _next_turn(self) -> tuple[str, TranscriptionJob] | None:
        """Under the lock: the next user in turn and their first job (and their turn passes)."""
        while not self._stopping:
            if self._users:
                user = self._users[0]
                self._users.rotate(-1)
                return user, self._waiting[user][0]
            self._cond.wait()
        return None

    def _loop(self) -> None:
        while True:
            with self._cond:
                turn = self._next_turn()
                if turn is None:
                    return
                self._running += 1
            user, job = turn
            try:
                done = self._step(job)
            except BaseException as exc:  # noqa: BLE001 - the job fails, the worker goes on
                log.exception("transcription failed")
                done = True
                job.emit(TranscriptFailed(exc))
            with self._cond:
                self._running -= 1
                self.steps += 1
                if done and not self._stopping:
                    queue = self._waiting.get(user)
                    if queue and queue[0] is job:
                        queue.popleft()
                    if queue is not None and not queue:
                        del self._waiting[user]
                        self._users.remove(user)
                self._cond.notify_all()

    def _step(self, job: TranscriptionJob) -> bool:
        """One turn of a job: start it (decode, VAD) or recognise its next segment; True when it is done."""
        if job.cancelled:
            job.emit(TranscriptFailed(SchedulerUnavailable("cancelled")))
            return True
        options = job.options
        if job._segments is None:
            try:
                samples = decode(job.audio, options.max_seconds)
            except AudioError as exc:
                job.emit(TranscriptFailed(exc))
                return True
            job.audio = b""  # decoded: the bytes are no longer needed
            temperature = (FALLBACK_TEMPERATURES if not options.temperature
                           else (float(options.temperature),))
            segments, info = self.model.transcribe(
                samples, language=options.language or None, initial_prompt=options.prompt or None,
                temperature=temperature, beam_size=options.beam_size, vad_filter=True,
                condition_on_previous_text=False)
            job._segments = iter(segments)
            job._duration = float(info.duration)
            job._language = str(info.language or options.language)
            job.emit(TranscriptStarted(job._duration, job._language))
            return False
        try:
            segment = next(job._segments)
        except StopIteration:
            text = "".join(job._texts).strip()
            job.emit(TranscriptFinished(text, job._duration, job._language, len(job._texts),
                                        time.perf_counter() - job._started))
            return True
        job.emit(TranscriptSegment(index=len(job._texts), start_s=float(segment.start), end_s=float(segment.end),
                                   text=segment.text, avg_logprob=float(segment.avg_logprob),
                                   no_speech_prob=float(segment.no_speech_prob),
                                   compression_ratio=float(segment.compression_ratio),
                                   temperature=float(segment.temperature or 0.0), tokens=tuple(segment.tokens)))
        job._texts.append(segment.text)
        return False
