"""A chat never becomes unreadable (the Security issue, item 8), over real sockets: a message the
model cannot take is refused before anything is stored; a chat past gRPC's 4 MiB message limit
is read a page at a time (gRPC, the bridge, the CLI) and exported as a stream; a chat is capped
(--max-chat-bytes) with a clear 400, never a misleading 429."""

from __future__ import annotations

import json
import subprocess

import aiohttp
import grpc
import pytest
from conftest import cli, start_bridge, start_server

from tokenwire.clients.chat_pages import whole_chat
from tokenwire.v1 import history_pb2 as hpb
from tokenwire.v1 import history_pb2_grpc as hpb_grpc
from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc

CAP = 6 << 20
BIG = 900_000  # one message: well under a request's 4 MiB, six of them well over a reply's


@pytest.fixture(scope="module")
def served(models_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("big-chats")
    server = start_server(tmp, models_dir, "--max-chat-bytes", str(CAP), "--metrics-port", "0")
    bridge = start_bridge(tmp, server.target)
    channel = grpc.insecure_channel(server.target)
    yield server, bridge, hpb_grpc.HistoryStub(channel), pb_grpc.InferenceStub(channel)
    channel.close()
    bridge.stop()
    server.stop()


def reason_of(error: grpc.RpcError) -> str:
    from google.rpc import error_details_pb2, status_pb2

    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""


def test_a_message_too_long_for_the_context_is_refused_before_it_is_stored(served) -> None:
    _, _, history, inference = served
    chat = history.CreateChat(hpb.CreateChatRequest(title="too long"), timeout=30)
    with pytest.raises(grpc.RpcError) as refused:
        list(inference.Generate(pb.GenerateRequest(
            chat_id=chat.id, messages=[pb.ChatMessage(role="user", content="word " * 20_000)], max_tokens=4),
            timeout=60))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(refused.value) == "CONTEXT_LENGTH_EXCEEDED"
    reply = history.GetChat(hpb.GetChatRequest(chat_id=chat.id), timeout=30)
    assert list(reply.messages) == [] and reply.chat.message_count == 0, "nothing of the refused turn is stored"
    # The chat still works: a turn that fits is answered and stored.
    responses = list(inference.Generate(pb.GenerateRequest(
        chat_id=chat.id, messages=[pb.ChatMessage(role="user", content="Hi")], max_tokens=3, ignore_eos=True),
        timeout=60))
    assert responses[-1].HasField("finished")
    stored = history.GetChat(hpb.GetChatRequest(chat_id=chat.id), timeout=30).messages
    assert [m.role for m in stored] == ["user", "assistant"] and stored[0].content == "Hi"


async def test_a_chat_past_four_mib_is_paged_exported_and_capped(served, tmp_path) -> None:
    server, bridge, history, inference = served
    chat = history.CreateChat(hpb.CreateChatRequest(title="big"), timeout=30)
    texts = [f"{i}:" + ("é" if i % 2 else "x") * (BIG // (2 if i % 2 else 1)) for i in range(6)]
    for i, text in enumerate(texts):
        history.AppendMessage(hpb.AppendMessageRequest(chat_id=chat.id, role="user" if i % 2 == 0 else "assistant",
                                                       content=text), timeout=30)
    first = history.GetChat(hpb.GetChatRequest(chat_id=chat.id), timeout=30)
    assert first.next_page_token and 0 < len(first.messages) < 6, "one reply may not pass 4 MiB: paged"
    assert sum(len(m.content.encode()) for m in first.messages) <= 2 << 20
    assert [m.content for m in whole_chat(history, chat.id).messages] == texts
    one = history.GetChat(hpb.GetChatRequest(chat_id=chat.id, page_size=1, page_token=first.next_page_token), timeout=30)
    assert [m.content for m in one.messages] == [texts[len(first.messages)]]
    with pytest.raises(grpc.RpcError) as bad:
        history.GetChat(hpb.GetChatRequest(chat_id=chat.id, page_token="not-a-token"), timeout=30)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # The cap: the next big message would pass 6 MiB (the chat holds about 5.2 MiB).
    with pytest.raises(grpc.RpcError) as capped:
        history.AppendMessage(hpb.AppendMessageRequest(chat_id=chat.id, role="user", content="y" * (2 << 20)),
                              timeout=30)
    assert capped.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason_of(capped.value) == "CHAT_TOO_LARGE"
    assert "new chat" in capped.value.details()
    with pytest.raises(grpc.RpcError) as capped_turn:
        list(inference.Generate(pb.GenerateRequest(
            chat_id=chat.id, messages=[pb.ChatMessage(role="user", content="z" * (2 << 20))], max_tokens=2),
            timeout=60))
    assert reason_of(capped_turn.value) in ("CHAT_TOO_LARGE", "PROMPT_TOO_LARGE"), capped_turn.value

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{bridge.url}/api/chats/{chat.id}") as resp:
            assert resp.status == 200, await resp.text()
            assert [m["content"] for m in (await resp.json())["messages"]] == texts
        async with http.get(f"{bridge.url}/api/chats/{chat.id}/export?format=json") as resp:
            assert resp.status == 200 and resp.headers["Content-Disposition"].endswith(f'chat-{chat.id}.json"')
            assert [m["content"] for m in json.loads(await resp.read())["messages"]] == texts
        async with http.post(f"{bridge.url}/api/chats/{chat.id}/messages",
                             json={"content": "y" * 1_000_000, "max_tokens": 2}) as resp:  # under the body limit
            body = await resp.json()
            assert resp.status == 400 and body["error"]["code"] == "chat_too_large", body
        async with http.get(f"{bridge.url}/api/chats/{chat.id}") as resp:
            assert len((await resp.json())["messages"]) == 6, "the refused message was not stored"

    out = tmp_path / "exports"
    out.mkdir()
    done = subprocess.run(cli("history", "export", chat.id, "-f", "markdown", "-o", str(out), "--server",
                              server.target), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    written = (out / f"chat-{chat.id}.md").read_text()
    assert all(text in written for text in texts) and not list(out.glob("*.part"))
