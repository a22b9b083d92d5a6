"""The Transcribe RPC against the session server and its speech model (whisper-tiny-en, English):
espeak-ng speech transcribed within the word error rate the issue sets, segments of a long file
streamed before it ends, fair turns between users, and clear refusals (not audio, too long, a model
that is no speech model). Also `tokenwire transcribe FILE`."""

from __future__ import annotations

import subprocess
import threading
import time

import grpc
import pytest
from conftest import DEFAULT_INT4, OCR_MODEL, SPEECH_MODEL, cli
from grpc_status import rpc_status
from speech_audio import MAX_WER, SENTENCES, join, silence, synth, word_errors

from tokenwire.v1 import inference_pb2 as pb


def requests(audio: bytes, chunk: int = 64 << 10, **options):
    yield pb.TranscribeRequest(options=pb.TranscribeOptions(**options))
    for at in range(0, len(audio), chunk):
        yield pb.TranscribeRequest(audio=audio[at:at + chunk])


def transcribe(stub, audio: bytes, **options) -> tuple[list[tuple[float, pb.TranscribeResponse]], float]:
    """Every reply with the time it arrived (seconds after the last audio byte was sent), and that time."""
    sent = [0.0]

    def feed():
        yield from requests(audio, **options)
        sent[0] = time.monotonic()

    replies = [(time.monotonic(), r) for r in stub.Transcribe(feed(), timeout=300)]
    return [(t - sent[0], r) for t, r in replies], sent[0]


def reason_of(exc: grpc.RpcError) -> str:
    from google.rpc import error_details_pb2

    status = rpc_status.from_call(exc)
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


@pytest.fixture(scope="module")
def long_audio() -> tuple[bytes, str]:
    """About 40 s: the ten sentences, 0.6 s apart (two of Whisper's 30 s windows)."""
    return join([synth(s) for s in SENTENCES]), " ".join(SENTENCES)


def test_speech_is_transcribed_and_streamed_before_the_end(stub, long_audio):
    audio, text = long_audio
    replies, _ = transcribe(stub, audio, model="whisper-tiny-en")
    kinds = [r.WhichOneof("event") for _, r in replies]
    assert kinds[0] == "started" and kinds[-1] == "finished" and set(kinds[1:-1]) == {"segment"}, kinds
    started, finished = replies[0][1].started, replies[-1][1].finished
    assert started.model == SPEECH_MODEL and started.language == "en" and 35 < started.duration_s < 50
    segments = [(t, r.segment) for t, r in replies if r.WhichOneof("event") == "segment"]
    assert [s.index for _, s in segments] == list(range(len(segments))) and finished.segments == len(segments)
    assert all(a.end_s <= b.start_s + 0.01 and s.start_s < s.end_s for (_, a), (_, b), (_, s)
               in zip(segments, segments[1:], segments[1:], strict=False))
    errors, words = word_errors(text, finished.text)
    assert errors / words <= MAX_WER, (errors, words, finished.text)
    assert finished.text == "".join(s.text for _, s in segments).strip()
    # The first window's segments came while the second was still being recognised.
    first_at, finished_at = segments[0][0], replies[-1][0]
    assert segments[-1][1].start_s > 30 and first_at < finished_at - 0.3, (first_at, finished_at)


def test_one_sentence_with_a_prompt_and_a_language(stub):
    replies, _ = transcribe(stub, synth(SENTENCES[1]), language="en", prompt="Quarterly reports.",
                            temperature=0.0)
    finished = replies[-1][1].finished
    errors, words = word_errors(SENTENCES[1], finished.text)
    assert errors / words <= MAX_WER, finished.text
    assert finished.processing_ms > 0 and finished.language == "en"


def test_turns_are_fair_between_users(stub, long_audio):
    """A long file of one user's does not hold back another user's short one sent just after it."""
    audio, _ = long_audio
    done: dict[str, float] = {}

    def run(user: str, wav: bytes) -> None:
        list(stub.Transcribe(requests(wav, model="whisper-tiny-en", user=user), timeout=300))
        done[user] = time.monotonic()

    long_one = threading.Thread(target=run, args=("alice", join([audio, audio])))  # ~80 s: four windows
    long_one.start()
    time.sleep(0.5)
    run("bob", synth(SENTENCES[2]))
    long_one.join()
    assert done["bob"] < done["alice"] - 1.0, done


@pytest.mark.parametrize("audio, reason, words", [
    (b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(256)) * 20, "AUDIO_INVALID", "could not"),
    (silence(601), "AUDIO_TOO_LONG", "601 s long"),
])
def test_bad_audio_is_refused_clearly(stub, audio, reason, words):
    with pytest.raises(grpc.RpcError) as caught:
        transcribe(stub, audio)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(caught.value) == reason and words in caught.value.details(), caught.value.details()


def test_only_speech_models_transcribe_and_they_generate_nothing(stub):
    with pytest.raises(grpc.RpcError) as caught:
        transcribe(stub, synth("Hello."), model=DEFAULT_INT4)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a speech model" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(pb.GenerateRequest(model=SPEECH_MODEL, prompt="Hi", max_tokens=1)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Transcribe" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Transcribe(iter([pb.TranscribeRequest(audio=b"x")])))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "options" in caught.value.details()
    kinds = {m.id: m.kind for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert kinds[SPEECH_MODEL] == "speech" and kinds[OCR_MODEL] == "ocr" and kinds[DEFAULT_INT4] == "generate"


def test_the_cli_prints_segments(server, tmp_path):
    path = tmp_path / "hello.wav"
    path.write_bytes(synth(SENTENCES[3]))
    out = subprocess.run(cli("transcribe", str(path), "--timestamps", "--server", server.target),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("[00:0") and "->" in out.stdout
    errors, words = word_errors(SENTENCES[3], out.stdout.split("]", 1)[1])
    assert errors / words <= MAX_WER, out.stdout
    bad = subprocess.run(cli("transcribe", str(tmp_path / "missing.wav"), "--server", server.target),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no such file" in bad.stderr
