"""Scheduling claims over real sockets: round-robin turns across users, the per-user stream
limit, and chunked prefill that keeps running streams flowing.

Each check reads the order of events as the server sends them (queued positions, which stream's
token came first), never wall-clock durations. Every request names its `user`: if that field were
lost on the way (bridge or server), every request would be the same user and each test fails.
"""

from __future__ import annotations

import asyncio
import json
import math

import aiohttp
import grpc
import pytest
from conftest import start_bridge, start_server

from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc

CHUNK = 32  # --prefill-chunk of the `limited` server
GREEDY = pb.SamplingParams(temperature=0.0)
# About 320 tokens: some 10 prefill chunks of 32.
LONG_PROMPT = "Here is a list of facts to remember. " + " ".join(
    f"Fact {i}: the box number {i} holds {i * 7 % 13} red and {i * 5 % 11} blue marbles." for i in range(14)
) + " Question: how many red marbles are in box 3? Answer:"


class Log:
    """Events of several streams in the order they arrived, as (stream, kind, value)."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, object]] = []
        self._changed = asyncio.Event()

    def add(self, name: str, kind: str, value: object = None) -> None:
        self.entries.append((name, kind, value))
        self._changed.set()

    def of(self, name: str, kind: str) -> list:
        return [value for n, k, value in self.entries if n == name and k == kind]

    def first(self, name: str) -> tuple[str, object] | None:
        """The first (kind, value) of a stream, None before it has any."""
        return next(((k, value) for n, k, value in self.entries if n == name), None)

    def kinds(self, name: str) -> list[str]:
        return [k for n, k, _ in self.entries if n == name]

    async def until(self, predicate, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def follow_grpc(self, name: str, call) -> None:
        try:
            async for response in call:
                kind = response.WhichOneof("event")
                value = getattr(response, kind)
                self.add(name, kind, value.position if kind == "queued" else value)
        except grpc.aio.AioRpcError as exc:
            self.add(name, "error", exc.code())
        except asyncio.CancelledError:
            if not call.cancelled():  # this task was cancelled, not the call
                raise
            self.add(name, "cancelled")

    async def follow_sse(self, name: str, resp: aiohttp.ClientResponse) -> None:
        """An OpenAI stream: `comment` (text, heartbeats left out) and `data` (parsed chunk, or
        "[DONE]") entries."""
        try:
            while raw := await resp.content.readline():
                line = raw.decode().rstrip("\n")
                if line.startswith(":") and line[1:].strip() != "keep-alive":  # heartbeats only mean "wait"
                    self.add(name, "comment", line[1:].strip())
                elif line.startswith("data:"):
                    data = line.split(":", 1)[1].strip()
                    self.add(name, "data", data if data == "[DONE]" else json.loads(data))
        except (aiohttp.ClientError, ConnectionResetError):
            pass
        self.add(name, "closed")


@pytest.fixture(scope="module")
def one_slot(models_dir, tmp_path_factory):
    """One sequence at a time: every other request waits its turn in the queue."""
    proc = start_server(tmp_path_factory.mktemp("one-slot"), models_dir, "--max-batch", "1", "--metrics-port", "0")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def limited(models_dir, tmp_path_factory):
    """Room for four streams, one per user, long prompts prefilled CHUNK tokens per step."""
    tmp = tmp_path_factory.mktemp("limited")
    server = start_server(tmp, models_dir, "--max-batch", "4", "--max-streams-per-user", "1",
                          "--prefill-chunk", str(CHUNK), "--prefix-cache-bytes", "0", "--metrics-port", "0")
    bridge = start_bridge(tmp, server.target)
    yield server, bridge
    bridge.stop()
    server.stop()


async def test_a_second_user_is_admitted_before_the_first_users_later_requests(one_slot) -> None:
    async with grpc.aio.insecure_channel(one_slot.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        log = Log()
        calls, tasks = {}, []

        def start(name: str, user: str, max_tokens: int) -> None:
            request = pb.GenerateRequest(prompt=f"Request {name}:", max_tokens=max_tokens, ignore_eos=True,
                                         user=user, sampling=GREEDY)
            calls[name] = stub.Generate(request, timeout=120)
            tasks.append(asyncio.ensure_future(log.follow_grpc(name, calls[name])))

        start("hold", "alice", 4000)  # holds the one slot until cancelled
        await log.until(lambda: log.of("hold", "token"))
        for name in ("a1", "a2", "a3"):  # alice queues three more, one after the other
            start(name, "alice", 2)
            await log.until(lambda name=name: log.of(name, "queued"))
        assert [log.of(n, "queued")[0] for n in ("a1", "a2", "a3")] == [1, 2, 3]
        start("b1", "bob", 2)  # then bob asks once
        await log.until(lambda: log.of("b1", "queued"))
        assert log.of("b1", "queued")[0] == 2, (
            "round-robin: bob's one request goes after alice's next one, not after all of alice's "
            f"(positions: {[(n, log.of(n, 'queued')) for n in ('a1', 'a2', 'a3', 'b1')]})")
        # The later requests of alice move down a place behind bob's.
        await log.until(lambda: log.of("a3", "queued")[-1:] == [4])
        assert log.of("a2", "queued")[-1] == 3
        calls["hold"].cancel()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    first_tokens = []
    for name, kind, _ in log.entries:
        if kind == "token" and name not in first_tokens:
            first_tokens.append(name)
    assert first_tokens == ["hold", "a1", "b1", "a2", "a3"], "admitted in this order, one at a time"
    for name in ("a1", "a2", "a3", "b1"):
        assert len(log.of(name, "token")) == 2 and log.of(name, "finished")[0].reason == pb.FINISH_REASON_LENGTH


async def test_per_user_stream_limit_over_the_openai_api(limited) -> None:
    """`user` of /v1/chat/completions reaches the scheduler: with --max-streams-per-user 1 alice's
    second stream waits although slots are free, while bob's runs at once."""
    _, bridge = limited
    url = bridge.url + "/v1/chat/completions"

    def body(user: str, max_tokens: int) -> dict:
        return {"messages": [{"role": "user", "content": f"Tell {user} a story."}], "max_tokens": max_tokens,
                "ignore_eos": True, "temperature": 0, "stream": True, "user": user}

    log = Log()
    async with aiohttp.ClientSession() as http:
        hold = await http.post(url, json=body("alice", 4000))
        tasks = [asyncio.ensure_future(log.follow_sse("hold", hold))]
        await log.until(lambda: len(log.of("hold", "data")) >= 2)  # alice streams
        second = await http.post(url, json=body("alice", 3))
        tasks.append(asyncio.ensure_future(log.follow_sse("a2", second)))
        await log.until(lambda: log.first("a2") is not None)
        assert log.first("a2") == ("comment", "queued at position 1"), (
            "alice's second stream must wait for her first, with three slots free")
        other = await http.post(url, json=body("bob", 3))
        tasks.append(asyncio.ensure_future(log.follow_sse("b1", other)))
        await log.until(lambda: log.first("b1") is not None)
        assert log.first("b1")[0] == "data", f"bob's stream must run at once, not wait: {log.first('b1')}"
        await log.until(lambda: "[DONE]" in log.of("b1", "data"))
        assert "comment" not in log.kinds("b1"), "bob's stream was never queued"
        chunks = [c for c in log.of("b1", "data") if c != "[DONE]"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert not log.of("a2", "data"), "alice's second stream still waits while her first runs"
        hold.close()  # alice's first stream ends: her second one runs now
        await log.until(lambda: "[DONE]" in log.of("a2", "data"))
        chunks = [c for c in log.of("a2", "data") if c != "[DONE]"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        second.close()
        other.close()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)


async def test_a_detached_chat_reply_keeps_its_users_stream_slot(limited) -> None:
    """A chat reply whose call has ended goes on, so it still holds its user's one stream: alice's
    next request waits (position 1) until the reply is stopped, then runs."""
    from tokenwire.v1 import history_pb2 as hpb
    from tokenwire.v1 import history_pb2_grpc as hpb_grpc

    server, _ = limited
    log = Log()
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub, history = pb_grpc.InferenceStub(channel), hpb_grpc.HistoryStub(channel)
        chat = await history.CreateChat(hpb.CreateChatRequest(title="slot"), timeout=30)
        reply = stub.Generate(pb.GenerateRequest(
            chat_id=chat.id, messages=[pb.ChatMessage(role="user", content="Tell me a long story.")], user="alice",
            max_tokens=4000, ignore_eos=True, sampling=GREEDY), timeout=120)
        following = asyncio.ensure_future(log.follow_grpc("reply", reply))
        await log.until(lambda: len(log.of("reply", "token")) >= 2)
        reply.cancel()  # alice's client goes away; her reply does not
        await asyncio.wait_for(following, 30)
        second = stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=2, user="alice", sampling=GREEDY),
                               timeout=120)
        waiting = asyncio.ensure_future(log.follow_grpc("a2", second))
        await log.until(lambda: bool(log.of("a2", "queued")))
        assert log.of("a2", "queued") == [1] and not log.of("a2", "token"), "the detached reply holds alice's slot"
        message_id = log.of("reply", "chat")[0].reply_message_id
        stopped = await history.StopReply(hpb.StopReplyRequest(chat_id=chat.id, message_id=message_id), timeout=30)
        assert stopped.status == hpb.MESSAGE_STATUS_STOPPED
        await asyncio.wait_for(waiting, 60)  # its slot is free: alice's request runs
        assert log.of("a2", "finished")[0].reason == pb.FINISH_REASON_LENGTH


