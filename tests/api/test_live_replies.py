"""Chat replies that outlive their call (issue 17, item 4), over gRPC on the session's server: a
reply goes on when its Generate call ends, WatchReply picks it up from any event, StopReply ends
it at once, and one nobody watches is stopped after its detached time. Stateless generations
still stop when their call ends."""

from __future__ import annotations

import re
import time

import grpc
import pytest
from test_big_chats import reason_of

from tokenwire.v1 import history_pb2 as hpb
from tokenwire.v1 import history_pb2_grpc as hpb_grpc
from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc

GREEDY = pb.SamplingParams(temperature=0)
STORY = "Tell me a long story about a dragon who learns to bake bread."


class Chats:
    def __init__(self, channel: grpc.Channel) -> None:
        self.history = hpb_grpc.HistoryStub(channel)
        self.inference = pb_grpc.InferenceStub(channel)

    def new(self) -> str:
        return self.history.CreateChat(hpb.CreateChatRequest(title="live"), timeout=30).id

    def generate(self, chat_id: str, max_tokens: int, **kw):
        return self.inference.Generate(pb.GenerateRequest(
            chat_id=chat_id, messages=[pb.ChatMessage(role="user", content=STORY)], sampling=GREEDY,
            max_tokens=max_tokens, ignore_eos=True, **kw), timeout=120)

    def watch(self, chat_id: str, message_id: int, after: int = 0, timeout: float = 120):
        return self.history.WatchReply(hpb.WatchReplyRequest(chat_id=chat_id, message_id=message_id,
                                                             after_event_id=after), timeout=timeout)

    def stop(self, chat_id: str, message_id: int) -> hpb.Message:
        return self.history.StopReply(hpb.StopReplyRequest(chat_id=chat_id, message_id=message_id), timeout=30)

    def reply(self, chat_id: str) -> hpb.Message:
        return self.history.GetChat(hpb.GetChatRequest(chat_id=chat_id), timeout=30).messages[-1]

    def settled(self, chat_id: str, timeout: float = 20) -> hpb.Message:
        deadline = time.monotonic() + timeout
        while (reply := self.reply(chat_id)).status == hpb.MESSAGE_STATUS_PENDING:
            assert time.monotonic() < deadline, "the reply is still pending"
            time.sleep(0.05)
        return reply


def read_until(stream, tokens: int) -> list[pb.GenerateResponse]:
    """The stream's events up to its `tokens`-th token (the call goes on)."""
    got = []
    for response in stream:
        got.append(response)
        if sum(r.HasField("token") for r in got) == tokens:
            return got
    raise AssertionError(f"the stream ended after {len(got)} events")


def text_of(events: list[pb.GenerateResponse]) -> str:
    return "".join(r.token.text for r in events if r.HasField("token"))


def reply_id_of(events: list[pb.GenerateResponse]) -> int:
    return next(r.chat.reply_message_id for r in events if r.HasField("chat"))


@pytest.fixture
def chats(channel) -> Chats:
    return Chats(channel)


def test_a_reply_goes_on_without_its_call_and_is_watched_again(chats) -> None:
    chat_id = chats.new()
    call = chats.generate(chat_id, 48)
    before = read_until(call, 6)
    call.cancel()  # the client goes away: the reply is written on
    assert [r.event_id for r in before] == list(range(1, len(before) + 1))
    assert before[0].HasField("started") and before[1].HasField("chat")
    reply_id = reply_id_of(before)
    assert chats.reply(chat_id).status == hpb.MESSAGE_STATUS_PENDING

    rest = list(chats.watch(chat_id, reply_id, after=before[-1].event_id))
    assert [r.event_id for r in rest] == list(range(before[-1].event_id + 1, before[-1].event_id + 1 + len(rest)))
    assert rest[-1].HasField("finished") and rest[-1].finished.reason == pb.FINISH_REASON_LENGTH
    stored = chats.reply(chat_id)
    assert stored.status == hpb.MESSAGE_STATUS_LENGTH and stored.usage.completion_tokens == 48
    # What came before the hang-up plus the reattached stream is the stored reply, token for token.
    assert text_of(before) + text_of(rest) == stored.content
    # From the start, a watcher gets the very events the first call got (for 30 s after the end).
    again = list(chats.watch(chat_id, reply_id))
    assert again[:len(before)] == before and again[len(before):] == rest


