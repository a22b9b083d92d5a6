"""Regression tests that attack the audit's smaller findings (the Security issue, Low)."""

from __future__ import annotations

import time

import aiohttp

from tokenwire.v1 import inference_pb2 as pb


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
