"""The speech model's fair queue (engine/transcriber.py) on a stand-in for faster-whisper: users take
turns a segment at a time, so a short file is not held behind a long one; audio that is not audio,
too long or empty is refused before any recognition; an unload fails what still waits."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
from speech_audio import silence

from tokenwire.server.engine.requests import InvalidRequest
from tokenwire.server.engine.scheduler import QueueFull
from tokenwire.server.engine.transcriber import (
    AudioError,
    AudioTooLong,
    TranscribeOptions,
    Transcriber,
    TranscriptFailed,
    TranscriptFinished,
    TranscriptionJob,
    TranscriptSegment,
    TranscriptStarted,
    _decode_bounded,
    decode,
)


@dataclass
class FakeSegment:
    start: float
    end: float
    text: str
    avg_logprob: float = -0.1
    no_speech_prob: float = 0.01
    compression_ratio: float = 1.2
    temperature: float = 0.0
    tokens: tuple = (1, 2)


@dataclass
class FakeInfo:
    duration: float
    language: str = "en"


class FakeWhisper:
    """One segment per second of audio, each taking `step_s` to recognise; records the order."""

    def __init__(self, step_s: float = 0.01) -> None:
        self.step_s = step_s
        self.log: list[str] = []
        self.gate = threading.Event()
        self.gate.set()

    def transcribe(self, samples, language=None, initial_prompt=None, **kw):
        seconds = len(samples) / 16000
        tag = initial_prompt or "?"

        def segments():
            for i in range(int(seconds)):
                self.gate.wait()
                time.sleep(self.step_s)
                self.log.append(tag)
                yield FakeSegment(i, i + 1, f" {tag}{i}")

        return segments(), FakeInfo(seconds, language or "en")


@pytest.fixture
def fake(tmp_path):
    (tmp_path / "tokenwire.json").write_text('{"id": "fake:speech", "languages": ["en"]}')
    whisper = FakeWhisper()
    transcriber = Transcriber(tmp_path, whisper=whisper)
    yield transcriber, whisper
    transcriber.stop()


def run(transcriber, audio, **options):
    events = []
    done = threading.Event()

    def emit(event):
        events.append(event)
        if isinstance(event, TranscriptFinished | TranscriptFailed):
            done.set()

    transcriber.submit(TranscriptionJob(audio, TranscribeOptions(**options), emit))
    return events, done


def test_segments_stream_in_order_then_the_whole_text(fake):
    transcriber, _ = fake
    events = transcriber.transcribe(silence(3), TranscribeOptions(prompt="a"))
    assert isinstance(events[0], TranscriptStarted) and events[0].duration_s == pytest.approx(3)
    assert [e.text for e in events if isinstance(e, TranscriptSegment)] == [" a0", " a1", " a2"]
    assert isinstance(events[-1], TranscriptFinished) and events[-1].text == "a0 a1 a2" and events[-1].segments == 3
    assert not transcriber.busy


def test_users_take_turns_a_segment_at_a_time(fake):
    transcriber, whisper = fake
    whisper.gate.clear()  # hold the worker until all three are queued
    long_events, long_done = run(transcriber, silence(8), prompt="L", user="alice")
    more_events, more_done = run(transcriber, silence(3), prompt="M", user="alice")
    short_events, short_done = run(transcriber, silence(2), prompt="S", user="bob")
    assert transcriber.busy
    whisper.gate.set()
    for done in (long_done, more_done, short_done):
        assert done.wait(10)
    # bob's two segments alternate with alice's first file, not after both of hers.
    assert "".join(whisper.log) in ("LSLSLLLLLLMMM", "SLSLLLLLLLMMM"), whisper.log
    assert short_events[-1].text == "S0 S1" and long_events[-1].segments == 8 and more_events[-1].segments == 3


def test_bad_audio_is_refused_before_recognition(fake):
    transcriber, whisper = fake
    with pytest.raises(AudioError, match="could not"):
        decode(b"not audio at all" * 100, 600)
    with pytest.raises(AudioError, match="empty"):
        decode(b"", 600)
    with pytest.raises(AudioTooLong, match="12 s long; this server transcribes at most 10 s"):
        decode(silence(12), 10)
    # Audio whose container states no length is decoded only up to the limit (a second over it).
    samples, stopped = _decode_bounded(silence(5), 2 * 16000)
    assert stopped and samples is None
    samples, stopped = _decode_bounded(silence(2), 3 * 16000)
    assert not stopped and len(samples) == 2 * 16000 and samples.dtype.name == "float32"
    events = transcriber.transcribe(silence(12), TranscribeOptions(max_seconds=10))
    assert len(events) == 1 and isinstance(events[0].error, AudioTooLong) and events[0].error.reason == "AUDIO_TOO_LONG"
    assert whisper.log == []


def test_languages_the_model_lacks_are_refused(fake):
    transcriber, _ = fake
    with pytest.raises(InvalidRequest, match="knows en only") as caught:
        run(transcriber, silence(1), language="de")
    assert caught.value.field == "language"


def test_a_full_queue_refuses_and_an_unload_fails_what_waits(tmp_path):
    whisper = FakeWhisper()
    whisper.gate.clear()
    transcriber = Transcriber(tmp_path, whisper=whisper, max_queued=2)
    first, _ = run(transcriber, silence(2), user="a")
    second, second_done = run(transcriber, silence(2), user="b")
    with pytest.raises(QueueFull):
        run(transcriber, silence(2), user="c")
    threading.Timer(0.2, whisper.gate.set).start()
    transcriber.stop()
    assert second_done.wait(5) and isinstance(second[-1], TranscriptFailed)
    assert "unloaded" in str(second[-1].error) or isinstance(first[-1], TranscriptFailed)
