"""Typed errors: every refusal carries the standard rich details (google.rpc.Status in
`grpc-status-details-bin`) with a stable reason and the request field at fault, from one table
(server/api/errors.py); the bridge maps those, never the message text."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tokenwire.server.api import errors
from tokenwire.server.chats.store import ChatNotFound, ChatRequestError
from tokenwire.server.engine.requests import InvalidRequest
from tokenwire.server.engine.scheduler import QueueFull
from tokenwire.server.models.manager import ModelBusy, ModelLoadError, ModelNotFound, ModelTooLarge
from tokenwire.v1 import inference_pb2 as pb


def details_of(exc: grpc.RpcError) -> tuple[str, str, list[str], int | None]:
    """(reason, ErrorInfo field, BadRequest fields, RetryInfo seconds) of a failed call."""
    status = rpc_status.from_call(exc)
    assert status is not None, f"{exc.code()} without rich details: {exc.details()}"
    reason, field, violations, retry = "", "", [], None
    for detail in status.details:
        info, bad, retry_info = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest(), error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            assert info.domain == "tokenwire.dev"
            reason, field = info.reason, info.metadata.get("field", "")
        elif detail.Unpack(bad):
            violations = [v.field for v in bad.field_violations]
        elif detail.Unpack(retry_info):
            retry = retry_info.retry_delay.seconds
    return reason, field, violations, retry


def msg(role: str, content: str) -> pb.ChatMessage:
    return pb.ChatMessage(role=role, content=content)


# (name, request, code, reason, field)
CASES = [
    ("temperature", pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(temperature=-1)),
     grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "temperature"),
    ("top_p", pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_p=0)),
     grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "top_p"),
    ("frequency_penalty", pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(frequency_penalty=3)),
     grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "frequency_penalty"),
    ("role", pb.GenerateRequest(messages=[msg("user", "hi"), msg("wizard", "x")]),
     grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "messages[1].role"),
    ("both", pb.GenerateRequest(prompt="x", messages=[msg("user", "hi")]),
     grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "prompt"),
    ("empty", pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "messages"),
    ("stop", pb.GenerateRequest(prompt="x", stop=[""]), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "stop"),
    ("keep_alive", pb.GenerateRequest(prompt="x", keep_alive_s=float("nan")),
     grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "keep_alive_s"),
    ("max_tokens past the window", pb.GenerateRequest(prompt="x", max_tokens=10**6),
     grpc.StatusCode.INVALID_ARGUMENT, "CONTEXT_LENGTH_EXCEEDED", "max_tokens"),
    ("prompt past the window", pb.GenerateRequest(prompt="word " * 9000),
     grpc.StatusCode.INVALID_ARGUMENT, "CONTEXT_LENGTH_EXCEEDED", "prompt"),
    ("prompt too large", pb.GenerateRequest(messages=[msg("user", "x" * (1 << 20) + "x")]),
     grpc.StatusCode.INVALID_ARGUMENT, "PROMPT_TOO_LARGE", "messages"),
    ("unknown model", pb.GenerateRequest(prompt="x", model="no-such-model"),
     grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", "model"),
    ("unknown chat", pb.GenerateRequest(chat_id="0123456789abcdef", messages=[msg("user", "hi")]),
     grpc.StatusCode.NOT_FOUND, "CHAT_NOT_FOUND", "chat_id"),
    ("prompt with a chat", pb.GenerateRequest(chat_id="0123456789abcdef", prompt="hi"),
     grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "prompt"),
]


@pytest.mark.parametrize("name,request_,code,reason,field", CASES, ids=[c[0] for c in CASES])
def test_refusals_name_their_reason_and_field(stub, name, request_, code, reason, field) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request_, timeout=60))
    assert info.value.code() == code, info.value.details()
    got_reason, got_field, violations, _ = details_of(info.value)
    assert (got_reason, got_field) == (reason, field), info.value.details()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert violations == [field]


def test_load_and_unload_of_an_unknown_model_are_typed(stub) -> None:
    for call in (lambda: list(stub.LoadModel(pb.LoadModelRequest(model="nope"), timeout=30)),
                 lambda: stub.UnloadModel(pb.UnloadModelRequest(model="nope"), timeout=30)):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert details_of(info.value)[:2] == ("MODEL_NOT_FOUND", "model")


@pytest.mark.parametrize("exc,code,reason,field,retry", [
    (InvalidRequest("bad", "top_k"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "top_k", None),
    (ChatRequestError("bad title", "title"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "title", None),
    (ChatNotFound("abc"), grpc.StatusCode.NOT_FOUND, "CHAT_NOT_FOUND", "chat_id", None),
    (ModelNotFound("m", []), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", "model", None),
    (QueueFull(4, retry_after_s=3), grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL", "", 3),
    (ModelBusy("busy", retry_after_s=2), grpc.StatusCode.RESOURCE_EXHAUSTED, "MODEL_BUSY", "model", 2),
    (ModelTooLarge("big"), grpc.StatusCode.FAILED_PRECONDITION, "MODEL_TOO_LARGE", "model", None),
    (ModelLoadError("broken"), grpc.StatusCode.FAILED_PRECONDITION, "MODEL_LOAD_FAILED", "model", None),
    (errors.Unauthenticated("no key"), grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID", "", None),
])
def test_the_table(exc, code, reason, field, retry) -> None:
    status = errors.status_for(exc)
    assert status.code == code and status.details == str(exc)

    class Call:  # what rpc_status.from_call reads of a finished call
        def code(self):
            return status.code

        def details(self):
            return status.details

        def trailing_metadata(self):
            return status.trailing_metadata

    assert details_of(Call()) == (reason, field, [field] if field and code == grpc.StatusCode.INVALID_ARGUMENT
                                  else [], retry)
    assert (("retry-after", str(retry)) in status.trailing_metadata) == (retry is not None)


def test_an_error_outside_the_table_is_a_bug_not_a_status() -> None:
    with pytest.raises(TypeError, match="add it to the table"):
        errors.status_for(KeyError("x"))
