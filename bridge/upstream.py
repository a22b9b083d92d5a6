"""The bridge's side of the gRPC connection: one channel, the stub, and reads with a heartbeat."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Final

import grpc
from aiohttp import web

from tokenwire import affinity
from tokenwire.v1 import history_pb2 as hpb
from tokenwire.v1 import history_pb2_grpc as hpb_grpc
from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc

from .config import BridgeSettings
from .credentials import grpc_metadata
from .errors import ApiError, from_rpc_error

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 << 20),
    # A local server that restarts should be found again in seconds, not grpc's default 2 minutes.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class Heartbeat:
    """Yielded by GenerateCall when no message came within the heartbeat interval."""

    def __repr__(self) -> str:
        return "HEARTBEAT"


HEARTBEAT: Final = Heartbeat()


class GenerateCall:
    """Iterates one Generate stream: yields each message the moment it arrives, or HEARTBEAT
    after `heartbeat_s` of silence (the pending read goes on). A failed call raises ApiError."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, heartbeat_s: float, upstream: Upstream) -> None:
        self._call = call
        self._heartbeat_s = heartbeat_s
        self._upstream = upstream
        self._pending: asyncio.Future | None = None
        self._ended = False

    def __aiter__(self) -> GenerateCall:
        return self

    async def __anext__(self) -> pb.GenerateResponse | Heartbeat:
        if self._ended:
            raise StopAsyncIteration
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._call.read())
        done, _ = await asyncio.wait({self._pending}, timeout=self._heartbeat_s)
        if not done:
            return HEARTBEAT
        task, self._pending = self._pending, None
        try:
            message = task.result()
        except grpc.aio.AioRpcError as exc:
            self._ended = True
            raise self._upstream.error(exc) from exc
        if message is grpc.aio.EOF:
            self._ended = True
            raise StopAsyncIteration
        return message

    async def drain(self, timeout_s: float = 2.0) -> None:
        """Reads to the end after the `finished` message, so the call ends with its status, not a cancel."""
        with contextlib.suppress(asyncio.TimeoutError, ApiError):
            async with asyncio.timeout(timeout_s):
                async for _ in self:
                    pass

    async def close(self) -> None:
        """Cancels the call if it is still running: the server stops generating within one step."""
        if not self._call.done():
            self._call.cancel()
        if self._pending is not None:
            self._pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pending
            self._pending = None
        self._ended = True


class Upstream:
    """Owns the grpc.aio channel (opened on app start-up, inside the event loop)."""

    def __init__(self, settings: BridgeSettings) -> None:
        self.settings = settings
        self.target = settings.grpc_target
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.InferenceStub | None = None
        self._history: hpb_grpc.HistoryStub | None = None

    async def open(self) -> None:
        if self.settings.tls_ca:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(self.settings.tls_ca).expanduser().read_bytes())
            self._channel = grpc.aio.secure_channel(self.target, credentials, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._history = hpb_grpc.HistoryStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(grace=None)
            self._channel = None

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            raise RuntimeError("Upstream.open() was not called (is the app running?)")
        return self._channel

    @property
    def stub(self) -> pb_grpc.InferenceStub:
        if self._stub is None:
            raise RuntimeError("Upstream.open() was not called (is the app running?)")
        return self._stub

    @property
    def history(self) -> hpb_grpc.HistoryStub:
        if self._history is None:
            raise RuntimeError("Upstream.open() was not called (is the app running?)")
        return self._history

    def error(self, exc: grpc.aio.AioRpcError) -> ApiError:
        return from_rpc_error(exc, self.target, self.settings.retry_after_s)

    def generate(self, request: pb.GenerateRequest) -> GenerateCall:
        metadata = grpc_metadata(affinity.for_request(request))
        return GenerateCall(self.stub.Generate(request, metadata=metadata), self.settings.heartbeat_s, self)

    def watch_reply(self, request: hpb.WatchReplyRequest) -> GenerateCall:
        """A chat reply's events again (History.WatchReply), read like a Generate stream."""
        metadata = grpc_metadata(affinity.for_chat(request.chat_id))
        return GenerateCall(self.history.WatchReply(request, metadata=metadata), self.settings.heartbeat_s, self)

    async def list_models(self) -> pb.ListModelsResponse:
        try:
            reply = await self.stub.ListModels(pb.ListModelsRequest(), timeout=30, metadata=grpc_metadata())
        except grpc.aio.AioRpcError as exc:
            raise self.error(exc) from exc
        return reply



UPSTREAM = web.AppKey("upstream", Upstream)

