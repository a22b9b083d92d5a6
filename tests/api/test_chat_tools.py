"""Tools on a stored chat (the compatibility issue, item 3: calls and results "stored in chats"),
over gRPC on the real model: a forced call is stored as the reply's tool_calls with the very ids
the stream sent, its result is a turn of its own that the model answers, the next turn's prompt
holds both, and a result naming no call of the chat is refused with nothing stored."""

from __future__ import annotations

import json
import subprocess

import grpc
import jsonschema
import pytest
from conftest import cli

from tokenwire.v1 import history_pb2 as hpb
from tokenwire.v1 import history_pb2_grpc as hpb_grpc
from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
           "additionalProperties": False}
TOOL = pb.Tool(name="get_weather", description="The weather in a city now.", parameters_json=json.dumps(WEATHER))
GREEDY = pb.SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def stubs(server):
    channel = grpc.insecure_channel(server.target)
    yield hpb_grpc.HistoryStub(channel), pb_grpc.InferenceStub(channel)
    channel.close()


def turn(inference, chat_id: str, messages: list[pb.ChatMessage], **kw) -> tuple[list[pb.GenerateResponse], pb.Finished]:
    events = list(inference.Generate(pb.GenerateRequest(chat_id=chat_id, messages=messages, sampling=GREEDY, **kw),
                                     timeout=120))
    return events, events[-1].finished


def test_a_call_and_its_result_are_stored_and_prompt_the_next_turn(stubs, server) -> None:
    history, inference = stubs
    chat = history.CreateChat(hpb.CreateChatRequest(), timeout=30)
    events, finished = turn(inference, chat.id, [pb.ChatMessage(role="user", content="Weather in Paris?")],
                            tools=[TOOL], tool_choice="required", parallel_tool_calls=False, max_tokens=60)
    assert finished.reason == pb.FINISH_REASON_TOOL_CALLS, finished
    streamed = [e.tool_call for e in events if e.WhichOneof("event") == "tool_call" and e.tool_call.id]
    assert [c.id for c in streamed] == [c.id for c in finished.tool_calls] and len(streamed) == 1

    stored = list(history.GetChat(hpb.GetChatRequest(chat_id=chat.id), timeout=30).messages)
    reply = stored[-1]
    assert [m.role for m in stored] == ["user", "assistant"]
    assert reply.status == hpb.MESSAGE_STATUS_COMPLETE
    assert [(c.id, c.name, c.arguments_json) for c in reply.tool_calls] == \
        [(c.id, c.name, c.arguments_json) for c in finished.tool_calls]
    assert "<tool_call>" not in reply.content, "the call is stored as a call, not as text"
    jsonschema.validate(json.loads(reply.tool_calls[0].arguments_json), WEATHER)

    call_id = reply.tool_calls[0].id
    result = pb.ChatMessage(role="tool", tool_call_id=call_id, content="18 degrees and sunny")
    events, finished = turn(inference, chat.id, [result], tools=[TOOL], tool_choice="none", max_tokens=8)
    chat_event = next(e.chat for e in events if e.WhichOneof("event") == "chat")
    assert finished.reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH) and not finished.tool_calls
    stored = list(history.GetChat(hpb.GetChatRequest(chat_id=chat.id), timeout=30).messages)
    assert [m.role for m in stored] == ["user", "assistant", "tool", "assistant"]
    tool_message = stored[2]
    assert (tool_message.id, tool_message.tool_call_id, tool_message.name, tool_message.content) == \
        (chat_event.user_message_id, call_id, "get_weather", "18 degrees and sunny")
    assert stored[3].content and not stored[3].tool_calls

    # A result naming no call of the chat is refused, and nothing of that turn is stored.
    stray = pb.ChatMessage(role="tool", tool_call_id="call_nobody", content="?")
    with pytest.raises(grpc.RpcError) as exc:
        turn(inference, chat.id, [stray], max_tokens=4)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details() == "messages[0].tool_call_id 'call_nobody' names no tool call of this chat"
    assert len(history.GetChat(hpb.GetChatRequest(chat_id=chat.id), timeout=30).messages) == 4

    # The CLI shows the call under the reply and the result under its own heading.
    shown = subprocess.run(cli("history", "show", chat.id, "--server", server.target), capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    arguments = reply.tool_calls[0].arguments_json
    assert f"--- assistant\n-> get_weather({arguments})  [{call_id}]\n" in shown.stdout
    assert f"--- tool get_weather [{call_id}]\n18 degrees and sunny\n" in shown.stdout
