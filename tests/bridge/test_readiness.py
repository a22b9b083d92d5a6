"""The bridge's readiness (/readyz) means it: 200 only while its gRPC server says SERVING; 503 when
the server cannot be reached, and while it drains (SIGTERM), so a router stops sending work; /healthz
(liveness) stays 200 throughout."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request

import grpc
from conftest import free_port, start_bridge, start_server

from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_readiness_follows_the_server(models_dir, tmp_path) -> None:
    dead = start_bridge(tmp_path, f"127.0.0.1:{free_port()}")  # nothing listens there
    try:
        status, body = get(dead.url + "/readyz")
        assert status == 503 and body["server"].startswith("unreachable"), body
        assert get(dead.url + "/healthz")[0] == 200
    finally:
        dead.stop()
    server = start_server(tmp_path, models_dir, "--metrics-port", "0", "--drain", "30")
    bridge = start_bridge(tmp_path, server.target)
    try:
        assert get(bridge.url + "/readyz") == (200, {"status": "ready", "server": "SERVING"})
        with grpc.insecure_channel(server.target) as channel:  # a stream keeps the drain going
            stream = pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(
                prompt="Tell me a long story.", max_tokens=400, ignore_eos=True), timeout=120)
            next(r for r in stream if r.HasField("token"))
            server.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while (ready := get(bridge.url + "/readyz"))[0] == 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ready == (503, {"status": "not ready", "server": "NOT_SERVING"}), ready
            assert get(bridge.url + "/healthz")[0] == 200
            stream.cancel()
    finally:
        bridge.stop()
        server.stop()
