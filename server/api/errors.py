"""One table from domain exceptions to gRPC statuses, with machine-readable details.

Every refusal the servicers send goes through `abort_for`: the status code, a human message,
and the standard rich error model (`grpc-status-details-bin`, a google.rpc.Status) carrying
* google.rpc.ErrorInfo: domain "tokenwire.dev", a stable `reason` (QUEUE_FULL,
  CONTEXT_LENGTH_EXCEEDED, ...) and metadata["field"] when a request field is at fault;
* google.rpc.BadRequest with that field, for INVALID_ARGUMENT;
* google.rpc.RetryInfo (and a plain `retry-after` trailer) when retrying later can succeed.
Clients in any language read them with their gRPC library's status helpers; the bridge maps
them to HTTP without reading the message text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tokenwire.server.chats.store import ChatNotFound, ChatRequestError
from tokenwire.server.chats.worker import ReplyNotStored, StoreUnavailable
from tokenwire.server.engine.requests import InvalidRequest
from tokenwire.server.engine.scheduler import KVBudgetExceeded, QueueFull, SchedulerUnavailable
from tokenwire.server.engine.session import DeviceUnavailable
from tokenwire.server.models.manager import (
    ModelBusy,
    ModelLoadError,
    ModelNotFound,
    ModelTooLarge,
    ModelUnloading,
)

from .live_replies import MessageNotFound, ReplyNotLive

DOMAIN = "tokenwire.dev"
T = TypeVar("T")


class Unauthenticated(Exception):
    """The call needs a valid API key and has none (or a revoked one)."""


class PermissionDenied(Exception):
    """The caller's key may not do this (model management needs an admin key)."""


class ServerDraining(Exception):
    """The server is shutting down: it finishes the replies it is writing and takes no new ones."""

    retry_after_s = 1

    def __init__(self) -> None:
        super().__init__("the server is shutting down; retry on another replica or once it is back")


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    reason: str  # the default reason; an exception's own `reason` attribute wins
    field: str = ""  # the default field; an exception's own `field` attribute wins


# Most specific first: the first entry the exception is an instance of applies.
TABLE: tuple[tuple[type[BaseException], Refusal], ...] = (
    (InvalidRequest, Refusal(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")),
    (ChatRequestError, Refusal(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")),
    (ModelNotFound, Refusal(grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", "model")),
    (ChatNotFound, Refusal(grpc.StatusCode.NOT_FOUND, "CHAT_NOT_FOUND", "chat_id")),
    (MessageNotFound, Refusal(grpc.StatusCode.NOT_FOUND, "MESSAGE_NOT_FOUND", "message_id")),
    (ReplyNotLive, Refusal(grpc.StatusCode.FAILED_PRECONDITION, "REPLY_FINISHED", "message_id")),
    (QueueFull, Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL")),
    # Not "retry shortly": this request cannot fit even alone (fewer tokens or a bigger budget will).
    (KVBudgetExceeded, Refusal(grpc.StatusCode.FAILED_PRECONDITION, "KV_BUDGET_EXCEEDED", "max_tokens")),
    (ModelUnloading, Refusal(grpc.StatusCode.UNAVAILABLE, "MODEL_UNLOADING", "model")),
    (ModelBusy, Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "MODEL_BUSY", "model")),
    (ModelTooLarge, Refusal(grpc.StatusCode.FAILED_PRECONDITION, "MODEL_TOO_LARGE", "model")),
    (ModelLoadError, Refusal(grpc.StatusCode.FAILED_PRECONDITION, "MODEL_LOAD_FAILED", "model")),
    (DeviceUnavailable, Refusal(grpc.StatusCode.UNAVAILABLE, "DEVICE_UNAVAILABLE")),
    (SchedulerUnavailable, Refusal(grpc.StatusCode.UNAVAILABLE, "MODEL_UNAVAILABLE", "model")),
    (Unauthenticated, Refusal(grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")),
    (ServerDraining, Refusal(grpc.StatusCode.UNAVAILABLE, "SERVER_DRAINING")),
    (PermissionDenied, Refusal(grpc.StatusCode.PERMISSION_DENIED, "ADMIN_KEY_REQUIRED")),
    (StoreUnavailable, Refusal(grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")),
    (ReplyNotStored, Refusal(grpc.StatusCode.UNAVAILABLE, "REPLY_NOT_STORED")),
)
DOMAIN_ERRORS: tuple[type[BaseException], ...] = tuple(kind for kind, _ in TABLE)


def refusal_of(exc: BaseException) -> Refusal | None:
    for kind, refusal in TABLE:
        if isinstance(exc, kind):
            return Refusal(refusal.code, getattr(exc, "reason", "") or refusal.reason,
                           getattr(exc, "field", "") or refusal.field)
    return None


def status_for(exc: BaseException) -> grpc.Status:
    """The gRPC status (code, message, trailing metadata with the details) for a domain error."""
    refusal = refusal_of(exc)
    if refusal is None:
        raise TypeError(f"no status for {type(exc).__name__}: add it to the table") from exc
    message = str(exc)
    info = error_details_pb2.ErrorInfo(reason=refusal.reason, domain=DOMAIN)
    if refusal.field:
        info.metadata["field"] = refusal.field
    details = [info]
    if refusal.field and refusal.code == grpc.StatusCode.INVALID_ARGUMENT:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=refusal.field, description=message,
                                                        reason=refusal.reason)]))
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        details.append(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=int(retry_after))))
    status = status_pb2.Status(code=getattr(code_pb2, refusal.code.name), message=message)
    for detail in details:
        status.details.add().Pack(detail)
    rich = rpc_status.to_status(status)
    if retry_after is not None:
        rich = _with_metadata(rich, ("retry-after", str(int(retry_after))))
    return rich


def _with_metadata(status: grpc.Status, *pairs: tuple[str, str]) -> grpc.Status:
    return _Status(status.code, status.details, (*status.trailing_metadata, *pairs))


@dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple


async def with_statuses(stream: AsyncIterator[T], context: grpc.aio.ServicerContext) -> AsyncIterator[T]:
    """Relays a stream to a call; the domain error that ends it early ends the call with its status."""
    try:
        async for item in stream:
            yield item
    except DOMAIN_ERRORS as exc:
        await abort_for(context, exc)


async def abort_for(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """Ends the call with the status for `exc` (raises, as context.abort does)."""
    status = status_for(exc)
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)
    raise AssertionError("context.abort returned")  # abort always raises
