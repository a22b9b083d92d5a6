"""Chat history end to end: real servers, real SQLite files, real sockets, greedy decoding.

Servers with keys or a database of their own are started here; the session `server` (no keys,
a tmp database from conftest) serves the tests that need nothing special.
"""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import DEFAULT_INT4, cli, start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from images_drawn import text_image

from tokenwire.v1 import history_pb2 as hpb
from tokenwire.v1 import history_pb2_grpc as hpb_grpc
from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc

GREEDY = pb.SamplingParams(temperature=0)
# Checked against the default int4 model: with this system prompt, greedy decoding answers the
# question with the name from the earlier turn, and without that turn it names nobody.
SYSTEM = "You are a helpful assistant. The user will tell you their name; remember it."
INTRO = "My name is Maria."
QUESTION = "What is my name? Answer with just my name."
LONG_PROMPT = "Tell me a long story about a dragon who learns to bake bread."
PICTURE_QUESTION = "What is the invoice number in the image? Answer with the number only."


class Client:
    """History and Inference stubs on one channel, with an optional API key."""

    def __init__(self, target: str, key: str | None = None) -> None:
        self.channel = grpc.insecure_channel(target)
        self.metadata = (("authorization", f"Bearer {key}"),) if key else ()
        self.history = hpb_grpc.HistoryStub(self.channel)
        self.inference = pb_grpc.InferenceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def h(self, method: str, request):
        return getattr(self.history, method)(request, metadata=self.metadata, timeout=30)

    def new_chat(self, system: str = "", model: str = "") -> hpb.Chat:
        return self.h("CreateChat", hpb.CreateChatRequest(system_prompt=system, model=model))

    def messages(self, chat_id: str) -> list[hpb.Message]:
        return list(self.h("GetChat", hpb.GetChatRequest(chat_id=chat_id)).messages)

    def stream(self, chat_id: str, text: str | None, max_tokens: int = 24, **kw):
        messages = [pb.ChatMessage(role="user", content=text)] if text is not None else []
        request = pb.GenerateRequest(chat_id=chat_id, messages=messages, sampling=GREEDY, max_tokens=max_tokens, **kw)
        return self.inference.Generate(request, metadata=self.metadata, timeout=120)

    def turn(self, chat_id: str, text: str | None, max_tokens: int = 24, **kw) -> tuple[str, pb.ChatTurn, pb.Finished]:
        """One whole turn: (reply text, the chat event, the finished event)."""
        pieces, chat, finished, started = [], None, None, None
        for i, response in enumerate(self.stream(chat_id, text, max_tokens, **kw)):
            kind = response.WhichOneof("event")
            if kind == "started":
                assert i == 0, "the started event comes first"
                started = response.started
            elif kind == "chat":
                assert i == 1, "the chat event comes right after started"
                chat = response.chat
            elif kind == "token":
                pieces.append(response.token.text)
            elif kind == "finished":
                finished = response.finished
        assert chat is not None and finished is not None and started is not None
        assert started.model == finished.model, "started names the model that answers"
        return "".join(pieces), chat, finished


def status(message: hpb.Message) -> str:
    return hpb.MessageStatus.Name(message.status).removeprefix("MESSAGE_STATUS_").lower()


def summary(messages: list[hpb.Message]) -> list[tuple[str, str, str]]:
    return [(m.role, m.content, status(m)) for m in messages]


@pytest.fixture
def client(server):
    c = Client(server.target)
    yield c
    c.close()


# ---- persistence -------------------------------------------------------------------------------


