"""`tokenwire up`: one command starts the server and the bridge (with every setting, from flags
and TOKENWIRE_* variables), both answer, and stopping it stops both.

Each test starts `up` as a child on free ports, with a chat database in the test's tmp folder and
the default model store, and reads its two children from /proc.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
from conftest import DEFAULT_FP32, DEFAULT_INT4, cli, free_port

from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc


@dataclass
class Up:
    proc: subprocess.Popen
    log_path: Path
    target: str
    url: str
    children: dict[str, int]  # "serve" / "bridge" -> pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def state(pid: int) -> str:
    """The process's state letter (R, S, Z, ...), or "gone"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return "gone"


def children_of(pid: int) -> dict[str, int]:
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            for command in ("serve", "bridge"):
                if command.encode() in argv:
                    found[command] = int(entry.name)
    return found


def start_up(tmp: Path, models_dir: Path, *flags: str, env: dict | None = None) -> Up:
    port, http_port = free_port(), free_port()
    log_path = tmp / f"up-{port}.log"
    proc = subprocess.Popen(
        cli("up", "--port", str(port), "--http-port", str(http_port), "--metrics-port", "0",
            "--database", str(tmp / "chats.db"), "--models-dir", str(models_dir), *flags),
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, f"up exited early:\n{log_path.read_text()}"
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1).read()
            break
        except OSError:
            assert time.monotonic() < deadline, f"up did not answer on {url}:\n{log_path.read_text()}"
            time.sleep(0.1)
    return Up(proc, log_path, f"127.0.0.1:{port}", url, children_of(proc.pid))


def stop_leftovers(up: Up) -> None:
    if up.proc.poll() is None:
        up.proc.kill()
        up.proc.wait()
    for pid in up.children.values():
        if state(pid) not in ("gone", "Z"):
            os.kill(pid, signal.SIGKILL)


def wait_gone(pids, timeout: float = 15) -> dict[int, str]:
    """Polls until every pid has exited (or the time is up); returns each one's state."""
    deadline = time.monotonic() + timeout
    while any(state(p) not in ("gone", "Z") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return {p: state(p) for p in pids}


def http_json(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def generate_events(url: str, body: dict) -> tuple[list[dict], dict | None]:
    """/api/generate's token events and its done event; stops reading after a fourth token."""
    request = urllib.request.Request(url + "/api/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    tokens, done, event = [], None, None
    with urllib.request.urlopen(request, timeout=120) as resp:
        while done is None and len(tokens) <= 3 and (line := resp.readline()):
            text = line.decode().strip()
            if text.startswith("event:"):
                event = text.split(":", 1)[1].strip()
            elif text.startswith("data:") and event == "token":
                tokens.append(json.loads(text.split(":", 1)[1]))
            elif text.startswith("data:") and event == "done":
                done = json.loads(text.split(":", 1)[1])
    return tokens, done


def test_up_serves_the_page_and_the_api_with_flags_and_variables(models_dir, tmp_path) -> None:
    env = {
        "TOKENWIRE_DEFAULT_MAX_TOKENS": "3",  # a request without max_tokens stops at 3 tokens
        "TOKENWIRE_MAX_LOADED_MODELS": "2",
        "TOKENWIRE_KEEP_ALIVE": "1h",  # the flag --keep-alive 5m wins over it
        "TOKENWIRE_MAX_BODY_BYTES": "4096",  # a bridge setting: bigger bodies get 413
    }
    up = start_up(tmp_path, models_dir, "--keep-alive", "5m", "--memory-budget-bytes", "8G", env=env)
    try:
        assert set(up.children) == {"serve", "bridge"}, f"up runs two processes: {up.children}"
        with urllib.request.urlopen(up.url + "/", timeout=30) as resp:
            assert resp.status == 200 and resp.headers.get_content_type() == "text/html"
        status, models = http_json(up.url + "/v1/models")
        assert status == 200 and {DEFAULT_INT4, DEFAULT_FP32} <= {m["id"] for m in models["data"]}
        tokens, done = generate_events(up.url, {"prompt": "Tell me a long story.", "ignore_eos": True})
        assert len(tokens) == 3 and done is not None, (tokens, done)
        assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 3, done
        status, error = http_json(up.url + "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "x" * 5000}], "max_tokens": 1})
        assert status == 413 and error["error"]["code"] == "request_too_large", error
        with grpc.insecure_channel(up.target) as channel:
            listing = pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
        assert listing.memory_budget_bytes == 8 << 30, "--memory-budget-bytes 8G is 8 GiB"
        assert listing.max_loaded_models == 2
        int4 = {m.id: m for m in listing.models}[DEFAULT_INT4]
        assert int4.state == pb.MODEL_STATE_LOADED
        left = int4.expires_unix_ms / 1000 - time.time()
        assert 290 < left < 301, f"--keep-alive 5m (over TOKENWIRE_KEEP_ALIVE=1h): expires in {left:.0f} s"
        # Ctrl-C stops both processes, then up itself.
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(30) == 0, up.log()
        left_running = {p: s for p, s in wait_gone(up.children.values()).items() if s not in ("gone", "Z")}
        assert not left_running, f"still running after up stopped: {left_running}"
    finally:
        stop_leftovers(up)


def test_terminating_up_stops_the_server_and_the_bridge(models_dir, tmp_path) -> None:
    """SIGTERM, what `kill`, Popen.terminate() and service managers send: up must not leave its
    two children running."""
    up = start_up(tmp_path, models_dir)
    try:
        assert set(up.children) == {"serve", "bridge"}, up.children
        up.proc.terminate()
        up.proc.wait(30)
        states = wait_gone(up.children.values())
        left_running = {name: pid for name, pid in up.children.items() if states[pid] not in ("gone", "Z")}
        assert not left_running, (
            f"`tokenwire up` exited on SIGTERM (status {up.proc.returncode}) and left {left_running} running")
    finally:
        stop_leftovers(up)
