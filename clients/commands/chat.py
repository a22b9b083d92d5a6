"""The `tokenwire chat`, `tokenwire history ...` and `tokenwire keys ...` commands."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import grpc

from tokenwire.clients.chat_pages import message_body, message_heading, whole_chat
from tokenwire.clients.connection import describe_rpc_error, open_channel, server_target
from tokenwire.enums import enum_name


def _fail(message: str, code: int = 1) -> int:
    print(f"tokenwire: {message}", file=sys.stderr)
    return code


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else "-"


def _history_stub(channel):
    from tokenwire.v1 import history_pb2_grpc as hpb_grpc

    return hpb_grpc.HistoryStub(channel)


def _rpc(args: argparse.Namespace, fn) -> int:
    """Runs fn(history stub) on a channel to the server; gRPC failures become one line."""
    target = server_target(args.server)
    channel = open_channel(target)
    try:
        return int(fn(_history_stub(channel)) or 0)
    except grpc.RpcError as exc:
        return _fail(describe_rpc_error(exc, target))
    finally:
        channel.close()


# ---- chat --------------------------------------------------------------------------------------

def cmd_chat(args: argparse.Namespace) -> int:
    from tokenwire.v1 import inference_pb2 as pb

    from .chat_repl import ChatOptions, ChatRepl

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    sampling = pb.SamplingParams()
    for name in ("temperature", "top_p", "top_k", "seed"):
        value = getattr(args, name)
        if value is not None:
            setattr(sampling, name, value)
    if args.max_tokens is not None and args.max_tokens < 1:
        return _fail(f"--max-tokens must be >= 1, got {args.max_tokens}", 2)
    options = ChatOptions(model=args.model or "", system=args.system or "", max_tokens=args.max_tokens or 0,
                          sampling=sampling)
    target = server_target(args.server)
    channel = open_channel(target)
    repl = ChatRepl(channel, options)
    try:
        if args.chat_id:
            repl.open_chat(args.chat_id)
        elif args.continue_last and not repl.open_last_chat():
            print("no chat to continue: starting a new one", flush=True)
        return repl.run()
    except grpc.RpcError as exc:
        return _fail(describe_rpc_error(exc, target))
    finally:
        channel.close()


# ---- history -----------------------------------------------------------------------------------

def _to_dict(message) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True)


def cmd_history_list(args: argparse.Namespace) -> int:
    from tokenwire.v1 import history_pb2 as hpb

    def run(stub) -> int:
        chats, token = [], ""
        while len(chats) < args.limit:
            reply = stub.ListChats(hpb.ListChatsRequest(page_size=min(args.limit - len(chats), 500),
                                                        page_token=token), timeout=30)
            chats += reply.chats
            token = reply.next_page_token
            if not token:
                break
        if args.json:
            print(json.dumps([_to_dict(c) for c in chats], indent=2))
            return 0
        if not chats:
            print("no chats yet: start one with `tokenwire chat`")
            return 0
        print(f"{'ID':<16}  {'UPDATED':<16}  {'MSGS':>4}  {'MODEL':<20}  TITLE")
        for c in chats:
            print(f"{c.id:<16}  {_when(c.updated_unix_ms):<16}  {c.message_count:>4}  {c.model or '-':<20}  "
                  f"{c.title or '(untitled)'}")
        if token:
            print(f"(more: --limit {args.limit * 2})")
        return 0

    return _rpc(args, run)


def _status_name(status: int) -> str:
    from tokenwire.v1 import history_pb2 as hpb

    return enum_name(hpb.MessageStatus, status)


def cmd_history_show(args: argparse.Namespace) -> int:

    def run(stub) -> int:
        reply = whole_chat(stub, args.chat_id)
        if args.json:
            print(json.dumps(_to_dict(reply), indent=2))
            return 0
        chat = reply.chat
        print(f"{chat.title or '(untitled)'}  [{chat.id}, {chat.model or 'default model'}, "
              f"started {_when(chat.created_unix_ms)}]")
        for m in reply.messages:
            status = _status_name(m.status)
            note = "" if status == "complete" else f" ({status}{': ' + m.error_message if m.error_message else ''})"
            print(f"\n--- {message_heading(m)}{note}")
            print("\n".join(message_body(m)))
        return 0

    return _rpc(args, run)


def _highlight(spans, tty: bool) -> str:
    on, off = ("\033[1m", "\033[0m") if tty else ("[", "]")
    return "".join(f"{on}{s.text}{off}" if s.highlighted else s.text for s in spans).replace("\n", " ")


def cmd_history_search(args: argparse.Namespace) -> int:
    from tokenwire.v1 import history_pb2 as hpb

    def run(stub) -> int:
        reply = stub.SearchChats(hpb.SearchChatsRequest(query=" ".join(args.query), limit=args.limit), timeout=30)
        if args.json:
            print(json.dumps([_to_dict(r) for r in reply.results], indent=2))
            return 0
        if not reply.results:
            print("no matches")
            return 0
        tty = sys.stdout.isatty()
        for r in reply.results:
            print(f"{r.chat.id}  {r.chat.title or '(untitled)'}")
            for s in r.snippets:
                print(f"    {s.role}: {_highlight(s.spans, tty)}")
        return 0

    return _rpc(args, run)


def cmd_history_delete(args: argparse.Namespace) -> int:
    from tokenwire.v1 import history_pb2 as hpb

    def run(stub) -> int:
        for chat_id in args.chat_ids:
            reply = stub.DeleteChat(hpb.DeleteChatRequest(chat_id=chat_id), timeout=30)
            print(f"deleted chat {chat_id} ({reply.deleted_messages} messages)")
        return 0

    return _rpc(args, run)


def cmd_history_rename(args: argparse.Namespace) -> int:
    from tokenwire.v1 import history_pb2 as hpb

    def run(stub) -> int:
        chat = stub.RenameChat(hpb.RenameChatRequest(chat_id=args.chat_id, title=" ".join(args.title)), timeout=30)
        print(f"{chat.id}  {chat.title}")
        return 0

    return _rpc(args, run)


def cmd_history_export(args: argparse.Namespace) -> int:
    from tokenwire.v1 import history_pb2 as hpb

    fmt = hpb.EXPORT_FORMAT_MARKDOWN if args.format in ("markdown", "md") else hpb.EXPORT_FORMAT_JSON

    def run(stub) -> int:
        chunks = stub.ExportChatStream(hpb.ExportChatRequest(chat_id=args.chat_id, format=fmt), timeout=300)
        first = next(chunks)  # the errors come before any text is written
        if args.output:
            out = Path(args.output)
            if out.is_dir():
                out = out / safe_filename(first.filename, args.chat_id, fmt == hpb.EXPORT_FORMAT_MARKDOWN)
            partial = out.with_name(out.name + ".part")
            with open(partial, "w", encoding="utf-8") as f:
                f.write(first.content)
                for chunk in chunks:
                    f.write(chunk.content)
            partial.replace(out)  # a cut stream leaves no half file under the real name
            print(f"wrote {out}", file=sys.stderr)
        else:
            sys.stdout.write(first.content)
            for chunk in chunks:
                sys.stdout.write(chunk.content)
        return 0

    return _rpc(args, run)


def safe_filename(suggested: str, chat_id: str, markdown: bool) -> str:
    """The server's suggested file name, kept only as a plain name inside the folder (a server
    must not be able to write "../../.bashrc"); else one made from the chat id."""
    name = Path(suggested.replace("\\", "/")).name
    if name in ("", ".", "..") or name.startswith(".") or any(ord(c) < 32 for c in name) or len(name) > 200:
        safe_id = "".join(c for c in chat_id if c.isalnum())[:32] or "chat"
        name = f"chat-{safe_id}.{'md' if markdown else 'json'}"
    return name


# ---- keys --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _key_ring(args: argparse.Namespace):
    """The key ring of the server's database (--database), closed after use."""
    from tokenwire.server.chats.api_keys import KeyRing
    from tokenwire.server.chats.store import ChatStore

    store = ChatStore(args.database)
    try:
        yield KeyRing(store.db), store.describe()
    finally:
        store.close()