def test_chat_survives_a_restart_and_the_next_turn_remembers(models_dir, tmp_path) -> None:
    db = tmp_path / "chats.db"
    first = start_server(tmp_path, models_dir, "--database", str(db), "--metrics-port", "0")
    try:
        c = Client(first.target)
        chat = c.new_chat(system=SYSTEM)
        reply, turn, finished = c.turn(chat.id, INTRO)
        assert reply.strip() and finished.reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
        assert turn.chat_id == chat.id and turn.dropped_messages == 0
        before = summary(c.messages(chat.id))
        # A chat with an image: the image and the text read in it are stored with the message.
        pictured = c.new_chat()
        png = text_image(["Invoice number: 48213"])
        list(c.inference.Generate(pb.GenerateRequest(
            chat_id=pictured.id, sampling=GREEDY, max_tokens=4,
            messages=[pb.ChatMessage(role="user", content=PICTURE_QUESTION, images=[pb.Image(data=png)])]), timeout=120))
        c.close()
    finally:
        first.stop()
    assert before == [("system", SYSTEM, "complete"), ("user", INTRO, "complete"),
                      ("assistant", reply, "complete" if finished.reason == pb.FINISH_REASON_STOP else "length")]

    second = start_server(tmp_path, models_dir, "--database", str(db), "--metrics-port", "0")
    try:
        c = Client(second.target)
        listed = c.h("ListChats", hpb.ListChatsRequest()).chats
        assert [x.id for x in listed] == [pictured.id, chat.id]  # newest first
        assert listed[1].title == INTRO and listed[1].model == DEFAULT_INT4 and listed[1].message_count == 3
        assert summary(c.messages(chat.id)) == before
        answer, _, finished = c.turn(chat.id, QUESTION)
        assert "Maria" in answer, answer
        assert finished.usage.prompt_tokens > 50  # the whole chat was the prompt
        # Without the earlier turn the same question gets no name: the answer came from the history.
        control = c.new_chat(system=SYSTEM)
        blind, _, _ = c.turn(control.id, QUESTION)
        assert "Maria" not in blind, blind
        stored = c.messages(chat.id)
        assert summary(stored)[-2:] == [("user", QUESTION, "complete"), ("assistant", answer, status(stored[-1]))]
        assert stored[-1].model == DEFAULT_INT4 and stored[-1].usage.completion_tokens > 0
        assert stored[-1].sampling.temperature == 0 and stored[-1].max_tokens == 24
        # The image and its text are back after the restart, and the next turn reads the stored text.
        user = c.messages(pictured.id)[0]
        assert (user.content, [(i.data, i.media_type, i.text) for i in user.images]) == \
            (PICTURE_QUESTION, [(png, "image/png", "Invoice number: 48213")])
        repeated, _, _ = c.turn(pictured.id, "Repeat the invoice number.")
        assert "48213" in repeated, repeated
        c.close()
    finally:
        second.stop()


def test_sigkill_during_a_reply_loses_no_committed_message(models_dir, tmp_path) -> None:
    db = tmp_path / "chats.db"
    proc = start_server(tmp_path, models_dir, "--database", str(db), "--metrics-port", "0")
    try:
        c = Client(proc.target)
        chat = c.new_chat(system="You are terse.")
        committed = []
        for text in ("Hello!", "Name a colour.", "Name a fruit."):
            reply, _, _ = c.turn(chat.id, text, max_tokens=4)
            committed += [("user", text), ("assistant", reply)]
        call = c.stream(chat.id, LONG_PROMPT, max_tokens=400)
        tokens = 0
        for response in call:
            if response.WhichOneof("event") == "token":
                tokens += 1
                if tokens == 5:
                    proc.proc.send_signal(signal.SIGKILL)  # mid-reply
                    break
        proc.proc.wait(10)
        c.close()
    finally:
        proc.stop()

    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = raw.execute("SELECT m.role, m.content, m.status FROM message m JOIN chat c ON c.id = m.chat_id "
                       "WHERE c.public_id = ? ORDER BY m.seq", (chat.id,)).fetchall()
    raw.close()
    assert [(r, t) for r, t, _ in rows[1:7]] == committed
    assert rows[7] == ("user", LONG_PROMPT, "complete")  # committed before generation started
    assert rows[8][0] == "assistant" and rows[8][2] == "pending"  # the reply in flight

    again = start_server(tmp_path, models_dir, "--database", str(db), "--metrics-port", "0")
    try:
        c = Client(again.target)
        messages = c.messages(chat.id)
        assert status(messages[-1]) == "interrupted" and "server stopped" in messages[-1].error_message
        # The chat goes on: the long prompt can be answered again (no new message).
        reply, turn, _ = c.turn(chat.id, None, max_tokens=3)
        assert reply and turn.user_message_id == 0
        assert [m.role for m in c.messages(chat.id)][-3:] == ["user", "assistant", "assistant"]
        c.close()
    finally:
        again.stop()


