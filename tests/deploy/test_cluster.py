"""`tokenwire cluster` end to end (the replicas issue, items 2 and 3): PostgreSQL, two server
replicas, their bridges and HAProxy as real processes. Through the front doors: a chat's turns
keep to one replica (its follow-ups hit the prefix cache), over HTTP and over gRPC; tokens arrive
spread over time (the router buffers nothing); a replica killed with SIGKILL mid-stream fails its
own stream with a clear error while a stream on the other replica finishes untouched, the chat's
next turn succeeds within seconds on the survivor with its history intact, the dead replica is
started again and rejoins, and Ctrl-C stops everything."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request

import pytest
from conftest import cli, free_port, wait_until

from tokenwire.clients.connection import open_channel
from tokenwire.v1 import history_pb2 as hpb
from tokenwire.v1 import history_pb2_grpc as hpb_grpc
from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow


def post(port: int, path: str, body: dict, timeout: float = 120) -> list[tuple[float, str, dict]]:
    """POST to the front door; (arrival time, event, data) of each SSE event (or of the JSON reply)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    if reply.getheader("Content-Type", "").startswith("application/json"):
        return [(time.monotonic(), str(reply.status), json.loads(reply.read()))]
    events, name = [], ""
    try:
        while line := reply.readline():
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((time.monotonic(), name, json.loads(line[6:])))
    except (http.client.IncompleteRead, ConnectionError):
        events.append((time.monotonic(), "cut", {}))
    finally:
        conn.close()
    return events


