"""enum_name: the one mapping from proto enum values to the names the bridge and the CLI show."""

from __future__ import annotations

from tokenwire.enums import enum_name
from tokenwire.v1 import history_pb2 as hpb
from tokenwire.v1 import inference_pb2 as pb


def test_names_lose_their_type_prefix() -> None:
    assert [enum_name(pb.FinishReason, v) for v in pb.FinishReason.values()] == [
        "unspecified", "stop", "length", "cancelled", "error", "tool_calls"]
    assert enum_name(hpb.MessageStatus, hpb.MESSAGE_STATUS_INTERRUPTED) == "interrupted"
    assert enum_name(pb.ModelState, pb.MODEL_STATE_LOADED) == "loaded"
    assert enum_name(pb.LoadStage, pb.LOAD_STAGE_READY) == "ready"


def test_a_value_from_a_newer_server_is_named_not_fatal() -> None:
    assert enum_name(pb.FinishReason, 99) == "unknown-99"
