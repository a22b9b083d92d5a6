"""Regression tests that attack the audit's smaller findings (the Security issue, Low)."""

from __future__ import annotations

import base64
import subprocess
import time

import aiohttp
import grpc
import pytest
from conftest import cli, start_server

from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc


def test_a_huge_keep_alive_is_clamped_not_an_overflow(stub) -> None:
    """keep_alive 1e17 once overflowed expires_unix_ms and broke the model listing for everyone."""
    for keep in (1e17, float("inf")):
        list(stub.Generate(pb.GenerateRequest(prompt="Hi", max_tokens=1, keep_alive_s=keep), timeout=60))
        models = stub.ListModels(pb.ListModelsRequest(), timeout=30).models
        loaded = [m for m in models if m.state == pb.MODEL_STATE_LOADED and m.expires_unix_ms]
        year_ms = 366 * 24 * 3600 * 1000
        assert loaded and all(m.expires_unix_ms <= time.time() * 1000 + year_ms for m in loaded)
    list(stub.Generate(pb.GenerateRequest(prompt="Hi", max_tokens=1), timeout=60))  # back to the default


async def test_search_words_stay_out_of_the_access_log(bridge) -> None:
    word = "hushhushsecret"
    async with aiohttp.ClientSession() as http:
        async with http.get(bridge.url + f"/api/chats/search?q={word}") as resp:
            assert resp.status == 200
    deadline = time.monotonic() + 5
    while "GET /api/chats/search" not in bridge.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "GET /api/chats/search 200" in bridge.log()
    assert word not in bridge.log()


async def test_hostile_bodies_headers_and_cursors_get_clear_4xx(bridge) -> None:
    """Deeply nested JSON (was 500 with a traceback), a non-ASCII Authorization header (500 with
    grpc internals), an out-of-range page cursor (502): clear 400/401s, no exception text."""
    deep = "[" * 100_000 + "]" * 100_000
    huge = base64.urlsafe_b64encode(f"{10**30}:{10**30}".encode()).decode().rstrip("=")
    async with aiohttp.ClientSession() as http:
        async with http.post(bridge.url + "/v1/chat/completions", data=f'{{"messages": {deep}}}',
                             headers={"Content-Type": "application/json"}) as resp:
            body = await resp.json()
            assert resp.status == 400 and body["error"]["code"] == "invalid_json", body
        async with http.get(bridge.url + "/v1/models", headers={"Authorization": "Bearer clé-été"}) as resp:
            body = await resp.json()
            assert resp.status == 401 and body["error"]["code"] == "invalid_api_key", body
        async with http.get(bridge.url + f"/api/chats?cursor={huge}") as resp:
            body = await resp.json()
            assert resp.status == 400 and body["error"]["param"] == "cursor", body
        assert "Traceback" not in str(body) and "Error" not in body["error"]["message"]


def test_an_extreme_repetition_penalty_is_refused_and_no_nan_is_sent(stub) -> None:
    for penalty in (1e308, 11.0):
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(prompt="Hi", max_tokens=2, sampling=pb.SamplingParams(
                repetition_penalty=penalty)), timeout=60))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "repetition_penalty" in info.value.details()
    # The largest accepted penalty still gives finite logprobs (or none), never NaN.
    request = pb.GenerateRequest(prompt="the the the the", max_tokens=8, include_logprobs=True, ignore_eos=True,
                                 sampling=pb.SamplingParams(repetition_penalty=10.0, temperature=0.0))
    tokens = [r.token for r in stub.Generate(request, timeout=60) if r.HasField("token")]
    assert len(tokens) == 8
    assert all(t.logprob == t.logprob and t.logprob > float("-inf") for t in tokens if t.HasField("logprob"))


def test_revoking_the_last_key_locks_the_server_until_keys_are_disabled(models_dir, tmp_path) -> None:
    db = str(tmp_path / "keys.db")

    def keys(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(cli("keys", *args, "--database", db), capture_output=True, text=True, timeout=60)

    created = keys("create", "alice")
    assert created.returncode == 0
    assert keys("revoke", "alice").returncode == 0
    proc = start_server(tmp_path, models_dir, "--database", db, "--metrics-port", "0")
    try:
        with grpc.insecure_channel(proc.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.ListModels(pb.ListModelsRequest(), timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert keys("disable").returncode == 0
            deadline = time.monotonic() + 15  # the server caches "keys required" for a few seconds
            while True:
                try:
                    assert stub.ListModels(pb.ListModelsRequest(), timeout=30).models
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED and time.monotonic() < deadline
                    time.sleep(0.5)
    finally:
        proc.stop()
