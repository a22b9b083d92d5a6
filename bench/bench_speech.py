"""Speech to text on this machine: word error rate and real-time factor of the store's speech model
(whisper-tiny-en) over gRPC Transcribe, on espeak-ng sentences (tests/speech_audio.py) one by one
and joined into one ~40 s file (with when its segments arrived). Prints a table, writes JSON.

    .venv/bin/python bench/bench_speech.py [--threads 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import running_server, table, write_json  # noqa: E402
from speech_audio import SENTENCES, duration, join, synth, word_errors  # noqa: E402

from tokenwire.v1 import inference_pb2 as pb  # noqa: E402
from tokenwire.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402


def transcribe(stub, wav: bytes) -> tuple[pb.TranscribeFinished, float, list[float]]:
    def messages():
        yield pb.TranscribeRequest(options=pb.TranscribeOptions(model="whisper-tiny-en"))
        yield pb.TranscribeRequest(audio=wav)

    started, arrivals, finished = time.perf_counter(), [], None
    for reply in stub.Transcribe(messages()):
        if reply.WhichOneof("event") == "segment":
            arrivals.append(time.perf_counter() - started)
        elif reply.WhichOneof("event") == "finished":
            finished = reply.finished
    return finished, time.perf_counter() - started, arrivals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    wavs = [synth(s) for s in SENTENCES]
    with running_server("--threads", str(args.threads), "--metrics-port", "0") as target:
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(target))
        transcribe(stub, wavs[0])  # loads the model
        errors = words = 0
        audio_s = busy_s = 0.0
        for text, wav in zip(SENTENCES, wavs, strict=True):
            finished, took, _ = transcribe(stub, wav)
            e, n = word_errors(text, finished.text)
            errors, words, audio_s, busy_s = errors + e, words + n, audio_s + duration(wav), busy_s + took
        long_wav = join(wavs)
        finished, long_took, arrivals = transcribe(stub, long_wav)
        long_errors, long_words = word_errors(" ".join(SENTENCES), finished.text)
    rows = [["sentences, one by one", f"{audio_s:.1f}", f"{errors / words:.1%}", f"{busy_s / audio_s:.3f}"],
            ["the sentences joined", f"{duration(long_wav):.1f}", f"{long_errors / long_words:.1%}",
             f"{long_took / duration(long_wav):.3f}"]]
    print(table(["audio", "seconds", "word error rate", "real-time factor"], rows))
    print(f"segments of the joined file arrived at {', '.join(f'{a:.1f}' for a in arrivals)} s (done {long_took:.1f} s)")
    path = write_json("speech.json", {
        "model": "whisper-tiny-en", "sentences": {"audio_s": audio_s, "wer": errors / words, "rtf": busy_s / audio_s},
        "joined": {"audio_s": duration(long_wav), "wer": long_errors / long_words, "rtf": long_took / duration(long_wav),
                   "segment_arrivals_s": arrivals}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
