"""The cluster's costs and promises, measured (make bench-cluster): a `tokenwire cluster` of two
replicas behind HAProxy on this machine.

1. Through the router vs straight to a replica, interleaved, 20 rounds each way, over gRPC (the
   front door vs the server's own port) and over HTTP (the front door's SSE vs the bridge's own):
   time to first token and decode tok/s medians, and the router's CPU time per token routed.
2. 10 chats x 5 turns through the HTTP front door: the share of follow-up turns whose prompt came
   from the prefix cache (affinity keeps a chat on its replica).
3. 16 clients chatting, one replica killed (SIGKILL) after 3 s: how each request ended, whether a
   retry fixed the failed ones, no committed message lost, and how soon new requests succeeded.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port, machine, median, table, write_json  # noqa: E402

from tokenwire.clients.connection import open_channel  # noqa: E402
from tokenwire.v1 import inference_pb2 as pb  # noqa: E402
from tokenwire.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

ROUNDS, TOKENS = 20, 32


def start_cluster(folder: Path) -> tuple[subprocess.Popen, dict]:
    ports = {"http": free_port(), "grpc": free_port(), "stats": free_port()}
    out = open(folder / "cluster.out", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "tokenwire.clients.cli", "cluster", "--folder", str(folder),
                             "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
                             "--stats-port", str(ports["stats"]), "--drain-wait", "10", "--", "--drain", "5"],
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while "cluster is up" not in (folder / "cluster.out").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((folder / "cluster.out").read_text())
        time.sleep(0.2)
    return proc, {**ports, **json.loads((folder / "cluster.json").read_text())}


def grpc_stream(target: str, prompt: str, key: str = "") -> tuple[float, float, int]:
    """(time to first token s, decode tok/s, tokens) of one greedy Generate."""
    channel = open_channel(target)
    try:
        start = time.perf_counter()
        first = last = None
        n = 0
        metadata = (("x-tokenwire-affinity", key),) if key else ()
        request = pb.GenerateRequest(prompt=prompt, max_tokens=TOKENS, ignore_eos=True,
                                     sampling=pb.SamplingParams(temperature=0))
        for event in pb_grpc.InferenceStub(channel).Generate(request, metadata=metadata, timeout=120):
            if event.WhichOneof("event") == "token":
                now = time.perf_counter()
                first = first or now
                last = now
                n += 1
        return first - start, (n - 1) / (last - first) if n > 1 and last > first else 0.0, n
    finally:
        channel.close()


def sse(port: int, path: str, body: dict, headers: dict | None = None) -> list[tuple[float, str, dict]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
    reply = conn.getresponse()
    if reply.status != 200:
        data = reply.read()
        conn.close()
        return [(time.perf_counter(), str(reply.status), json.loads(data) if data else {})]
    events, name = [], ""
    try:
        while line := reply.readline():
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((time.perf_counter(), name, json.loads(line[6:])))
    except (http.client.HTTPException, OSError):
        events.append((time.perf_counter(), "cut", {}))
    finally:
        conn.close()
    return events


def http_stream(port: int, prompt: str, key: str = "") -> tuple[float, float, int]:
    start = time.perf_counter()
    events = sse(port, "/api/generate", {"prompt": prompt, "max_tokens": TOKENS, "ignore_eos": True,
                                         "temperature": 0}, {"X-Tokenwire-Affinity": key} if key else None)
    times = [t for t, e, _ in events if e == "token"]
    if not times:
        raise RuntimeError(f"no tokens: {events[-1:]}")
    return times[0] - start, (len(times) - 1) / (times[-1] - times[0]), len(times)


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def router_vs_direct(c: dict) -> dict:
    r1 = c["replicas"][0]
    key = "bench-r1"  # a fixed key: the router sends every round to one replica, as a chat's turns go
    ways = {
        # Each way its own prompts, so that no way finds another's prompt in the prefix cache.
        "grpc direct": lambda i: grpc_stream(f"127.0.0.1:{r1['grpc_port']}", f"Round {i}: count to ten."),
        "grpc router": lambda i: grpc_stream(f"127.0.0.1:{c['grpc']}", f"Round {i}: count to nine.", key),
        "http direct": lambda i: http_stream(r1["http_port"], f"Round {i}: name ten birds."),
        "http router": lambda i: http_stream(c["http"], f"Round {i}: name nine birds.", key),
    }
    for way in ways.values():
        way(-1)  # warm: loads the model on the replicas
    samples: dict[str, list[tuple[float, float, int]]] = {w: [] for w in ways}
    router_cpu, routed = 0.0, 0
    for i in range(ROUNDS):
        for name, way in ways.items():  # interleaved: each round measures every way once
            before = cpu_s(c["router_pid"])
            samples[name].append(way(i))
            if name.endswith("router"):
                router_cpu += cpu_s(c["router_pid"]) - before
                routed += samples[name][-1][2]
    out = {name: {"ttft_ms": median([s[0] for s in v]) * 1000, "decode_tok_s": median([s[1] for s in v])}
           for name, v in samples.items()}
    out["router_cpu_us_per_token"] = router_cpu / max(1, routed) * 1e6
    return out


def affinity_hit_rate(c: dict) -> dict:
    follow_ups = hits = 0
    for i in range(10):
        chat = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{c['http']}/api/chats", data=b"{}", headers={"Content-Type": "application/json"}),
            timeout=30).read())
        for turn in range(5):
            events = sse(c["http"], f"/api/chats/{chat['id']}/messages",
                         {"content": f"Chat {i}, turn {turn}: say something short.", "max_tokens": 8,
                          "temperature": 0})
            done = next(d for _, e, d in events if e == "done")
            if turn:
                follow_ups += 1
                hits += done["usage"]["cached_prompt_tokens"] > 0
    return {"follow_up_turns": follow_ups, "prefix_cache_hits": hits, "hit_rate": hits / follow_ups}


def get_json(url: str, tries: int = 5):
    """GET with a few retries: a call that met the dying replica is answered 503 and a retry goes on."""
    for attempt in range(tries):
        try:
            return json.loads(urllib.request.urlopen(url, timeout=30).read())
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == tries - 1:
                raise
            time.sleep(0.3)
    raise AssertionError("unreachable")


def kill_under_load(c: dict) -> dict:
    outcomes: list[dict] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 12
    killed: dict[str, float] = {}

    def client(n: int) -> None:
        chat = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{c['http']}/api/chats", data=b"{}", headers={"Content-Type": "application/json"}),
            timeout=30).read())
        sent = []
        turn = 0
        while time.monotonic() < stop_at:
            text = f"Client {n}, message {turn}."
            began = time.monotonic()
            events = sse(c["http"], f"/api/chats/{chat['id']}/messages", {"content": text, "max_tokens": 16})
            last = events[-1][1] if events else "none"
            ok = last == "done"
            if any(e == "chat" for _, e, _ in events):
                sent.append(text)  # committed: the server said so before generating
            retried = None
            if not ok:
                # A careful client's retry: if the message was stored (the chat ends with it), answer it
                # again; else send it again.
                stored = get_json(f"http://127.0.0.1:{c['http']}/api/chats/{chat['id']}")["messages"]
                users = [m["content"] for m in stored if m["role"] == "user"]
                body = {"max_tokens": 16} if users and users[-1] == text else {"content": text, "max_tokens": 16}
                retry_began = time.monotonic()
                again = sse(c["http"], f"/api/chats/{chat['id']}/messages", body)
                retried = bool(again) and again[-1][1] == "done"
                if retried:
                    with lock:
                        outcomes.append({"client": n, "retry_began": retry_began})
                if "content" in body and any(e == "chat" for _, e, _ in again):
                    sent.append(text)
            with lock:
                outcomes.append({"client": n, "began": began, "ended": last, "ok": ok, "retry_ok": retried,
                                 "error": next((d for _, e, d in events if e == "error"), None)})
            turn += 1
        stored = get_json(f"http://127.0.0.1:{c['http']}/api/chats/{chat['id']}")["messages"]
        with lock:
            outcomes.append({"client": n, "lost": [t for t in sent if t not in
                                                   [m["content"] for m in stored if m["role"] == "user"]]})

    threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    time.sleep(3)
    victim = c["replicas"][0]
    os.kill(victim["server_pid"], signal.SIGKILL)
    killed["at"] = time.monotonic()
    for t in threads:
        t.join(180)
    turns = [o for o in outcomes if "ended" in o]
    failed = [o for o in turns if not o["ok"]]
    # New requests after the kill: how soon the clients that saw a failure had a request succeed.
    hit = {o["client"] for o in failed}
    successes: dict[int, list[float]] = {}
    for o in outcomes:
        if o.get("ok") or "retry_began" in o:
            successes.setdefault(o["client"], []).append(o.get("retry_began", o.get("began")))
    # For each client whose chat was on the killed replica: from the kill to its first request
    # (a retry or a new turn) that then succeeded.
    after = sorted(min(t for t in successes.get(n, []) if t > killed["at"]) - killed["at"] for n in hit
                   if any(t > killed["at"] for t in successes.get(n, [])))
    return {
        "requests": len(turns), "completed": len(turns) - len(failed), "failed": len(failed),
        "failed_then_retry_ok": sum(1 for o in failed if o["retry_ok"]),
        "failure_kinds": sorted({(o["error"] or {}).get("error", {}).get("message", o["ended"]) for o in failed}),
        "committed_messages_lost": sum(len(o["lost"]) for o in outcomes if "lost" in o),
        "clients_hit": len(hit),
        "first_success_after_kill_s": {"min": round(after[0], 2), "max": round(after[-1], 2)} if after else None,
    }


def main() -> int:
    folder = Path(tempfile.mkdtemp(prefix="tokenwire-bench-cluster-"))
    proc, c = start_cluster(folder)
    try:
        speed = router_vs_direct(c)
        hits = affinity_hit_rate(c)
        failover = kill_under_load(c)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(90)
        if c.get("postgres_folder"):
            subprocess.run(["rm", "-rf", c["postgres_folder"]], check=False)
    rows = [[name, f"{v['ttft_ms']:.1f}", f"{v['decode_tok_s']:.1f}"] for name, v in speed.items()
            if isinstance(v, dict)]
    print(table(["path (median of 20)", "TTFT ms", "decode tok/s"], rows))
    for proto in ("grpc", "http"):
        d, r = speed[f"{proto} direct"], speed[f"{proto} router"]
        print(f"{proto}: router adds {r['ttft_ms'] - d['ttft_ms']:+.1f} ms to TTFT, decode x"
              f"{r['decode_tok_s'] / d['decode_tok_s']:.3f}")
    print(f"router CPU per token routed: {speed['router_cpu_us_per_token']:.1f} us")
    print(f"affinity: {hits['prefix_cache_hits']}/{hits['follow_up_turns']} follow-up turns hit the prefix cache "
          f"({hits['hit_rate']:.0%})")
    print(f"replica killed under 16 clients: {failover['completed']}/{failover['requests']} completed, "
          f"{failover['failed']} failed ({failover['failed_then_retry_ok']} fixed by a retry: "
          f"{failover['failure_kinds']}), {failover['committed_messages_lost']} committed messages lost, first "
          f"success {failover['first_success_after_kill_s']} s after the kill")
    path = write_json("bench_cluster", {"machine": machine(), "rounds": ROUNDS, "tokens": TOKENS,
                                        "router_vs_direct": speed, "affinity": hits, "failover": failover})
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
