"""The live-reply registry's limits, without a model (server/api/live_replies.py): a user keeps at
most MAX_DETACHED_PER_USER replies running with nobody watching (a client that posts messages and
hangs up cannot fill the batch), and deleting a chat stops its reply."""

from __future__ import annotations

import asyncio

from tokenwire.server.api.live_replies import MAX_DETACHED_PER_USER, LiveReplies, LiveReply
from tokenwire.server.engine.records import ReplyStatus
from tokenwire.v1 import inference_pb2 as pb


def endless_reply(replies: LiveReplies, stopped: list, chat: str, message: int, user: int) -> LiveReply:
    """A reply whose events never end until it is stopped (as a sequence ends when cancelled)."""
    halt = asyncio.Event()

    def stop(status: ReplyStatus, note: str) -> None:
        stopped.append((message, status, note))
        halt.set()

    async def events():
        yield pb.GenerateResponse(token=pb.TokenDelta(text="x"))
        await halt.wait()

    reply = LiveReply(chat, message, user, detached_s=600, stop=stop)
    replies.start(reply, events(), on_end=lambda: None)
    return reply


async def watch_then_hang_up(reply: LiveReply) -> None:
    stream = reply.watch()
    await anext(stream)
    await stream.aclose()


async def test_a_user_keeps_a_bounded_number_of_unwatched_replies() -> None:
    replies, stopped = LiveReplies(), []
    mine = [endless_reply(replies, stopped, f"c{i}", i, user=1) for i in range(MAX_DETACHED_PER_USER + 2)]
    other = endless_reply(replies, stopped, "theirs", 99, user=2)
    for reply in [other, *mine]:
        await watch_then_hang_up(reply)
    await asyncio.sleep(0.01)
    assert [m for m, _, _ in stopped] == [0, 1], "the oldest unwatched replies beyond the limit stop"
    assert all(status == ReplyStatus.CANCELLED and "no client watching" in note for _, status, note in stopped)
    assert not other.done and all(not r.done for r in mine[2:]), "another user's and the newest go on"
    replies.stop_all()


async def test_deleting_a_chat_stops_its_reply_for_its_owner_only() -> None:
    replies, stopped = LiveReplies(), []
    endless_reply(replies, stopped, "chat", 1, user=1)
    assert replies.stop_chat(2, "chat") == 0, "another user cannot stop it"
    assert replies.stop_chat(1, "chat") == 1
    assert stopped == [(1, ReplyStatus.CANCELLED, "the chat was deleted")]