# ---- replies cut short, errors ----------------------------------------------------------------


def test_a_stopped_reply_is_saved_as_far_as_it_went(client, server) -> None:
    chat = client.new_chat()
    call = client.stream(chat.id, LONG_PROMPT, max_tokens=300)
    received, reply_id = [], 0
    for response in call:
        if response.WhichOneof("event") == "chat":
            reply_id = response.chat.reply_message_id
        if response.WhichOneof("event") == "token":
            received.append(response.token.text)
            if len(received) == 8:
                # Stopping is explicit: the call ending would only detach the reply (test_live_replies.py).
                client.h("StopReply", hpb.StopReplyRequest(chat_id=chat.id, message_id=reply_id))
                call.cancel()
                break
    reply = client.messages(chat.id)[-1]
    assert status(reply) == "stopped"
    assert reply.content.startswith("".join(received)) and 8 <= reply.usage.completion_tokens < 300
    first_prompt_tokens = reply.usage.prompt_tokens

    # A deadline that passes is the server's cancellation, not the user's.
    request_id, received = f"chat-deadline-{time.monotonic_ns()}", []
    with pytest.raises(grpc.RpcError) as err:
        for response in client.inference.Generate(pb.GenerateRequest(
                chat_id=chat.id, messages=[pb.ChatMessage(role="user", content=LONG_PROMPT)],
                sampling=GREEDY, max_tokens=1000, request_id=request_id), timeout=1.5):
            if response.WhichOneof("event") == "token":
                received.append(response.token.text)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and received
    # ...and it ends then: a 32-token generation started after the deadline (decoded in the same
    # batch, step for step) ends after it.
    probe_id = f"probe-{time.monotonic_ns()}"
    list(client.inference.Generate(pb.GenerateRequest(prompt="Count to ten:", max_tokens=32, ignore_eos=True,
                                                      sampling=GREEDY, request_id=probe_id), timeout=60))
    deadline = time.monotonic() + 10
    while status(reply := client.messages(chat.id)[-1]) == "pending" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status(reply) == "cancelled" and reply.content.startswith("".join(received))
    assert len(received) <= reply.usage.completion_tokens < 1000
    # The second turn reused the KV of the first (kept when it stopped): all of its prompt.
    assert reply.usage.cached_prompt_tokens >= first_prompt_tokens
    ends = {i: re.search(rf"request {re.escape(i)} .*generated=(\d+) .*finish=(\w+)", server.log())
            for i in (request_id, probe_id)}
    assert ends[request_id] and ends[probe_id], ends
    assert ends[request_id].group(2) == "cancelled" and int(ends[request_id].group(1)) == reply.usage.completion_tokens
    assert ends[request_id].start() < ends[probe_id].start(), "the generation went on after its deadline"


def test_chat_errors(client) -> None:
    chat = client.new_chat()
    with pytest.raises(grpc.RpcError) as err:
        client.turn("0123456789abcdef", "hi")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "chat" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # an unknown model commits nothing
        client.turn(chat.id, "hi", model="no-such-model")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-model" in err.value.details()
    assert client.messages(chat.id) == []
    with pytest.raises(grpc.RpcError) as err:  # nothing to answer
        client.turn(chat.id, None)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        client.turn(chat.id, "hi", prompt="raw text")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        client.h("RenameChat", hpb.RenameChatRequest(chat_id=chat.id, title="   "))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_history_that_no_longer_fits_drops_the_oldest_turns(client) -> None:
    chat = client.new_chat(system="You are terse.")
    client.h("AppendMessage", hpb.AppendMessageRequest(chat_id=chat.id, role="user", content="word " * 9000))
    client.h("AppendMessage", hpb.AppendMessageRequest(chat_id=chat.id, role="assistant", content="Noted."))
    reply, turn, finished = client.turn(chat.id, "Say hello.", max_tokens=4)
    assert turn.dropped_messages == 2  # the long turn went; the system prompt stayed
    assert finished.usage.prompt_tokens < 100
    stored = client.messages(chat.id)
    assert len(stored) == 5 and stored[-1].dropped_messages == 2  # nothing is deleted from the chat


