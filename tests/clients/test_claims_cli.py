"""A request's keep-alive over HTTP (`keep_alive` of /api/generate) and the CLI (`generate
--keep-alive`), and `tokenwire ps / load / unload`, against the session's server and bridge.

Each step reads the model's state afterwards (/api/models, ListModels, `ps`): 0 unloads it once
the request ends, a number sets when it expires, negative keeps it. These tests unload the
default model; the next request loads it again.
"""

from __future__ import annotations

import subprocess
import time

import aiohttp
from conftest import DEFAULT_INT4, cli

from tokenwire.v1 import inference_pb2 as pb


def run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cli(*args), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


def grpc_state(stub, model: str = DEFAULT_INT4) -> pb.ModelInfo:
    return {m.id: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models}[model]


def wait_unloaded(stub, timeout: float = 15) -> pb.ModelInfo:
    """Polls until the default model is no longer loaded (or the time is up); returns its listing."""
    deadline = time.monotonic() + timeout
    while (info := grpc_state(stub)).state == pb.MODEL_STATE_LOADED and time.monotonic() < deadline:
        time.sleep(0.05)
    return info


def expires_in(unix_ms: int) -> float:
    return unix_ms / 1000 - time.time()


async def test_keep_alive_of_api_generate_sets_the_models_timer(bridge, stub) -> None:
    async def generate(keep_alive: float) -> dict:
        body = {"prompt": "Hi", "max_tokens": 2, "ignore_eos": True, "keep_alive": keep_alive}
        async with http.post(bridge.url + "/api/generate", json=body) as resp:
            assert resp.status == 200, await resp.text()
            text = await resp.text()
        assert "event: done" in text, text
        async with http.get(bridge.url + "/api/models") as resp:
            return {m["id"]: m for m in (await resp.json())["models"]}[DEFAULT_INT4]

    async with aiohttp.ClientSession() as http:
        info = await generate(120)
        assert info["state"] == "loaded"
        assert 110 < expires_in(info["expires_unix_ms"]) < 121, "keep_alive 120: idle for 120 s, not the default 300"
        info = await generate(-1)
        assert info["state"] == "loaded" and info["expires_unix_ms"] == 0, "negative: kept until unloaded"
        await generate(0)
        assert wait_unloaded(stub).state == pb.MODEL_STATE_AVAILABLE, "keep_alive 0 unloads it once the request ends"
        async with http.get(bridge.url + "/api/models") as resp:
            info = {m["id"]: m for m in (await resp.json())["models"]}[DEFAULT_INT4]
        assert info["state"] == "available" and info["memory_bytes"] == 0 and info["expires_unix_ms"] == 0


def test_generate_keep_alive_zero_then_ps_shows_it_unloaded(server, stub) -> None:
    run("generate", "--server", server.target, "-n", "2", "--keep-alive", "0", "Hi")  # loads it, uses it
    assert wait_unloaded(stub).state == pb.MODEL_STATE_AVAILABLE, "--keep-alive 0 unloads it after the request"
    ps = run("ps", "--server", server.target).stdout
    assert not any(line.startswith(DEFAULT_INT4) for line in ps.splitlines()), ps


def test_load_and_unload_commands(server, stub) -> None:
    loaded = run("load", "smollm2-135m", "--keep-alive", "1h", "--server", server.target)
    assert loaded.stdout.startswith(f"{DEFAULT_INT4} is loaded: "), loaded.stdout
    info = grpc_state(stub)
    assert info.state == pb.MODEL_STATE_LOADED
    assert 3590 < expires_in(info.expires_unix_ms) < 3601, "load --keep-alive 1h: idle for an hour"
    unloaded = run("unload", "smollm2-135m", "--server", server.target)
    assert unloaded.stdout.startswith(f"unloaded {DEFAULT_INT4}"), unloaded.stdout
    info = grpc_state(stub)
    assert info.state == pb.MODEL_STATE_AVAILABLE and info.memory_bytes == 0, "unload answers once it is unloaded"
    again = run("unload", DEFAULT_INT4, "--server", server.target)
    assert again.stdout.strip() == f"{DEFAULT_INT4} was not loaded", again.stdout