def cmd_keys_create(args: argparse.Namespace) -> int:
    with _key_ring(args) as (keys, where):
        try:
            key, info = keys.create(args.name, admin=args.admin)
        except ValueError as exc:
            return _fail(str(exc), 2)
    print(key)
    role = "an admin key (may also load and unload models)" if info.admin else "a user key"
    print(f"({role}: key {info.id} of user {info.user}, shown this once and stored hashed in {where}. The server now "
          "asks every call for a key: `authorization: Bearer <key>`; the CLI reads --api-key or TOKENWIRE_API_KEY.)",
          file=sys.stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    with _key_ring(args) as (keys, _):
        rows = keys.list()
    if not rows:
        print("no API keys: the server serves everyone as the local user")
        return 0
    print(f"{'ID':>4}  {'USER':<20}  {'KEY':<12}  {'CREATED':<16}  STATE")
    for k in rows:
        state = f"revoked {_when(k.revoked_ms)}" if k.revoked_ms else "active" + (", admin" if k.admin else "")
        print(f"{k.id:>4}  {k.user:<20}  {k.prefix + '…':<12}  {_when(k.created_ms):<16}  {state}")
    return 0


def cmd_keys_disable(args: argparse.Namespace) -> int:
    with _key_ring(args) as (keys, _):
        forgotten = keys.disable()
    print(f"API keys are off ({forgotten} forgotten): the server serves every call as the local user")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    with _key_ring(args) as (keys, _):
        revoked = keys.revoke(args.which)
        left = keys.any_active()
    if not revoked:
        return _fail(f"no active key {args.which!r} (give a key id, its shown prefix, or a user name)")
    for k in revoked:
        print(f"revoked key {k.id} ({k.prefix}…) of {k.user}")
    if not left:
        print("no active key is left: the server refuses every call until a key is created "
              "(`tokenwire keys create NAME`) or keys are turned off (`tokenwire keys disable`)", file=sys.stderr)
    return 0


# ---- parser ------------------------------------------------------------------------------------

def _server_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=None, help="gRPC target host:port (env TOKENWIRE_SERVER)")
    p.add_argument("--api-key", default=argparse.SUPPRESS, help="API key (env TOKENWIRE_API_KEY)")