# ---- concurrency -------------------------------------------------------------------------------


def test_twenty_clients_append_to_their_own_chats_at_once(server, client) -> None:
    clients, appends = 20, 10
    barrier = threading.Barrier(clients)
    errors: list[str] = []
    expected: dict[str, list[tuple[str, str]]] = {}

    def work(n: int) -> None:
        client = Client(server.target)  # a channel of its own, as separate programs have
        try:
            chat = client.new_chat()
            mine: list[tuple[str, str]] = []
            barrier.wait(30)
            for i in range(appends):
                role = "user" if i % 2 == 0 else "assistant"
                text = f"client {n} message {i}"
                client.h("AppendMessage", hpb.AppendMessageRequest(chat_id=chat.id, role=role, content=text))
                mine.append((role, text))
            question = f"client {n}: say something."
            reply, _, _ = client.turn(chat.id, question, max_tokens=2)
            mine += [("user", question), ("assistant", reply)]
            expected[chat.id] = mine
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            errors.append(f"client {n}: {exc!r}")
        finally:
            client.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len(expected) == clients
    for chat_id, mine in expected.items():
        assert [(m.role, m.content) for m in client.messages(chat_id)] == mine
    assert "database is locked" not in server.log()


# ---- users and keys ----------------------------------------------------------------------------


