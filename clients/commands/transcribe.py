"""`tokenwire transcribe FILE`: speech to text over the server's Transcribe RPC, segments printed as
the server recognises them."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc

from tokenwire.clients.connection import describe_rpc_error, open_channel, server_target

CHUNK_BYTES = 1 << 20


def requests(path: Path, args: argparse.Namespace) -> Iterator:
    from tokenwire.v1 import inference_pb2 as pb

    options = pb.TranscribeOptions(model=args.model or "", language=args.language or "", prompt=args.prompt or "")
    if args.temperature is not None:
        options.temperature = args.temperature
    yield pb.TranscribeRequest(options=options)
    with open(path, "rb") if str(path) != "-" else sys.stdin.buffer as f:
        while chunk := f.read(CHUNK_BYTES):
            yield pb.TranscribeRequest(audio=chunk)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(max(seconds, 0.0), 60)
    return f"{int(minutes):02d}:{seconds:05.2f}"


def cmd_transcribe(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from tokenwire.v1 import inference_pb2_grpc as pb_grpc

    path = Path(args.file)
    if str(path) != "-" and not path.is_file():
        print(f"tokenwire: no such file: {path}", file=sys.stderr)
        return 2
    target = server_target(args.server)
    call = pb_grpc.InferenceStub(open_channel(target)).Transcribe(requests(path, args))
    try:
        for reply in call:
            kind = reply.WhichOneof("event")
            if args.json:
                print(json.dumps({kind: MessageToDict(getattr(reply, kind), preserving_proto_field_name=True)}),
                      flush=True)
            elif kind == "segment" and args.timestamps:
                seg = reply.segment
                print(f"[{_clock(seg.start_s)} -> {_clock(seg.end_s)}] {seg.text.strip()}", flush=True)
            elif kind == "segment":
                print(reply.segment.text.strip(), flush=True)
            elif kind == "finished" and args.verbose:
                done = reply.finished
                print(f"[{done.duration_s:.1f} s of audio in {done.processing_ms / 1000:.1f} s, "
                      f"{done.segments} segments]", file=sys.stderr)
    except KeyboardInterrupt:
        call.cancel()
        return 130
    except grpc.RpcError as exc:
        print(f"tokenwire: {describe_rpc_error(exc, target)}", file=sys.stderr)
        return 1
    return 0


def add_transcribe_command(sub) -> None:
    p = sub.add_parser("transcribe", help="speech to text: print an audio file's transcript as it is recognised")
    p.add_argument("file", help="audio file (wav, mp3, ogg/opus, webm, m4a, flac), or - for stdin")
    p.add_argument("--model", "-m", default="", help="speech model (default: the store's speech model)")
    p.add_argument("--language", default="", help="ISO 639-1 code (whisper-tiny-en: en only)")
    p.add_argument("--prompt", default="", help="text that came before: names, spelling")
    p.add_argument("--temperature", "-t", type=float, default=None)
    p.add_argument("--timestamps", action="store_true", help="prefix each segment with its start and end")
    p.add_argument("--json", action="store_true", help="one JSON event per line")
    p.add_argument("--server", default=None, help="gRPC target host:port (env TOKENWIRE_SERVER)")
    p.set_defaults(func=cmd_transcribe)