def add_chat_commands(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model; the server keeps the history")
    p.add_argument("-c", "--continue", dest="continue_last", action="store_true", help="continue your last chat")
    p.add_argument("--chat", dest="chat_id", default=None, metavar="ID", help="continue the chat with this id")
    p.add_argument("--model", "-m", default="", help="model id or alias (default: the chat's, else the server's)")
    p.add_argument("--system", default=None, help="system prompt of a new chat")
    p.add_argument("--max-tokens", "-n", type=int, default=None)
    p.add_argument("--temperature", "-t", type=float, default=None, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    _server_flag(p)
    p.set_defaults(func=cmd_chat)

    history = sub.add_parser("history", help="your stored chats: list, show, search, delete, rename, export")
    hsub = history.add_subparsers(dest="history_command", required=True, metavar="ACTION")
    p = hsub.add_parser("list", help="your chats, most recently active first")
    p.add_argument("--limit", "-n", type=int, default=20)
    p.add_argument("--json", action="store_true")
    _server_flag(p)
    p.set_defaults(func=cmd_history_list)
    p = hsub.add_parser("show", help="one chat, every message")
    p.add_argument("chat_id", metavar="ID")
    p.add_argument("--json", action="store_true")
    _server_flag(p)
    p.set_defaults(func=cmd_history_show)
    p = hsub.add_parser("search", help="chats whose messages contain all these words")
    p.add_argument("query", nargs="+")
    p.add_argument("--limit", "-n", type=int, default=20)
    p.add_argument("--json", action="store_true")
    _server_flag(p)
    p.set_defaults(func=cmd_history_search)
    p = hsub.add_parser("delete", help="delete chats for good")
    p.add_argument("chat_ids", nargs="+", metavar="ID")
    _server_flag(p)
    p.set_defaults(func=cmd_history_delete)
    p = hsub.add_parser("rename", help="set a chat's title")
    p.add_argument("chat_id", metavar="ID")
    p.add_argument("title", nargs="+")
    _server_flag(p)
    p.set_defaults(func=cmd_history_rename)
    p = hsub.add_parser("export", help="a chat as JSON or Markdown")
    p.add_argument("chat_id", metavar="ID")
    p.add_argument("--format", "-f", choices=["json", "markdown", "md"], default="json")
    p.add_argument("--output", "-o", default=None, help="file or folder to write (default: stdout)")
    _server_flag(p)
    p.set_defaults(func=cmd_history_export)

    keys = sub.add_parser("keys", help="API keys (on the server's database; with keys, every call needs one)")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    for name, func, helptext in (("create", cmd_keys_create, "print a new key for user NAME (created if new)"),
                                 ("list", cmd_keys_list, "every key, by id, user and shown prefix"),
                                 ("revoke", cmd_keys_revoke, "revoke a key (id or prefix) or all of a user's"),
                                 ("disable", cmd_keys_disable, "turn keys off: forget every key; every call is the "
                                                               "local user's again")):
        p = ksub.add_parser(name, help=helptext)
        if name == "create":
            p.add_argument("name", metavar="NAME", help="the user the key belongs to")
            p.add_argument("--admin", action="store_true",
                           help="an admin key: may also load and unload models and keep one loaded")
        elif name == "revoke":
            p.add_argument("which", metavar="ID|PREFIX|USER")
        p.add_argument("--database", default=None,
                       help="the server's chat database, path or URL (env TOKENWIRE_DATABASE)")
        p.set_defaults(func=func)
