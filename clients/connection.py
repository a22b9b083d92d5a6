"""A gRPC channel to the server and one-line messages for its failures."""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from tokenwire import affinity
from tokenwire.v1 import history_pb2 as hpb
from tokenwire.v1 import inference_pb2 as pb

DEFAULT_TARGET = "127.0.0.1:50051"


def server_target(explicit: str | None = None) -> str:
    return explicit or os.environ.get("TOKENWIRE_SERVER", DEFAULT_TARGET)


def api_key() -> str:
    """The API key to send: `tokenwire --api-key` or $TOKENWIRE_API_KEY ("" = none)."""
    return os.environ.get("TOKENWIRE_API_KEY", "").strip()


def auth_metadata() -> tuple[tuple[str, str], ...]:
    key = api_key()
    return (("authorization", f"Bearer {key}"),) if key else ()


def _affinity_of(request: object) -> str:
    """The affinity key of a call: a Generate's, and a chat's for the calls on the reply it is
    writing (WatchReply, StopReply reach the server that writes it) and for DeleteChat (that server
    stops the reply and deletes the chat's KV files)."""
    if isinstance(request, pb.GenerateRequest):
        return affinity.for_request(request)
    if isinstance(request, hpb.WatchReplyRequest | hpb.StopReplyRequest | hpb.DeleteChatRequest):
        return affinity.for_chat(request.chat_id)  # DeleteChat: where the chat's reply and KV files are
    return ""


class _CallMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                    grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <key>` to every call, and to Generate (and the calls on a chat's
    reply) the affinity key that a router in front of several servers hashes (see tokenwire.affinity)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def _details(self, details, extra: tuple[tuple[str, str], ...] = ()):
        metadata = tuple(details.metadata or ()) + self.metadata + extra
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

    def _keyed(self, details, request):
        key = _affinity_of(request)
        return self._details(details, ((affinity.HEADER, key),) if key else ())

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._keyed(client_call_details, request), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._keyed(client_call_details, request), request)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base, metadata) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


def tls_ca() -> str:
    """The CA certificate (PEM path) to check a TLS server with: `tokenwire --tls-ca` or
    $TOKENWIRE_TLS_CA ("" = plain gRPC)."""
    return os.environ.get("TOKENWIRE_TLS_CA", "").strip()


def open_channel(target: str, ca: str | None = None) -> grpc.Channel:
    """A channel to the server: over TLS, checked against `ca` (else tls_ca()), when one is given."""
    options = [("grpc.max_receive_message_length", 16 << 20), ("grpc.enable_retries", 0)]
    ca = tls_ca() if ca is None else ca
    if ca:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(ca).expanduser().read_bytes())
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    return grpc.intercept_channel(channel, _CallMetadata(auth_metadata()))


def describe_rpc_error(exc: grpc.RpcError, target: str) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach the tokenwire server at {target}: is `tokenwire serve` running? ({details})"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"UNAUTHENTICATED: {details} (pass --api-key or set TOKENWIRE_API_KEY)"
    name = code.name if code is not None else "ERROR"
    return f"{name}: {details}"


def list_models(target: str):
    """The server's ListModels reply (raises grpc.RpcError; see describe_rpc_error)."""
    from tokenwire.v1 import inference_pb2 as pb
    from tokenwire.v1 import inference_pb2_grpc as pb_grpc

    channel = open_channel(target)
    try:
        return pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
    finally:
        channel.close()
