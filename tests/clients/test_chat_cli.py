"""`tokenwire chat` driven in a real terminal (pexpect's pty), and the `tokenwire history` commands,
against the session server (greedy decoding, small max tokens)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import grpc
import pytest
from conftest import DEFAULT_FP32, cli

from tokenwire.v1 import history_pb2 as hpb
from tokenwire.v1 import history_pb2_grpc as hpb_grpc

pexpect = pytest.importorskip("pexpect")

SYSTEM = "You are a helpful assistant. The user will tell you their name; remember it."
PROMPT = ">>> "


def spawn(*args: str):
    command = cli(*args)
    env = {**os.environ, "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    child = pexpect.spawn(command[0], command[1:], env=env, encoding="utf-8", timeout=90, dimensions=(40, 200))
    child.logfile_read = sys.stdout  # shown by pytest when a test fails
    return child


def history(server) -> hpb_grpc.HistoryStub:
    return hpb_grpc.HistoryStub(grpc.insecure_channel(server.target))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), capture_output=True, text=True, timeout=60)


def test_chat_repl_streams_remembers_stops_and_continues(server) -> None:
    child = spawn("chat", "--server", server.target, "-t", "0", "-n", "200", "--system", SYSTEM)
    child.expect("tokenwire chat with")
    child.expect_exact(PROMPT)
    child.sendline("My name is Maria.")
    child.expect_exact(PROMPT)
    child.sendline("What is my name? Answer with just my name.")
    child.expect("Maria")
    child.expect_exact(PROMPT)

    # Ctrl-C while a long reply streams: the reply stops, the REPL stays.
    child.sendline("Tell me a long story about a dragon who learns to bake bread.")
    child.expect_exact("bake bread.\r\n")  # the terminal's echo of the line
    child.expect(r"\w+ \w+ \w+ \w+ \w+ \w+")  # words of the reply are arriving
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(PROMPT)

    child.sendline("/history")
    child.expect(r"\* ([0-9a-f]{16})\s+7 msgs\s+My name is Maria\.")
    chat_id = child.match.group(1)
    child.expect_exact(PROMPT)
    child.sendline(f"/model {DEFAULT_FP32}")
    child.expect_exact(f"model: {DEFAULT_FP32}")
    child.expect_exact(PROMPT)
    child.sendline("/nonsense")
    child.expect("unknown command")
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    stub = history(server)
    deadline = time.monotonic() + 10
    while (messages := stub.GetChat(hpb.GetChatRequest(chat_id=chat_id)).messages)[-1].status == \
            hpb.MESSAGE_STATUS_PENDING and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [m.role for m in messages] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert "Maria" in messages[4].content
    assert messages[-1].status == hpb.MESSAGE_STATUS_STOPPED and messages[-1].content
    assert 0 < messages[-1].usage.completion_tokens < 200

    # -c continues the last chat: its context comes along.
    child = spawn("chat", "-c", "--server", server.target, "-t", "0", "-n", "24")
    child.expect_exact(f"continuing chat {chat_id}")
    child.expect_exact(PROMPT)
    child.sendline("/model")
    child.expect_exact("model: smollm2-135m:int4")
    child.expect_exact(PROMPT)
    child.sendline("Thanks!")
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert len(stub.GetChat(hpb.GetChatRequest(chat_id=chat_id)).messages) == 9

    # --chat ID picks a given chat; an unknown one is a one-line error.
    child = spawn("chat", "--chat", "0123456789abcdef", "--server", server.target)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1 and "NOT_FOUND" in child.before


def test_history_commands(server, tmp_path) -> None:
    stub = history(server)
    chat = stub.CreateChat(hpb.CreateChatRequest(title="Sourdough notes"))
    stub.AppendMessage(hpb.AppendMessageRequest(chat_id=chat.id, role="user", content="How long do I proof rye?"))
    stub.AppendMessage(hpb.AppendMessageRequest(chat_id=chat.id, role="assistant", content="Proof rye for 2 hours."))

    listed = run("history", "list", "--server", server.target)
    assert listed.returncode == 0 and chat.id in listed.stdout and "Sourdough notes" in listed.stdout
    as_json = json.loads(run("history", "list", "--json", "-n", "3", "--server", server.target).stdout)
    assert as_json[0]["id"] == chat.id and len(as_json) <= 3

    shown = run("history", "show", chat.id, "--server", server.target)
    assert shown.returncode == 0
    assert "--- user\nHow long do I proof rye?" in shown.stdout and "--- assistant\nProof rye" in shown.stdout

    found = run("history", "search", "rye", "--server", server.target)
    assert found.returncode == 0 and chat.id in found.stdout and "[rye]" in found.stdout
    assert run("history", "search", "zebracorn", "--server", server.target).stdout.strip() == "no matches"

    out = tmp_path / "export"
    out.mkdir()
    exported = run("history", "export", chat.id, "-f", "markdown", "-o", str(out), "--server", server.target)
    assert exported.returncode == 0
    assert (out / f"chat-{chat.id}.md").read_text().startswith("# Sourdough notes\n")
    doc = json.loads(run("history", "export", chat.id, "--server", server.target).stdout)
    assert [m["content"] for m in doc["messages"]] == ["How long do I proof rye?", "Proof rye for 2 hours."]

    renamed = run("history", "rename", chat.id, "Rye", "bread", "--server", server.target)
    assert renamed.returncode == 0 and "Rye bread" in renamed.stdout

    deleted = run("history", "delete", chat.id, "--server", server.target)
    assert deleted.returncode == 0 and f"deleted chat {chat.id} (2 messages)" in deleted.stdout
    again = run("history", "show", chat.id, "--server", server.target)
    assert again.returncode == 1 and again.stderr.startswith("tokenwire: NOT_FOUND") and "\n" == again.stderr[-1]
    assert again.stderr.count("\n") == 1  # one line, no traceback


def test_cli_sends_the_api_key(models_dir, tmp_path) -> None:
    from conftest import start_server

    db = tmp_path / "chats.db"
    made = run("keys", "create", "carol", "--database", str(db))
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    proc = start_server(tmp_path, models_dir, "--database", str(db), "--metrics-port", "0")
    try:
        refused = run("history", "list", "--server", proc.target)
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr and "--api-key" in refused.stderr
        assert "UNAUTHENTICATED" in run("models", "--server", proc.target).stderr
        allowed = run("history", "list", "--server", proc.target, "--api-key", key)
        assert allowed.returncode == 0 and "no chats yet" in allowed.stdout
        env_key = subprocess.run(cli("models", "--server", proc.target), capture_output=True, text=True, timeout=60,
                                 env={**os.environ, "TOKENWIRE_API_KEY": key})
        assert env_key.returncode == 0 and "smollm2" in env_key.stdout
        keys = run("keys", "list", "--database", str(db))
        assert "carol" in keys.stdout and key[:10] in keys.stdout and key not in keys.stdout
    finally:
        proc.stop()


def test_chat_c_shows_a_reply_still_being_written_and_ctrl_c_stops_it(server) -> None:
    from tokenwire.v1 import inference_pb2 as pb
    from tokenwire.v1 import inference_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(server.target)
    stub, inference = hpb_grpc.HistoryStub(channel), pb_grpc.InferenceStub(channel)
    chat = stub.CreateChat(hpb.CreateChatRequest(title="still writing"))
    call = inference.Generate(pb.GenerateRequest(
        chat_id=chat.id, messages=[pb.ChatMessage(role="user", content="Tell me a long story about a dragon.")],
        max_tokens=2000, ignore_eos=True, sampling=pb.SamplingParams(temperature=0)), timeout=120)
    before = ""
    for response in call:
        before += response.token.text
        if len(before) > 40:
            break
    call.cancel()  # this client leaves; the server goes on writing the reply

    child = spawn("chat", "-c", "--server", server.target)
    child.expect_exact(f"continuing chat {chat.id}")
    child.expect_exact("model (still writing; Ctrl-C stops it):\r\n")
    child.expect_exact(before.replace("\n", "\r\n"))  # the text so far, from its start...
    printed = child.before + child.after
    child.expect(r"\w+ \w+ \w+ \w+ \w+ \w+")  # ...then more of it, live
    printed += child.before + child.after
    child.sendintr()
    child.expect_exact("[stopped]")
    printed += child.before
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    reply = stub.GetChat(hpb.GetChatRequest(chat_id=chat.id)).messages[-1]
    assert reply.status == hpb.MESSAGE_STATUS_STOPPED and 10 < reply.usage.completion_tokens < 2000
    # What it printed (the terminal echoes the ^C) is the stored reply as far as it went.
    shown = printed.replace("\r\n", "\n").rstrip().removesuffix("^C").rstrip()
    assert len(shown) > len(before) and reply.content.startswith(shown), (shown[-80:], reply.content[-80:])
    channel.close()


def test_chat_says_which_messages_the_model_no_longer_sees(server) -> None:
    stub = history(server)
    chat = stub.CreateChat(hpb.CreateChatRequest(title="outgrown", system_prompt="You are terse."))
    for role, content in (("user", "word " * 9000), ("assistant", "Noted.")):  # more than the window holds
        stub.AppendMessage(hpb.AppendMessageRequest(chat_id=chat.id, role=role, content=content))
    child = spawn("chat", "--chat", chat.id, "--server", server.target, "-t", "0", "-n", "4")
    child.expect_exact(PROMPT)
    child.sendline("Say hello.")
    # The turn's prompt left the two oldest messages out; the line names them by their first words.
    child.expect_exact("[the model no longer sees the 2 oldest messages of this chat (“word word word word word "
                       "word word word …” to “Noted.”): it outgrew the context window]")
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    # Opened again, the chat says it before the prompt.
    child = spawn("chat", "--chat", chat.id, "--server", server.target)
    child.expect_exact("[the model no longer sees the 2 oldest messages")
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