async def test_a_long_prompt_is_prefilled_between_the_decode_steps_of_a_running_stream(limited) -> None:
    """With --prefill-chunk 32 a ~320-token prompt takes ~10 scheduler steps, each with one decode
    step of the running stream: that stream's tokens arrive between the long request's start and
    its first token. Prefilled in one piece, at most one token of it would arrive in between."""
    server, _ = limited
    log = Log()
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        runner = stub.Generate(pb.GenerateRequest(prompt="Count with me: 1, 2, 3,", max_tokens=4000, ignore_eos=True,
                                                  user="runner", sampling=GREEDY), timeout=120)
        running = asyncio.ensure_future(log.follow_grpc("runner", runner))
        await log.until(lambda: len(log.of("runner", "token")) >= 3)
        long = stub.Generate(pb.GenerateRequest(prompt=LONG_PROMPT, max_tokens=1, user="reader", sampling=GREEDY),
                             timeout=120)
        await asyncio.wait_for(log.follow_grpc("long", long), 120)
        assert len(log.of("runner", "finished")) == 0, "the running stream was still running"
        runner.cancel()
        await asyncio.wait_for(running, 30)
    finished = log.of("long", "finished")[0]
    assert finished.reason == pb.FINISH_REASON_LENGTH and finished.usage.cached_prompt_tokens == 0
    chunks = math.ceil(finished.usage.prompt_tokens / CHUNK)
    assert chunks >= 8, finished.usage
    names_kinds = [(n, k) for n, k, _ in log.entries]
    submitted = names_kinds.index(("long", "started"))
    first = names_kinds.index(("long", "token"))
    between = names_kinds[submitted:first].count(("runner", "token"))
    # One decode step after each chunk but the last: chunks - 1 tokens (a step of slack either way).
    assert between >= (chunks - 1) // 2, (
        f"only {between} tokens of the running stream arrived while a {finished.usage.prompt_tokens}-token "
        f"prompt was prefilled in {chunks} chunks of {CHUNK}: the prefill stalled it")
