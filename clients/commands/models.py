"""`tokenwire import / check / rm / ps / load / unload`: managing the models a server can run.

`import` and `rm` work on the model store folder directly (like `pull`; a running server sees
the change on its next listing). `ps`, `load` and `unload` ask a running server.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import grpc

from tokenwire.clients.connection import describe_rpc_error, list_models, open_channel, server_target
from tokenwire.enums import enum_name


def _fail(message: str, code: int = 1) -> int:
    print(f"tokenwire: {message}", file=sys.stderr)
    return code


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _store(args: argparse.Namespace):
    from tokenwire.server.models.store import ModelStore

    return ModelStore(args.models_dir)


# ---- import / rm (the store folder) ------------------------------------------------------------

def cmd_import(args: argparse.Namespace) -> int:
    from tokenwire.server.build.importer import import_model
    from tokenwire.server.build.pull import BuildError

    started = time.monotonic()
    try:
        result = import_model(Path(args.path), _store(args), name=args.name, quantize=args.quantize,
                              force=args.force, check=not args.no_check)
    except BuildError as exc:
        return _fail(str(exc))
    smoke = result.smoke
    params = f"{result.parameter_count / 1e6:.1f}M params, " if result.parameter_count else ""
    print(f"imported {result.model_id} ({result.kind}, {params}{result.precision}, "
          f"{human_bytes(result.size_bytes)}) in {time.monotonic() - started:.0f}s")
    print(f"  smoke test: {len(smoke.tokens)} greedy tokens identical with and without the KV cache "
          f"(max logit difference {smoke.max_logit_diff:.1e}): {smoke.prompt!r} -> {smoke.text!r}")
    print(f"  use it: tokenwire generate --model {result.model_id} 'Hello'")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    import numpy as np

    from tokenwire.server.build.gguf_check import CheckError, check_model, format_table
    from tokenwire.server.build.quality import DEFAULT_MAX_TOKENS

    store = _store(args)
    entry = store.get(store.resolve(args.id))
    if entry is None:
        known = ", ".join(e.id for e in store.scan()) or "none"
        return _fail(f"unknown model {args.id!r}; models in the store: {known}")
    progress = (lambda _: None) if args.json else (lambda line: print(line, file=sys.stderr))
    try:
        quality = check_model(entry.path, max_tokens=args.max_tokens or DEFAULT_MAX_TOKENS,
                              dtype=np.float64 if args.float64 else np.float32, progress=progress)
    except CheckError as exc:
        return _fail(str(exc))
    print(json.dumps(quality, indent=2) if args.json else format_table(entry.id, quality))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from tokenwire.server.models.store import folder_size

    store = _store(args)
    failures = 0
    for name in args.ids:
        model_id = store.resolve(name)
        entry = store.get(model_id)
        if entry is None:
            known = ", ".join(e.id for e in store.scan()) or "none"
            failures += _fail(f"unknown model {name!r}; models in the store: {known}")
            continue
        size = folder_size(entry.path)
        dropped = sorted(a for a in store.aliases() if store.resolve(a) == entry.id)
        store.remove(entry.id)
        note = f"; aliases removed: {', '.join(dropped)}" if dropped else ""
        print(f"removed {entry.id} ({human_bytes(size)} freed{note})")
    return 1 if failures else 0


# ---- ps / load / unload (a running server) -----------------------------------------------------

def _ago(unix_ms: int, now: float) -> str:
    if not unix_ms:
        return "-"
    seconds = now - unix_ms / 1000
    return _span(seconds) + " ago"


def _span(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def cmd_ps(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from tokenwire.v1 import inference_pb2 as pb

    target = server_target(args.server)
    try:
        reply = list_models(target)
    except grpc.RpcError as exc:
        return _fail(describe_rpc_error(exc, target))
    running = [m for m in reply.models if m.state in (pb.MODEL_STATE_LOADED, pb.MODEL_STATE_LOADING)]
    if args.json:
        print(json.dumps({"models": [MessageToDict(m, preserving_proto_field_name=True) for m in running],
                          "memory_in_use_bytes": reply.memory_in_use_bytes,
                          "memory_budget_bytes": reply.memory_budget_bytes,
                          "max_loaded_models": reply.max_loaded_models}, indent=2))
        return 0
    now = time.time()
    if not running:
        print("no model is loaded (models load on first use, or with `tokenwire load ID`)")
    else:
        print(f"{'ID':<28} {'STATE':<8} {'MEMORY':>9} {'KV':>9} {'ACTIVE':>6} {'LOAD':>7}  {'LAST USED':<11} UNTIL")
        for m in running:
            state = enum_name(pb.ModelState, m.state)
            if m.expires_unix_ms:
                until = f"in {_span(m.expires_unix_ms / 1000 - now)}"
            else:
                until = "in use" if m.active_requests else ("loading" if state == "loading" else "forever")
            print(f"{m.id:<28} {state:<8} {human_bytes(m.memory_bytes):>9} {human_bytes(m.kv_cache_bytes):>9} "
                  f"{m.active_requests:>6} {m.load_time_ms / 1000:>6.2f}s  {_ago(m.last_used_unix_ms, now):<11} {until}")
    budget = human_bytes(reply.memory_budget_bytes) if reply.memory_budget_bytes else "no budget"
    most = reply.max_loaded_models or "no limit"
    print(f"memory in use {human_bytes(reply.memory_in_use_bytes)} of {budget}; "
          f"{len(running)} model(s) loaded, at most {most}")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from tokenwire.server.config import parse_duration
    from tokenwire.v1 import inference_pb2 as pb
    from tokenwire.v1 import inference_pb2_grpc as pb_grpc

    request = pb.LoadModelRequest(model=args.id)
    if args.keep_alive is not None:
        try:
            request.keep_alive_s = parse_duration(args.keep_alive)
        except ValueError as exc:
            return _fail(str(exc), 2)
    target = server_target(args.server)
    channel = open_channel(target)
    try:
        for event in pb_grpc.InferenceStub(channel).LoadModel(request):
            stage = enum_name(pb.LoadStage, event.stage)
            if event.stage == pb.LOAD_STAGE_READY:
                m = event.model
                print(f"{m.id} is loaded: {human_bytes(m.memory_bytes)} in memory, loaded in "
                      f"{m.load_time_ms / 1000:.2f}s ({event.elapsed_ms / 1000:.2f}s for this call)")
            else:
                print(f"[{event.elapsed_ms / 1000:6.2f}s {stage}] {event.message}", file=sys.stderr, flush=True)
    except grpc.RpcError as exc:
        return _fail(describe_rpc_error(exc, target))
    finally:
        channel.close()
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    from tokenwire.v1 import inference_pb2 as pb
    from tokenwire.v1 import inference_pb2_grpc as pb_grpc

    target = server_target(args.server)
    channel = open_channel(target)
    try:
        reply = pb_grpc.InferenceStub(channel).UnloadModel(pb.UnloadModelRequest(model=args.id))
    except grpc.RpcError as exc:
        return _fail(describe_rpc_error(exc, target))
    finally:
        channel.close()
    if reply.was_loaded:
        waited = f" after its requests finished ({reply.drain_ms / 1000:.1f}s)" if reply.drain_ms >= 50 else ""
        print(f"unloaded {reply.model.id}{waited}")
    else:
        print(f"{reply.model.id} was not loaded")
    return 0


# ---- parser ------------------------------------------------------------------------------------

def add_model_commands(sub) -> None:
    p = sub.add_parser("import", help="add your own model to the store (optimum export, checkpoint, .gguf)")
    p.add_argument("path", help="an optimum export folder, a transformers checkpoint folder, or a .gguf file")
    p.add_argument("--name", default=None,
                   help="model name (default: from PATH); the id is NAME:PRECISION unless NAME has a ':'")
    p.add_argument("--quantize", choices=["int4", "int8"], default=None,
                   help="store a weight-only quantized variant (MatMulNBits) instead of fp32")
    p.add_argument("--force", action="store_true", help="replace a model with the same id")
    p.add_argument("--no-check", action="store_true",
                   help="skip `tokenwire check` after a GGUF import (the served graph against the file's float reference)")
    p.add_argument("--models-dir", type=Path, default=None, help="model store (env TOKENWIRE_MODELS)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("check", help="compare a GGUF import's served graph with the file's float reference "
                                     "(top-1 agreement, KL, perplexity; recorded in its manifest)")
    p.add_argument("id", metavar="MODEL", help="model id or alias")
    p.add_argument("--max-tokens", type=int, default=None, help="check at most this many tokens of the fixed text")
    p.add_argument("--float64", action="store_true", help="run the reference in float64 (slower)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--models-dir", type=Path, default=None, help="model store (env TOKENWIRE_MODELS)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("rm", help="remove models from the store (and the aliases that point to them)")
    p.add_argument("ids", nargs="+", metavar="ID", help="model id or alias")
    p.add_argument("--models-dir", type=Path, default=None, help="model store (env TOKENWIRE_MODELS)")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("ps", help="show the models the server has loaded and their memory")
    p.add_argument("--json", action="store_true")
    p.add_argument("--server", default=None, help="gRPC target host:port (env TOKENWIRE_SERVER)")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("load", help="load a model on the server now (shows progress)")
    p.add_argument("id", nargs="?", default="", help="model id or alias (default: the server's default)")
    p.add_argument("--keep-alive", default=None,
                   help="how long it stays loaded once idle: seconds, or 5m, 1h; negative = until unloaded")
    p.add_argument("--server", default=None, help="gRPC target host:port (env TOKENWIRE_SERVER)")
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("unload", help="unload a model from the server (after its running requests)")
    p.add_argument("id", help="model id or alias")
    p.add_argument("--server", default=None, help="gRPC target host:port (env TOKENWIRE_SERVER)")
    p.set_defaults(func=cmd_unload)