def test_stop_reply_stops_at_once_and_keeps_what_was_written(chats) -> None:
    chat_id = chats.new()
    call = chats.generate(chat_id, 2000)
    before = read_until(call, 4)
    reply_id = reply_id_of(before)
    started = time.monotonic()
    stopped = chats.stop(chat_id, reply_id)
    took = time.monotonic() - started
    assert stopped.status == hpb.MESSAGE_STATUS_STOPPED and stopped.id == reply_id
    assert took < 3, f"StopReply took {took:.1f} s"
    assert stopped.content.startswith(text_of(before)) and 4 <= stopped.usage.completion_tokens < 200
    # The call that started it sees its end: the rest of the text, then `finished` (cancelled).
    rest = list(call)
    assert rest[-1].finished.reason == pb.FINISH_REASON_CANCELLED
    assert text_of(before) + text_of(rest) == stopped.content
    assert chats.reply(chat_id) == stopped
    assert chats.stop(chat_id, reply_id) == stopped  # stopping an ended reply answers it as stored


def test_watch_and_stop_refusals(chats) -> None:
    chat_id = chats.new()
    events = list(chats.generate(chat_id, 3))
    user_id = next(r.chat.user_message_id for r in events if r.HasField("chat"))
    cases = [
        (lambda: list(chats.watch(chat_id, user_id)), grpc.StatusCode.FAILED_PRECONDITION, "REPLY_FINISHED"),
        (lambda: list(chats.watch(chat_id, 10**12)), grpc.StatusCode.NOT_FOUND, "MESSAGE_NOT_FOUND"),
        (lambda: chats.stop(chat_id, 10**12), grpc.StatusCode.NOT_FOUND, "MESSAGE_NOT_FOUND"),
        (lambda: list(chats.watch("0123456789abcdef", 1)), grpc.StatusCode.NOT_FOUND, "CHAT_NOT_FOUND"),
        (lambda: chats.stop("0123456789abcdef", 1), grpc.StatusCode.NOT_FOUND, "CHAT_NOT_FOUND"),
        (lambda: list(chats.watch(chat_id, reply_id_of(events), after=len(events) + 1)),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (lambda: list(chats.generate(chat_id, 3, detached_reply_s=-1)), grpc.StatusCode.INVALID_ARGUMENT,
         "INVALID_ARGUMENT"),
    ]
    for run, code, reason in cases:
        with pytest.raises(grpc.RpcError) as refused:
            run()
        assert (refused.value.code(), reason_of(refused.value)) == (code, reason), refused.value.details()
    with pytest.raises(grpc.RpcError) as refused:
        list(chats.watch(chat_id, user_id))
    assert "GetChat" in refused.value.details()


def test_a_reply_nobody_watches_is_stopped_after_its_detached_time(chats, server) -> None:
    chat_id = chats.new()
    call = chats.generate(chat_id, 2000, detached_reply_s=0.4)
    reply_id = reply_id_of(read_until(call, 2))
    call.cancel()
    # Watched again before its time is up, it goes on as long as it is watched...
    watch = chats.watch(chat_id, reply_id)
    seen = read_until(watch, 40)
    time.sleep(0.8)
    assert chats.reply(chat_id).status == hpb.MESSAGE_STATUS_PENDING
    watch.cancel()
    # ...and once nobody watches it, it is stopped after 0.4 s, kept as far as it went.
    stored = chats.settled(chat_id)
    assert stored.status == hpb.MESSAGE_STATUS_CANCELLED and "no client watching" in stored.error_message
    assert stored.content.startswith(text_of(seen)) and 40 <= stored.usage.completion_tokens < 2000
    assert re.search(rf"chat {chat_id}: reply {reply_id} stopped, nobody watched it", server.log())


def test_a_stateless_generation_still_stops_with_its_call(chats, server) -> None:
    request_id = f"stateless-{time.monotonic_ns()}"
    call = chats.inference.Generate(pb.GenerateRequest(prompt="Once upon a time", max_tokens=2000, ignore_eos=True,
                                                       sampling=GREEDY, request_id=request_id), timeout=120)
    events = read_until(call, 3)
    assert all(r.event_id == 0 for r in events), "only a chat's events are numbered"
    call.cancel()
    pattern = re.compile(rf"request {request_id} .*generated=(\d+) .*finish=cancelled")
    deadline = time.monotonic() + 10
    while not (match := pattern.search(server.log())):
        assert time.monotonic() < deadline, "the generation went on after its call ended"
        time.sleep(0.05)
    assert int(match.group(1)) < 100
