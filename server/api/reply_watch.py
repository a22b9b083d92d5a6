"""One call watching a live chat reply (Generate on a chat, History.WatchReply): the reply's
events relayed to the call, its early end as the call's status."""

from __future__ import annotations

import grpc

from tokenwire.server.engine.records import ReplyStatus

from .chat_turns import ended_by
from .errors import with_statuses
from .live_replies import LiveReply


async def watch_reply(live: LiveReply, after: int, context: grpc.aio.ServicerContext, owns: bool = False):
    """The reply's events after event `after`, to its end. The call ending detaches it, except
    that the deadline of the call that started it (`owns`) stops it: that caller bounded the work
    (stored as CANCELLED, as a deadline always was)."""
    stream = live.watch(after)
    try:
        async for response in with_statuses(stream, context):
            yield response
    finally:
        if owns and not live.done and ended_by(context) is ReplyStatus.CANCELLED:
            live.stop(ReplyStatus.CANCELLED)
        await stream.aclose()
