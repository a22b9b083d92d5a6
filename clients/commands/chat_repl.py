"""`tokenwire chat`: an interactive chat whose turns the server stores (History + Generate with chat_id).

Replies stream as they are generated. Ctrl-C stops the reply being written (StopReply: the
server keeps what was written, marked stopped) and the chat goes on; Ctrl-D or /exit leaves. A
reply outlives the CLI (the server goes on writing it when the CLI leaves or loses its
connection): `tokenwire chat -c` shows one still being written (WatchReply) before it prompts.
When a chat has outgrown the model's context window, a line says which of its oldest messages
the model no longer sees. The chat is created on the server with the first message, so /new
costs nothing.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import grpc

from tokenwire.clients.chat_pages import call_line, message_body, message_heading, unseen_line, whole_chat
from tokenwire.v1 import history_pb2 as hpb
from tokenwire.v1 import history_pb2_grpc as hpb_grpc
from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc

HELP = """commands:
  /model [NAME]   show the model, or use NAME from the next message on
  /new            start a new chat
  /history        your recent chats (continue one with: tokenwire chat --chat ID)
  /image PATH     attach an image to your next message (its text is read for the model)
  /help           this list
  /exit           leave (or Ctrl-D); Ctrl-C stops a reply without leaving"""

_STATUS_NOTES = {
    pb.FINISH_REASON_LENGTH: "max tokens reached",
    pb.FINISH_REASON_CANCELLED: "stopped",
    pb.FINISH_REASON_ERROR: "error",
}


@dataclass
class ChatOptions:
    model: str = ""
    system: str = ""
    max_tokens: int = 0
    sampling: pb.SamplingParams = field(default_factory=pb.SamplingParams)


class ChatRepl:
    def __init__(self, channel: grpc.Channel, options: ChatOptions, out: TextIO = sys.stdout) -> None:
        self.history = hpb_grpc.HistoryStub(channel)
        self.inference = pb_grpc.InferenceStub(channel)
        self.options = options
        self.out = out
        self.chat: hpb.Chat | None = None
        self.images: list[pb.Image] = []  # attached with /image, sent with the next message

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    # ---- set-up ------------------------------------------------------------------------------

    def open_chat(self, chat_id: str) -> None:
        """Continues a stored chat: shows where it stands."""
        reply = whole_chat(self.history, chat_id)
        self.chat = reply.chat
        if not self.options.model:
            self.options.model = reply.chat.model
        self.say(f"continuing chat {reply.chat.id}: {reply.chat.title or '(untitled)'} "
                 f"({len(reply.messages)} messages)")
        shown = [m for m in reply.messages if m.role != "system"][-2:]
        writing = bool(shown) and shown[-1].role == "assistant" and shown[-1].status == hpb.MESSAGE_STATUS_PENDING
        finished = [m for m in reply.messages if m.role == "assistant" and m.status != hpb.MESSAGE_STATUS_PENDING]
        if finished and finished[-1].dropped_messages and not writing:  # what the latest turn left out
            self.say(unseen_line(reply.messages, finished[-1].dropped_messages))
        for message in shown[:-1] if writing else shown:
            who = {"user": "you", "assistant": "model"}.get(message.role) or message_heading(message)
            text = "\n    ".join(line for line in message_body(message) if line)
            self.say(f"  {who}: {text if len(text) <= 300 else text[:300] + '…'}")
        if writing:  # the server is still writing it: all of it so far, then the rest as it comes
            self.say("  model (still writing; Ctrl-C stops it):")
            self.follow(self.history.WatchReply(hpb.WatchReplyRequest(chat_id=reply.chat.id,
                                                                      message_id=shown[-1].id)), shown[-1].id)

    def open_last_chat(self) -> bool:
        chats = self.history.ListChats(hpb.ListChatsRequest(page_size=1), timeout=30).chats
        if not chats:
            return False
        self.open_chat(chats[0].id)
        return True

    # ---- the loop ------------------------------------------------------------------------------

    def run(self, read_line=input) -> int:
        model = self.options.model or "the server's default model"
        self.say(f"tokenwire chat with {model}. /help for commands, Ctrl-D or /exit to leave.")
        while True:
            try:
                line = read_line(">>> ")
            except EOFError:
                self.say()
                return 0
            except KeyboardInterrupt:
                self.say("\n(Ctrl-D or /exit to leave)")
                continue
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if self.command(text) == "exit":
                    return 0
                continue
            self.turn(line)

    def command(self, text: str) -> str:
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit", "/bye"):
            return "exit"
        if name == "/help":
            self.say(HELP)
        elif name == "/new":
            self.chat = None
            self.say("new chat (it is saved with its first message)")
        elif name == "/model":
            self.model_command(arg)
        elif name == "/history":
            self.list_chats()
        elif name == "/image":
            self.image_command(arg)
        else:
            self.say(f"unknown command {name}; /help lists them")
        return ""

    def image_command(self, path: str) -> None:
        if not path:
            self.say("usage: /image PATH (a PNG, JPEG, WebP, GIF or BMP file)")
            return
        try:
            data = Path(path).expanduser().read_bytes()
        except OSError as exc:
            self.say(f"cannot read {path}: {exc.strerror or exc}")
            return
        self.images.append(pb.Image(data=data))
        self.say(f"attached {Path(path).name} ({len(data) / 1024:.0f} KiB): it goes with your next message")

    def model_command(self, name: str) -> None:
        if not name:
            self.say(f"model: {self.options.model or '(the server default)'}")
            return
        models = self.inference.ListModels(pb.ListModelsRequest(), timeout=30).models
        known = {m.id: m.id for m in models} | {a: m.id for m in models for a in m.aliases}
        if name not in known:
            self.say(f"no model {name!r}; models: {', '.join(m.id for m in models)}")
            return
        self.options.model = known[name]
        self.say(f"model: {self.options.model}")

    def list_chats(self) -> None:
        chats = self.history.ListChats(hpb.ListChatsRequest(page_size=10), timeout=30).chats
        if not chats:
            self.say("no chats yet")
        for chat in chats:
            mark = "*" if self.chat is not None and chat.id == self.chat.id else " "
            self.say(f"{mark} {chat.id}  {chat.message_count:>3} msgs  {chat.title or '(untitled)'}")

    def turn(self, text: str) -> None:
        """Sends one message and streams the reply; Ctrl-C stops the reply."""
        if self.chat is None:
            self.chat = self.history.CreateChat(
                hpb.CreateChatRequest(model=self.options.model, system_prompt=self.options.system), timeout=30)
        request = pb.GenerateRequest(
            chat_id=self.chat.id, model=self.options.model, max_tokens=self.options.max_tokens,
            sampling=self.options.sampling, messages=[pb.ChatMessage(role="user", content=text, images=self.images)],
        )
        self.images = []
        self.follow(self.inference.Generate(request), 0)

    def stop_reply(self, reply_id: int) -> str:
        """Stops a reply on the server (the call's end alone would leave it going on)."""
        if not reply_id or self.chat is None:
            return "[stopped]"  # it had not begun: the call's cancel leaves it unwritten
        try:
            self.history.StopReply(hpb.StopReplyRequest(chat_id=self.chat.id, message_id=reply_id), timeout=30)
        except grpc.RpcError as exc:
            return f"[could not stop the reply: {exc.code().name}: {exc.details()}]"
        return "[stopped]"

    def follow(self, call, reply_id: int) -> None:
        """Prints a reply's stream (a Generate or WatchReply call) as it comes. Ctrl-C stops the
        reply on the server (StopReply), once its id is known (the `chat` event, or `reply_id`);
        before that, cancelling the call leaves it unwritten (stored as stopped)."""
        finished, thinking = None, False
        try:
            for response in call:
                kind = response.WhichOneof("event")
                if kind == "token":
                    if response.token.reasoning:
                        if not thinking:
                            self.out.write("[thinking] ")
                        thinking = True
                        self.out.write(response.token.reasoning)
                    elif thinking and response.token.text:
                        self.out.write("\n[/thinking]\n")
                        thinking = False
                    self.out.write(response.token.text)
                    self.out.flush()
                elif kind == "chat":
                    reply_id = response.chat.reply_message_id
                    if response.chat.dropped_messages:
                        self.say(unseen_line(whole_chat(self.history, response.chat.chat_id).messages,
                                             response.chat.dropped_messages))
                elif kind == "finished":
                    finished = response.finished
                    for c in finished.tool_calls:
                        self.say(("\n" if finished.tool_calls[0] is c else "") + call_line(c.name, c.arguments_json, c.id))
        except KeyboardInterrupt:
            call.cancel()
            self.say("\n" + self.stop_reply(reply_id))
            return
        except grpc.RpcError as exc:
            self.say(f"\n[error: {exc.code().name}: {exc.details()}]")
            return
        self.say()
        if finished is not None and finished.reason in _STATUS_NOTES:
            note = _STATUS_NOTES[finished.reason]
            if finished.error_message:
                note += f": {finished.error_message}"
            self.say(f"[{note}]")
