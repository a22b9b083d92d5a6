"""The chat database failing under a running server (the Security issue, item 3), over real
sockets: while another process holds the write lock, listings and model calls are answered, a
write is UNAVAILABLE (not a client error, not UNKNOWN), and a reply that cannot be stored ends
its stream with REPLY_NOT_STORED instead of `finished`; the server keeps the reply in its journal,
so even when it is killed before the lock goes, the next start stores the whole reply."""

from __future__ import annotations

import signal
import sqlite3

import grpc
import pytest
from conftest import start_server
from google.rpc import error_details_pb2, status_pb2

from tokenwire.v1 import history_pb2 as hpb
from tokenwire.v1 import history_pb2_grpc as hpb_grpc
from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc

FAST_FAIL = {"TOKENWIRE_DB_BUSY_TIMEOUT": "0.2"}


def reason_of(error: grpc.RpcError) -> str:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""


def test_a_reply_the_locked_database_refuses_is_kept_and_stored_after_a_crash(models_dir, tmp_path) -> None:
    db = str(tmp_path / "locked.db")
    server = start_server(tmp_path, models_dir, "--database", db, "--metrics-port", "0", env=FAST_FAIL)
    received: list[str] = []
    lock = sqlite3.connect(db, isolation_level=None, timeout=10)
    try:
        with grpc.insecure_channel(server.target) as channel:
            history, inference = hpb_grpc.HistoryStub(channel), pb_grpc.InferenceStub(channel)
            chat = history.CreateChat(hpb.CreateChatRequest(title="locked"), timeout=30)
            stream = inference.Generate(pb.GenerateRequest(
                chat_id=chat.id, messages=[pb.ChatMessage(role="user", content="Count from one to ten.")],
                max_tokens=48, ignore_eos=True, sampling=pb.SamplingParams(temperature=0)), timeout=120)
            with pytest.raises(grpc.RpcError) as ended:
                for response in stream:
                    if response.HasField("token"):
                        received.append(response.token.text)
                        if len(received) == 1:
                            lock.execute("BEGIN IMMEDIATE")  # another process takes the write lock
                    assert not response.HasField("finished"), "an unstored reply must not end as finished"
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value
            assert reason_of(ended.value) == "REPLY_NOT_STORED" and "kept" in ended.value.details()
            assert len(received) == 48
            # Still locked: reads are answered, a write is UNAVAILABLE with its reason.
            listed = history.ListChats(hpb.ListChatsRequest(), timeout=5).chats
            assert [c.id for c in listed] == [chat.id]
            assert inference.ListModels(pb.ListModelsRequest(), timeout=5).models
            with pytest.raises(grpc.RpcError) as refused:
                history.CreateChat(hpb.CreateChatRequest(title="while locked"), timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert reason_of(refused.value) == "STORE_UNAVAILABLE"
        server.proc.send_signal(signal.SIGKILL)  # and the server dies before the lock goes
        server.proc.wait(30)
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
    again = start_server(tmp_path, models_dir, "--database", db, "--metrics-port", "0")
    try:
        with grpc.insecure_channel(again.target) as channel:
            messages = hpb_grpc.HistoryStub(channel).GetChat(hpb.GetChatRequest(chat_id=chat.id), timeout=30).messages
        reply = messages[-1]
        assert reply.status == hpb.MESSAGE_STATUS_LENGTH, reply
        assert reply.content == "".join(received), "the whole reply, as the client received it"
        assert reply.usage.completion_tokens == 48
    finally:
        again.stop()
    assert "stored 1 reply outcome(s) journaled by an earlier run" in again.log()
