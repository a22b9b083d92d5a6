"""Who is calling: API keys from `authorization: Bearer <key>` metadata, checked on every call.

Without keys (none created, or all revoked) the server has one user, "local", and every call
is theirs. Once a key exists, every call but health checks and reflection must carry a valid
one: the interceptor answers UNAUTHENTICATED before any servicer runs. Lookups are cached for
a few seconds (a revoked key stops working within CACHE_TTL_S).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc

from tokenwire.server.chats.api_keys import hash_key
from tokenwire.server.chats.store import LOCAL_USER
from tokenwire.server.chats.worker import ChatWorker, StoreUnavailable

from .errors import Unauthenticated, abort_for, status_for

CACHE_TTL_S = 5.0
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class Identity:
    user_id: int
    name: str
    by_key: bool  # False: the server has no keys and everyone is the local user
    admin: bool = True  # may manage models; without keys the local user may

    @property
    def restricted(self) -> bool:
        """A key holder without the admin role."""
        return self.by_key and not self.admin


def bearer_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return None


class Authenticator:
    def __init__(self, worker: ChatWorker) -> None:
        self.worker = worker
        self._keys_required: tuple[bool, float] = (False, 0.0)
        self._local: Identity | None = None
        self._owners: dict[str, tuple[Identity | None, float]] = {}

    async def keys_required(self) -> bool:
        value, expires = self._keys_required
        if time.monotonic() >= expires:
            value = await self.worker.read(self.worker.keys.required)
            self._keys_required = (value, time.monotonic() + CACHE_TTL_S)
        return value

    async def identify(self, metadata) -> Identity:
        """The caller's identity from call metadata; Unauthenticated when a key is needed."""
        if not await self.keys_required():
            if self._local is None:
                user_id = await self.worker.read(self.worker.store.find_user, LOCAL_USER)
                if user_id is None:
                    user_id = await self.worker.call(self.worker.store.ensure_user, LOCAL_USER)
                self._local = Identity(user_id, LOCAL_USER, by_key=False)
            return self._local
        token = bearer_token(metadata)
        if token is None:
            raise Unauthenticated("this server requires an API key: send `authorization: Bearer <key>` "
                                  "(create one with `tokenwire keys create NAME`)")
        digest = hash_key(token)
        identity, expires = self._owners.get(digest, (None, 0.0))
        if time.monotonic() >= expires:
            owner = await self.worker.read(self.worker.keys.owner_of, token) if token else None
            identity = Identity(owner.user_id, owner.user, by_key=True, admin=owner.admin) if owner else None
            if len(self._owners) > 10_000:
                self._owners.clear()
            self._owners[digest] = (identity, time.monotonic() + CACHE_TTL_S)
        if identity is None:
            raise Unauthenticated("invalid or revoked API key")
        return identity

    async def identity(self, context: grpc.aio.ServicerContext) -> Identity:
        """For servicers: the interceptor has already let the call in, so this is a cache hit."""
        try:
            return await self.identify(context.invocation_metadata())
        except (Unauthenticated, StoreUnavailable) as exc:
            await abort_for(context, exc)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid key (when keys exist) before they reach a servicer."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(OPEN_METHODS):
            return await continuation(handler_call_details)
        try:
            await self.auth.identify(handler_call_details.invocation_metadata)
        except (Unauthenticated, StoreUnavailable) as exc:  # no key, or the key lookup failed
            handler = await continuation(handler_call_details)
            return _refusal(handler, exc) if handler is not None else None
        return await continuation(handler_call_details)


def _refusal(handler: grpc.RpcMethodHandler, exc: Exception) -> grpc.RpcMethodHandler:
    """A handler shaped like `handler` that answers the status of `exc`."""
    status = status_for(exc)

    async def refuse(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)

    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return factory(refuse, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)
