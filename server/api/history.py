"""The History gRPC service: translates between protobuf and ChatStore records, nothing more;
WatchReply and StopReply reach the chat replies being written (live_replies.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import grpc

from tokenwire.server.chats import export as chat_export
from tokenwire.server.chats.store import ChatNotFound, ChatRequestError
from tokenwire.server.chats.worker import ChatWorker, StoreUnavailable
from tokenwire.server.engine.records import ReplyStatus
from tokenwire.server.engine.requests import InvalidRequest
from tokenwire.v1 import history_pb2 as hpb
from tokenwire.v1 import history_pb2_grpc as hpb_grpc

from .auth import Authenticator
from .convert import chat_to_proto, message_to_proto, result_to_proto
from .errors import abort_for
from .live_replies import LiveReplies, LiveReply, MessageNotFound, ReplyNotLive
from .reply_watch import watch_reply

EXPORT_CHUNK_BYTES = 1 << 20
STOP_WAIT_S = 10.0  # StopReply waits this long at most for the stopped reply to be stored


class HistoryService(hpb_grpc.HistoryServicer):
    def __init__(self, worker: ChatWorker, auth: Authenticator,
                 on_chat_deleted: Callable[[str], object] | None = None, replies: LiveReplies | None = None) -> None:
        self.worker = worker
        self.chats = worker.store
        self.auth = auth
        self.replies = replies or LiveReplies()  # the Inference service's: the chat replies being written
        self.on_chat_deleted = on_chat_deleted  # what else a deleted chat takes with it (its KV files)

    async def _run(self, context: grpc.aio.ServicerContext, fn, *args, reads: bool = False):
        """fn(user_id, *args) on the store's writer thread (a reader's when it only reads), its
        failures as gRPC statuses (a database that fails is UNAVAILABLE, never a client error)."""
        identity = await self.auth.identity(context)
        run = self.worker.read if reads else self.worker.call
        try:
            return await run(fn, identity.user_id, *args)
        except (ChatNotFound, ChatRequestError, StoreUnavailable) as exc:
            await abort_for(context, exc)

    async def _live(self, context: grpc.aio.ServicerContext, chat_id: str, message_id: int) -> LiveReply | None:
        """The caller's reply being written here, or None (another user's is not theirs to see)."""
        identity = await self.auth.identity(context)
        return self.replies.find(identity.user_id, chat_id, message_id)

    async def _stored(self, context: grpc.aio.ServicerContext, chat_id: str, message_id: int, live: bool):
        """The stored message (NOT_FOUND when the chat is not the caller's or has no such
        message); FAILED_PRECONDITION when it is pending but not `live` here."""
        message = await self._run(context, self.chats.message_of, chat_id, message_id, reads=True)
        if message is None:
            await abort_for(context, MessageNotFound(chat_id, message_id))
        if message.status == ReplyStatus.PENDING and not live:
            await abort_for(context, ReplyNotLive(
                f"reply {message_id} is being written by another server (try again: a router sends a chat's "
                "calls to the server that writes it)", "REPLY_ON_ANOTHER_SERVER"))
        return message

    async def WatchReply(self, request: hpb.WatchReplyRequest, context):  # noqa: N802
        live = await self._live(context, request.chat_id, request.message_id)
        if live is None:
            message = await self._stored(context, request.chat_id, request.message_id, live=False)
            await abort_for(context, ReplyNotLive(
                f"message {request.message_id} is not being written (it is stored, status {message.status}): "
                "read it with GetChat"))
        if request.after_event_id > len(live.events):
            await abort_for(context, InvalidRequest(
                f"after_event_id {request.after_event_id} is past the last event of reply {request.message_id} "
                f"({len(live.events)})", "after_event_id"))
        async for response in watch_reply(live, request.after_event_id, context):
            yield response

    async def StopReply(self, request: hpb.StopReplyRequest, context):  # noqa: N802
        live = await self._live(context, request.chat_id, request.message_id)
        if live is not None:
            live.stop(ReplyStatus.STOPPED)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.ended.wait(), STOP_WAIT_S)
        return message_to_proto(await self._stored(context, request.chat_id, request.message_id, live is not None))

    async def CreateChat(self, request: hpb.CreateChatRequest, context):  # noqa: N802
        chat = await self._run(context, self.chats.create_chat, request.title, request.model, request.system_prompt)
        return chat_to_proto(chat)

    async def ListChats(self, request: hpb.ListChatsRequest, context):  # noqa: N802
        chats, token = await self._run(context, self.chats.list_chats, request.page_size, request.page_token,
                                          reads=True)
        return hpb.ListChatsResponse(chats=[chat_to_proto(c) for c in chats], next_page_token=token)

    async def GetChat(self, request: hpb.GetChatRequest, context):  # noqa: N802
        chat, messages, token = await self._run(context, self.chats.get_chat_page, request.chat_id, request.page_size,
                                                request.page_token, reads=True)
        return hpb.GetChatResponse(chat=chat_to_proto(chat), messages=[message_to_proto(m) for m in messages],
                                   next_page_token=token)

    async def RenameChat(self, request: hpb.RenameChatRequest, context):  # noqa: N802
        return chat_to_proto(await self._run(context, self.chats.rename_chat, request.chat_id, request.title))

    async def DeleteChat(self, request: hpb.DeleteChatRequest, context):  # noqa: N802
        deleted = await self._run(context, self.chats.delete_chat, request.chat_id)
        identity = await self.auth.identity(context)
        self.replies.stop_chat(identity.user_id, request.chat_id)  # nothing left to write it into
        if self.on_chat_deleted is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.on_chat_deleted, request.chat_id)
        return hpb.DeleteChatResponse(deleted_messages=deleted)

    async def AppendMessage(self, request: hpb.AppendMessageRequest, context):  # noqa: N802
        message = await self._run(context, self.chats.append_message, request.chat_id, request.role, request.content)
        return message_to_proto(message)

    async def SearchChats(self, request: hpb.SearchChatsRequest, context):  # noqa: N802
        results = await self._run(context, self.chats.search, request.query, request.limit, reads=True)
        return hpb.SearchChatsResponse(results=[result_to_proto(r) for r in results])

    async def ExportChat(self, request: hpb.ExportChatRequest, context):  # noqa: N802
        chat, messages = await self._run(context, self.chats.get_chat, request.chat_id, reads=True)
        markdown = request.format == hpb.EXPORT_FORMAT_MARKDOWN
        if markdown:
            content, media_type = chat_export.to_markdown(chat, messages), chat_export.MARKDOWN_TYPE
        else:
            content, media_type = chat_export.to_json(chat, messages), chat_export.JSON_TYPE
        return hpb.ExportChatResponse(content=content, media_type=media_type,
                                      filename=chat_export.filename(chat, markdown))

    async def ExportChatStream(self, request: hpb.ExportChatRequest, context):  # noqa: N802
        """The export in chunks of at most EXPORT_CHUNK_BYTES, whatever the chat's size."""
        reply = await self.ExportChat(request, context)
        for i, piece in enumerate(utf8_chunks(reply.content, EXPORT_CHUNK_BYTES)):
            yield hpb.ExportChatResponse(content=piece, media_type=reply.media_type if i == 0 else "",
                                         filename=reply.filename if i == 0 else "")


def utf8_chunks(text: str, most: int) -> list[str]:
    """text in pieces of at most `most` UTF-8 bytes, never splitting a character (at least one)."""
    data, pieces, at = text.encode(), [], 0
    while at < len(data) or not pieces:
        end = min(at + most, len(data))
        while end < len(data) and end > at and (data[end] & 0xC0) == 0x80:  # inside a character
            end -= 1
        pieces.append(data[at:end].decode())
        at = end
        if at >= len(data):
            break
    return pieces
