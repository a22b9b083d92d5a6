"""`tokenwire serve --database postgresql://...` against a real PostgreSQL server: a chat turn is
committed, answered, stored and found by search, through gRPC, as on SQLite."""

from __future__ import annotations

import grpc
from conftest import start_server

from tokenwire.v1 import history_pb2 as hpb
from tokenwire.v1 import history_pb2_grpc as hpb_grpc
from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc


def test_a_server_keeps_its_chats_in_postgres(models_dir, tmp_path, pg_url) -> None:
    server = start_server(tmp_path, models_dir, "--database", pg_url, "--metrics-port", "0")
    try:
        with grpc.insecure_channel(server.target) as channel:
            history, inference = hpb_grpc.HistoryStub(channel), pb_grpc.InferenceStub(channel)
            chat = history.CreateChat(hpb.CreateChatRequest(title="on postgres"), timeout=30)
            responses = list(inference.Generate(pb.GenerateRequest(
                chat_id=chat.id, messages=[pb.ChatMessage(role="user", content="Name three colours of parrots")],
                max_tokens=6, ignore_eos=True, sampling=pb.SamplingParams(temperature=0)), timeout=60))
            text = "".join(r.token.text for r in responses if r.HasField("token"))
            messages = history.GetChat(hpb.GetChatRequest(chat_id=chat.id), timeout=30).messages
            assert [m.role for m in messages] == ["user", "assistant"] and messages[1].content == text
            assert messages[1].status == hpb.MESSAGE_STATUS_LENGTH
            found = history.SearchChats(hpb.SearchChatsRequest(query="parrot"), timeout=30).results
            assert [r.chat.id for r in found] == [chat.id]
    finally:
        server.stop()
    assert "PooledPostgresqlDatabase" in server.log()
