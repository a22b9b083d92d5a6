"""A reply is saved while it streams (Security issue, 5): a server killed mid-reply (SIGKILL, power
loss) loses at most the last second of its text, not the whole reply."""

from __future__ import annotations

import signal
import time

import grpc
from conftest import start_server

from tokenwire.v1 import history_pb2 as hpb
from tokenwire.v1 import history_pb2_grpc as hpb_grpc
from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc


def test_a_crash_keeps_the_text_streamed_until_a_second_before(models_dir, tmp_path) -> None:
    db = str(tmp_path / "crash.db")
    server = start_server(tmp_path, models_dir, "--database", db, "--metrics-port", "0")
    received: list[str] = []
    with grpc.insecure_channel(server.target) as channel:
        chat = hpb_grpc.HistoryStub(channel).CreateChat(hpb.CreateChatRequest(title="crash"), timeout=30)
        stream = pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(
            chat_id=chat.id, messages=[pb.ChatMessage(role="user", content="Tell me a very long story.")],
            max_tokens=3000, ignore_eos=True, sampling=pb.SamplingParams(temperature=0)), timeout=300)
        first_at = None
        for response in stream:
            if response.HasField("token"):
                received.append(response.token.text)
                first_at = first_at or time.monotonic()
                if time.monotonic() - first_at > 2.5:
                    break
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(30)
    sent = "".join(received)
    again = start_server(tmp_path, models_dir, "--database", db, "--metrics-port", "0")
    try:
        with grpc.insecure_channel(again.target) as channel:
            reply = hpb_grpc.HistoryStub(channel).GetChat(hpb.GetChatRequest(chat_id=chat.id), timeout=30).messages[-1]
        assert reply.status == hpb.MESSAGE_STATUS_INTERRUPTED
        assert reply.content and sent.startswith(reply.content), "the saved text is what the client got"
        assert len(reply.content) > len(sent) / 3, "at most about the last second of text is lost"
    finally:
        again.stop()
