"""Shutdown is a drain (Security issue, 4): SIGTERM stops new calls and reports NOT_SERVING, lets
a running reply finish within --drain, and stores it whole; a second signal cancels at once and
keeps the text so far; SIGTERM to `tokenwire up` stops both its children."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from conftest import cli, free_port, start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokenwire.v1 import history_pb2 as hpb
from tokenwire.v1 import history_pb2_grpc as hpb_grpc
from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc


def start_reply(target: str, max_tokens: int):
    """A stored chat and a running reply of exactly max_tokens tokens: (channel, chat id, stream)."""
    channel = grpc.insecure_channel(target)
    chat = hpb_grpc.HistoryStub(channel).CreateChat(hpb.CreateChatRequest(title="drain"), timeout=30)
    stream = pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(
        chat_id=chat.id, messages=[pb.ChatMessage(role="user", content="Tell me a long story.")],
        max_tokens=max_tokens, ignore_eos=True, sampling=pb.SamplingParams(temperature=0)), timeout=300)
    for response in stream:  # until it streams
        if response.HasField("token"):
            break
    return channel, chat.id, stream


def reply_of(models_dir: Path, tmp_path: Path, db: str, chat_id: str) -> hpb.Message:
    server = start_server(tmp_path, models_dir, "--database", db, "--metrics-port", "0")
    try:
        with grpc.insecure_channel(server.target) as channel:
            messages = hpb_grpc.HistoryStub(channel).GetChat(hpb.GetChatRequest(chat_id=chat_id), timeout=30).messages
            return messages[-1]
    finally:
        server.stop()


def test_sigterm_drains_running_replies_and_refuses_new_calls(models_dir, tmp_path) -> None:
    db = str(tmp_path / "drain.db")
    server = start_server(tmp_path, models_dir, "--database", db, "--metrics-port", "0", "--drain", "60")
    channel, chat_id, stream = start_reply(server.target, 120)
    try:
        server.proc.send_signal(signal.SIGTERM)
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 10
        while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health still SERVING while draining"
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as refused:
            list(pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(prompt="new", max_tokens=2), timeout=30))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(stream)
        finished = rest[-1].finished
        assert finished.reason == pb.FINISH_REASON_LENGTH and finished.usage.completion_tokens == 120
        assert server.proc.wait(60) == 0
    finally:
        channel.close()
        server.stop()
    reply = reply_of(models_dir, tmp_path, db, chat_id)
    assert reply.status == hpb.MESSAGE_STATUS_LENGTH and reply.usage.completion_tokens == 120


def test_a_second_signal_stops_at_once_and_keeps_the_text(models_dir, tmp_path) -> None:
    db = str(tmp_path / "hurry.db")
    server = start_server(tmp_path, models_dir, "--database", db, "--metrics-port", "0", "--drain", "600")
    channel, chat_id, stream = start_reply(server.target, 4000)
    # A reply whose client has gone: it goes on with nobody watching, and the drain must end it too.
    detached_channel, detached_id, detached = start_reply(server.target, 4000)
    detached.cancel()
    try:
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0, "a second signal must not wait for the drain"
        with pytest.raises(grpc.RpcError):
            list(stream)
    finally:
        channel.close()
        detached_channel.close()
        server.stop()
    with sqlite3.connect(db) as raw:
        status, content = raw.execute(
            "SELECT m.status, m.content FROM message m JOIN chat c ON c.id = m.chat_id WHERE c.public_id = ? "
            "ORDER BY m.seq DESC LIMIT 1", (detached_id,)).fetchone()
    assert status == "cancelled" and content, "the detached reply was ended by the drain, its text kept"
    reply = reply_of(models_dir, tmp_path, db, chat_id)
    assert reply.status == hpb.MESSAGE_STATUS_CANCELLED and reply.content, "the text so far is kept"
    assert 0 < reply.usage.completion_tokens < 4000


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def test_sigterm_to_up_stops_both_children(models_dir, tmp_path) -> None:
    port, http_port = free_port(), free_port()
    up = subprocess.Popen(cli("up", "--port", str(port), "--http-port", str(http_port), "--metrics-port", "0",
                              "--models-dir", str(models_dir), "--database", str(tmp_path / "up.db")),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while len(children_of(up.pid)) < 2:
            assert up.poll() is None and time.monotonic() < deadline, "up did not start its children"
            time.sleep(0.2)
        import urllib.request

        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        children = children_of(up.pid)
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0
        for child in children:
            assert not os.path.exists(f"/proc/{child}") or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    finally:
        if up.poll() is None:
            up.kill()
    assert sys.executable
