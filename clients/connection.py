"""A gRPC channel to the server and one-line messages for its failures."""

from __future__ import annotations

import os

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"


def server_target(explicit: str | None = None) -> str:
    return explicit or os.environ.get("TOKENWIRE_SERVER", DEFAULT_TARGET)


def open_channel(target: str) -> grpc.Channel:
    return grpc.insecure_channel(
        target,
        options=[("grpc.max_receive_message_length", 16 << 20), ("grpc.enable_retries", 0)],
    )


def describe_rpc_error(exc: grpc.RpcError, target: str) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach the tokenwire server at {target}: is `tokenwire serve` running? ({details})"
    name = code.name if code is not None else "ERROR"
    return f"{name}: {details}"