def create_key(db: Path, name: str) -> str:
    done = subprocess.run(cli("keys", "create", name, "--database", str(db)), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert re.fullmatch(r"tw_[A-Za-z0-9_-]{40,}", key), done.stdout
    for path in (db, db.with_name(db.name + "-wal")):  # stored hashed, never as it is
        assert not path.exists() or key.encode() not in path.read_bytes()
    return key


def test_users_never_reach_each_others_chats(models_dir, tmp_path) -> None:
    db = tmp_path / "chats.db"
    alice_key, bob_key = create_key(db, "alice"), create_key(db, "bob")
    proc = start_server(tmp_path, models_dir, "--database", str(db), "--metrics-port", "0")
    alice, bob, nobody, forger = (Client(proc.target, alice_key), Client(proc.target, bob_key),
                                  Client(proc.target), Client(proc.target, "tw_" + "x" * 43))
    try:
        # Without a valid key, nothing but health checks.
        for who in (nobody, forger):
            for call in (lambda c: c.h("ListChats", hpb.ListChatsRequest()),
                         lambda c: c.new_chat(),
                         lambda c: c.inference.ListModels(pb.ListModelsRequest(), metadata=c.metadata, timeout=30),
                         lambda c: c.turn("0123456789abcdef", "hi")):
                with pytest.raises(grpc.RpcError) as err:
                    call(who)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for service in ("", "tokenwire.v1.Inference", "tokenwire.v1.History"):
            health = health_pb2_grpc.HealthStub(nobody.channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING, service

        chat = alice.new_chat()
        assert chat.owner == "alice"
        reply, _, _ = alice.turn(chat.id, "Remember the word pineapple.", max_tokens=6)
        before = summary(alice.messages(chat.id))

        missing = "0123456789abcdef"
        attempts = {
            "get": lambda c, i: c.h("GetChat", hpb.GetChatRequest(chat_id=i)),
            "rename": lambda c, i: c.h("RenameChat", hpb.RenameChatRequest(chat_id=i, title="mine now")),
            "append": lambda c, i: c.h("AppendMessage", hpb.AppendMessageRequest(chat_id=i, role="user", content="x")),
            "continue": lambda c, i: c.turn(i, "What word?"),
            "export": lambda c, i: c.h("ExportChat", hpb.ExportChatRequest(chat_id=i)),
            "delete": lambda c, i: c.h("DeleteChat", hpb.DeleteChatRequest(chat_id=i)),
        }
        for name, attempt in attempts.items():
            with pytest.raises(grpc.RpcError) as theirs:
                attempt(bob, chat.id)
            with pytest.raises(grpc.RpcError) as nothing:
                attempt(bob, missing)
            assert theirs.value.code() == grpc.StatusCode.NOT_FOUND, name
            # Word for word what a chat that does not exist gets: nothing tells them apart.
            assert theirs.value.details() == nothing.value.details().replace(missing, chat.id), name
        assert bob.h("ListChats", hpb.ListChatsRequest()).chats == []
        assert bob.h("SearchChats", hpb.SearchChatsRequest(query="pineapple")).results == []

        # Alice's chat is as it was, and search finds it for her, highlighted.
        assert summary(alice.messages(chat.id)) == before
        results = alice.h("SearchChats", hpb.SearchChatsRequest(query="pineapple")).results
        assert [r.chat.id for r in results] == [chat.id]
        assert any(s.highlighted and s.text.lower() == "pineapple" for s in results[0].snippets[0].spans)
        mine = bob.new_chat()
        bob.h("AppendMessage", hpb.AppendMessageRequest(chat_id=mine.id, role="user", content="pineapple pie"))
        assert [r.chat.id for r in bob.h("SearchChats", hpb.SearchChatsRequest(query="pineapple")).results] == [mine.id]
        assert [c.id for c in alice.h("ListChats", hpb.ListChatsRequest()).chats] == [chat.id]

        # A revoked key stops working within the cache's few seconds.
        done = subprocess.run(cli("keys", "revoke", "bob", "--database", str(db)), capture_output=True, text=True)
        assert done.returncode == 0 and "bob" in done.stdout
        deadline = time.monotonic() + 15
        while True:
            try:
                bob.h("ListChats", hpb.ListChatsRequest())
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                break
            assert time.monotonic() < deadline, "the revoked key still works"
            time.sleep(0.5)
        alice.h("ListChats", hpb.ListChatsRequest())
    finally:
        for c in (alice, bob, nobody, forger):
            c.close()
        proc.stop()


def test_list_is_paged_newest_first_and_export_renders(client) -> None:
    made = []
    for i in range(5):
        chat = client.new_chat()
        client.h("RenameChat", hpb.RenameChatRequest(chat_id=chat.id, title=f"paging {i}"))
        made.append(chat.id)
        time.sleep(0.003)
    seen, token = [], ""
    while len(seen) < 5:
        page = client.h("ListChats", hpb.ListChatsRequest(page_size=2, page_token=token))
        assert len(page.chats) <= 2
        seen += [c.id for c in page.chats]
        token = page.next_page_token
        assert token or len(seen) >= 5
    assert seen[:5] == made[::-1]
    client.h("AppendMessage", hpb.AppendMessageRequest(chat_id=made[0], role="user", content="Hi *there*"))
    md = client.h("ExportChat", hpb.ExportChatRequest(chat_id=made[0], format=hpb.EXPORT_FORMAT_MARKDOWN))
    assert md.media_type == "text/markdown" and md.filename == f"chat-{made[0]}.md"
    assert md.content.startswith("# paging 0\n") and "## You\n\nHi *there*" in md.content
    js = client.h("ExportChat", hpb.ExportChatRequest(chat_id=made[0]))
    assert js.media_type == "application/json" and '"content": "Hi *there*"' in js.content
    deleted = client.h("DeleteChat", hpb.DeleteChatRequest(chat_id=made[0]))
    assert deleted.deleted_messages == 1
    with pytest.raises(grpc.RpcError) as err:
        client.h("GetChat", hpb.GetChatRequest(chat_id=made[0]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