def served(ready_port: int) -> int:
    """Requests a replica has finished (its tokenwire_requests counter)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{ready_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return int(sum(float(v) for v in re.findall(r'^tokenwire_requests_total\{[^}]*\} (\S+)$', text, re.M)))


def router_up(stats_port: int, server: str) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{stats_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return f'haproxy_server_status{{proxy="servers_by_affinity",server="{server}",state="UP"}} 1' in text


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, models_dir):
    folder = tmp_path_factory.mktemp("cluster")
    ports = {"http": free_port(), "grpc": free_port(), "stats": free_port()}
    log = open(folder / "cluster.out", "w")  # noqa: SIM115
    proc = subprocess.Popen(cli("cluster", "--folder", str(folder), "--http-port", str(ports["http"]),
                                "--grpc-port", str(ports["grpc"]), "--stats-port", str(ports["stats"]),
                                "--drain-wait", "10", "--", "--models-dir", str(models_dir), "--drain", "5"),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: "cluster is up" in (folder / "cluster.out").read_text() or proc.poll() is not None, 150)
        assert proc.poll() is None, (folder / "cluster.out").read_text()
        state = json.loads((folder / "cluster.json").read_text())
        yield {"proc": proc, "folder": folder, "state": state, **ports}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        state_file = folder / "cluster.json"
        if state_file.exists() and json.loads(state_file.read_text())["postgres_folder"]:
            shutil.rmtree(json.loads(state_file.read_text())["postgres_folder"], ignore_errors=True)


def test_the_cluster_routes_streams_fails_over_and_stops(cluster) -> None:
    http_port, replicas = cluster["http"], cluster["state"]["replicas"]
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=10) as page:
        assert page.status == 200 and b"tokenwire" in page.read()

    # A chat's turns stay on one replica: the follow-ups reuse the cached prefix.
    chat = post(http_port, "/api/chats", {"system": "You are terse."})[0][2]
    before = [served(r["ready_port"]) for r in replicas]
    dones = []
    for text in ("Name a fruit.", "Name another.", "And a third?"):
        events = post(http_port, f"/api/chats/{chat['id']}/messages", {"content": text, "max_tokens": 4,
                                                                         "temperature": 0})
        dones.append(next(d for _, e, d in events if e == "done"))
    after = [served(r["ready_port"]) for r in replicas]
    home = [i for i in range(2) if after[i] - before[i] == 3]
    assert len(home) == 1, (before, after)
    assert all(d["usage"]["cached_prompt_tokens"] > 0 for d in dones[1:]), dones

    # gRPC through the front door: the CLI's channel names the chat, so it lands on the same replica.
    channel = open_channel(f"127.0.0.1:{cluster['grpc']}")
    inference, history = pb_grpc.InferenceStub(channel), hpb_grpc.HistoryStub(channel)
    request = pb.GenerateRequest(chat_id=chat["id"], messages=[pb.ChatMessage(role="user", content="One more.")],
                                 max_tokens=3, sampling=pb.SamplingParams(temperature=0))
    finished = list(inference.Generate(request, timeout=60))[-1].finished
    assert finished.usage.cached_prompt_tokens > 0 and served(replicas[home[0]]["ready_port"]) == after[home[0]] + 1

    # A chat that lives on the other replica.
    other = None
    for _ in range(12):
        candidate = post(http_port, "/api/chats", {})[0][2]
        counts = [served(r["ready_port"]) for r in replicas]
        post(http_port, f"/api/chats/{candidate['id']}/messages", {"content": "Hi.", "max_tokens": 1})
        if served(replicas[1 - home[0]]["ready_port"]) > counts[1 - home[0]]:
            other = candidate
            break
    assert other is not None, "twelve chats hashed to one replica"

    # Two long streams, one per replica; the home replica is killed while both run.
    results: dict[str, list] = {}
    long = {"max_tokens": 120, "ignore_eos": True, "temperature": 0}

    def stream(key: str, chat_id: str) -> None:
        results[key] = post(http_port, f"/api/chats/{chat_id}/messages", {"content": "Tell a long story.", **long})

    threads = [threading.Thread(target=stream, args=(k, c)) for k, c in (("doomed", chat["id"]), ("kept", other["id"]))]
    for t in threads:
        t.start()
    victim = replicas[home[0]]
    wait_until(lambda: _generating(victim["ready_port"]), 30)
    time.sleep(0.5)
    os.kill(victim["server_pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    next_turn = None
    while time.monotonic() - killed_at < 5 and next_turn is None:
        events = post(http_port, f"/api/chats/{chat['id']}/messages", {"content": "Still there?", "max_tokens": 2})
        next_turn = next((d for _, e, d in events if e == "done"), None)
    assert next_turn is not None, "the chat's next turn did not succeed within 5 s of the kill"
    for t in threads:
        t.join(120)

    doomed, kept = results["doomed"], results["kept"]
    assert doomed[-1][1] in ("error", "cut") and not any(e == "done" for _, e, _ in doomed), doomed[-3:]
    if doomed[-1][1] == "error":
        assert doomed[-1][2]["error"]["message"].startswith("the connection to the model server broke"), doomed[-1]
    tokens = [t for t, e, _ in kept if e == "token"]
    assert kept[-1][1] == "done" and len(tokens) == 120, "the other replica's stream is untouched"
    gaps = sorted(b - a for a, b in zip(tokens, tokens[1:], strict=False))
    assert gaps[len(gaps) // 2] > 0.005, "tokens arrive one by one as decoded, not held and sent in bunches"

    stored = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/api/chats/{chat['id']}",
                                               timeout=10).read())["messages"]
    users = [m["content"] for m in stored if m["role"] == "user"]
    assert users == ["Name a fruit.", "Name another.", "And a third?", "One more.", "Tell a long story.",
                     "Still there?"], "no committed message lost"
    assert history.GetChat(hpb.GetChatRequest(chat_id=chat["id"]), timeout=10).chat.message_count == len(stored)

    # The killed replica is started again and rejoins the ring.
    wait_until(lambda: router_up(cluster["stats"], victim["name"]), 60)
    state = json.loads((cluster["folder"] / "cluster.json").read_text())
    assert state["replicas"][home[0]]["server_pid"] != victim["server_pid"]
    channel.close()

    # Ctrl-C stops all of it.
    proc = cluster["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    pids = [state["router_pid"], *(r[k] for r in state["replicas"] for k in ("server_pid", "bridge_pid"))]
    wait_until(lambda: not any(_alive(p) for p in pids), 10)


def _generating(ready_port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{ready_port}/metrics", timeout=5) as reply:
        return "tokenwire:num_requests_running 1.0" in reply.read().decode()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
