"""Speech for the transcription tests: sentences synthesised with espeak-ng (`make espeak` installs
it), joined into longer files, and the word error rate of a transcript against its text."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import wave
from pathlib import Path

import pytest

# Plain English, no digits (a transcript may write "four" as "4").
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please send the quarterly report to the office before noon.",
    "The weather today is cold and windy with a chance of rain.",
    "She opened the window and listened to the birds outside.",
    "Our train leaves the station early tomorrow morning.",
    "He forgot his umbrella at the restaurant last night.",
    "The library closes at the end of the afternoon.",
    "Remember to water the plants while we are away.",
    "The children played football in the park after school.",
    "Could you turn down the music a little, please?",
)
MAX_WER = 0.15


def espeak() -> str:
    found = shutil.which("espeak-ng")
    if not found:
        pytest.fail("espeak-ng is not installed: run `make espeak` (make test does)")
    return found


def synth(text: str, rate: int = 150) -> bytes:
    """A WAV (22050 Hz, mono, 16-bit) of espeak-ng's en-us voice saying `text`."""
    streamed = subprocess.run([espeak(), "-v", "en-us", "-s", str(rate), "--stdout", text], check=True,
                              capture_output=True).stdout
    return join([streamed])  # its header, written to a pipe, gives no length: written again whole


def _frames(wav: bytes) -> tuple[bytes, wave._wave_params]:
    with wave.open(io.BytesIO(wav)) as w:
        return w.readframes(w.getnframes()), w.getparams()


def join(wavs: list[bytes], gap_s: float = 0.6) -> bytes:
    """One WAV of the given ones in order, `gap_s` of silence between them."""
    out = io.BytesIO()
    params = None
    with wave.open(out, "wb") as w:
        for i, wav in enumerate(wavs):
            frames, p = _frames(wav)
            if params is None:
                params = p
                w.setnchannels(p.nchannels)
                w.setsampwidth(p.sampwidth)
                w.setframerate(p.framerate)
            if i:
                w.writeframes(b"\0" * int(gap_s * p.framerate) * p.sampwidth * p.nchannels)
            w.writeframes(frames)
    return out.getvalue()


def silence(seconds: float, rate: int = 8000) -> bytes:
    """A WAV of silence (8 kHz, 16-bit mono: 16 KB a second)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * int(seconds * rate))
    return out.getvalue()


def duration(wav: bytes) -> float:
    with wave.open(io.BytesIO(wav)) as w:
        return w.getnframes() / w.getframerate()


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]+", " ", text.lower().replace("-", " ")).split()


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, words in the reference): Levenshtein over words."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)


def wer(reference: str, hypothesis: str) -> float:
    errors, total = word_errors(reference, hypothesis)
    return errors / max(total, 1)


def write(path: Path, wav: bytes) -> Path:
    path.write_bytes(wav)
    return path
