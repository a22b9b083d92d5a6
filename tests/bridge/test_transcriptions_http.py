"""POST /v1/audio/transcriptions through the session bridge: OpenAI's own client transcribes
espeak-ng speech within the word error rate the issue sets; every response_format; 413 for audio
too long or too large, 400 for a file that is not audio, 415 for a body that is not a form; and
/v1/models lists each model's kind."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
import uuid

import openai
import pytest
from conftest import OCR_MODEL, SPEECH_MODEL
from speech_audio import MAX_WER, SENTENCES, join, silence, synth, wer


def post_form(url: str, fields: dict[str, str], file: bytes | None, filename: str = "speech.wav"
              ) -> tuple[int, str, str]:
    boundary = uuid.uuid4().hex
    body = bytearray()
    for name, value in fields.items():
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    if file is not None:
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n").encode() + file + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "/v1/audio/transcriptions", data=bytes(body), method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=300) as reply:
            return reply.status, reply.headers.get_content_type(), reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get_content_type(), exc.read().decode()


@pytest.fixture(scope="module")
def client(bridge) -> openai.OpenAI:
    return openai.OpenAI(base_url=bridge.url + "/v1", api_key="unused", max_retries=0)


def test_openais_client_transcribes_speech(client, tmp_path):
    text = " ".join(SENTENCES[4:8])
    path = tmp_path / "four.wav"
    path.write_bytes(join([synth(s) for s in SENTENCES[4:8]]))
    with open(path, "rb") as f:
        result = client.audio.transcriptions.create(model="whisper-1", file=f)
    assert wer(text, result.text) <= MAX_WER, result.text
    with open(path, "rb") as f:
        verbose = client.audio.transcriptions.create(model="whisper-tiny-en", file=f, response_format="verbose_json",
                                                     language="en", timestamp_granularities=["segment"])
    assert verbose.language == "english" and 10 < verbose.duration < 20
    assert verbose.segments and verbose.segments[0].start < verbose.segments[-1].end <= verbose.duration + 0.5
    assert verbose.text == result.text


@pytest.mark.parametrize("fmt", ["text", "srt", "vtt"])
def test_text_and_subtitle_formats(bridge, fmt):
    status, ctype, body = post_form(bridge.url, {"model": "whisper-1", "response_format": fmt}, synth(SENTENCES[0]))
    assert status == 200 and ctype == "text/plain", body
    assert wer(SENTENCES[0], re.sub(r"^(WEBVTT|\d+)$|^.* --> .*$", "", body, flags=re.M)) <= MAX_WER, body
    if fmt == "srt":
        assert re.match(r"1\n00:00:0\d,\d{3} --> 00:00:0\d,\d{3}\n\S", body), body
    if fmt == "vtt":
        assert re.match(r"WEBVTT\n\n00:00:0\d\.\d{3} --> 00:00:0\d\.\d{3}\n\S", body), body


@pytest.mark.parametrize("fields, file, status, code, words", [
    ({"model": "whisper-1"}, silence(601), 413, "audio_too_long", "at most 600 s"),
    ({"model": "whisper-1"}, b"\0" * (25 << 20) + b"!", 413, "audio_too_large", "--max-audio-bytes"),
    ({"model": "whisper-1"}, b"ID3not really an mp3" * 50, 400, "invalid_audio", "could not"),
    ({"model": "whisper-1"}, None, 400, None, "file is required"),
    ({"model": "no-such-model"}, b"RIFF", 404, "model_not_found", "no-such-model"),
    ({"model": "whisper-1", "response_format": "xml"}, b"RIFF", 400, None, "response_format"),
    ({"model": "whisper-1", "stray": "1"}, b"RIFF", 400, None, "unknown field"),
])
def test_refusals_are_clear(bridge, fields, file, status, code, words):
    got, ctype, body = post_form(bridge.url, fields, file)
    error = json.loads(body)["error"]
    assert (got, error["code"]) == (status, code) and words in error["message"], body


def test_a_json_body_is_not_a_form(bridge):
    request = urllib.request.Request(bridge.url + "/v1/audio/transcriptions", data=b'{"model": "whisper-1"}',
                                     method="POST", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 415 and "multipart/form-data" in caught.value.read().decode()


def test_models_are_listed_with_their_kind(bridge, client):
    kinds = {m.id: m.kind for m in client.models.list().data}
    assert kinds[SPEECH_MODEL] == "speech" and kinds[OCR_MODEL] == "ocr"
    with urllib.request.urlopen(bridge.url + "/api/models", timeout=30) as reply:
        ours = {m["id"]: m["kind"] for m in json.load(reply)["models"]}
    assert ours == kinds
