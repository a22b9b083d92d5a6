"""DNS rebinding and cross-origin requests, attacked over real sockets: a page that rebinds its name
to 127.0.0.1 reaches the bridge and the metrics port with a foreign Host, a page on another origin
sends its Origin. Both get 403 and change nothing; the page's own requests pass; every response
carries the security headers."""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request

import aiohttp
import pytest
from conftest import cli, free_port, start_bridge, start_server

EVIL = "evil.example"
HEADERS = {"X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff"}
CSP = "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; frame-ancestors 'none'"


def local_host(url: str) -> str:
    return url.removeprefix("http://")


async def chat_count(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url + "/api/chats?limit=500") as resp:
        assert resp.status == 200
        return len((await resp.json())["chats"])


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/api/chats", {"title": "planted"}),
    ("GET", "/api/chats", None),
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
    ("GET", "/", None),
    ("GET", "/openapi.json", None),
])
async def test_a_rebound_name_is_refused_and_changes_nothing(bridge, method: str, path: str, body) -> None:
    async with aiohttp.ClientSession() as http:
        before = await chat_count(http, bridge.url)
        async with http.request(method, bridge.url + path, json=body, headers={"Host": f"{EVIL}:8000"}) as resp:
            assert resp.status == 403
            error = (await resp.json())["error"]
            assert error["code"] == "host_not_allowed" and EVIL in error["message"]
            assert resp.headers["X-Frame-Options"] == "DENY"
        assert await chat_count(http, bridge.url) == before, "a refused request must not create a chat"


async def test_a_foreign_origin_is_refused_and_the_page_itself_is_not(bridge) -> None:
    page = bridge.url  # http://127.0.0.1:PORT
    async with aiohttp.ClientSession() as http:
        before = await chat_count(http, page)
        for origin in ("http://evil.example", "null", "http://localhost:1"):
            async with http.post(page + "/api/chats", json={"title": "x"}, headers={"Origin": origin}) as resp:
                assert resp.status == 403 and (await resp.json())["error"]["code"] == "origin_not_allowed", origin
        assert await chat_count(http, page) == before
        async with http.post(page + "/api/chats", json={"title": "mine"}, headers={"Origin": page}) as resp:
            assert resp.status == 201
            chat = await resp.json()
        async with http.delete(page + f"/api/chats/{chat['id']}", headers={"Origin": page}) as resp:
            assert resp.status == 200


async def test_every_response_carries_the_security_headers(bridge) -> None:
    async with aiohttp.ClientSession() as http:
        for path in ("/", "/static/app.js", "/v1/models", "/openapi.json", "/no-such-page"):
            async with http.get(bridge.url + path) as resp:
                for name, value in HEADERS.items():
                    assert resp.headers.get(name) == value, (path, name)
                assert resp.headers.get("Content-Security-Policy") == CSP, path
        async with http.post(bridge.url + "/api/generate", json={"prompt": "Hi", "max_tokens": 2}) as resp:
            assert resp.status == 200 and resp.headers.get("Content-Security-Policy") == CSP
            await resp.read()


def test_allowed_hosts_and_origins_open_exactly_what_they_name(server, tmp_path) -> None:
    proc = start_bridge(tmp_path, server.target, "--allowed-hosts", "tokenwire.lan",
                        "--allowed-origins", "chrome-extension://*")
    try:
        def status(headers: dict[str, str]) -> int:
            request = urllib.request.Request(proc.url + "/v1/models", headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=30) as resp:
                    return resp.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert status({"Host": "tokenwire.lan"}) == 200
        assert status({"Host": EVIL}) == 403
        assert status({"Origin": "chrome-extension://abcdef"}) == 200
        assert status({"Origin": "https://evil.example"}) == 403
    finally:
        proc.stop()


def test_the_metrics_port_refuses_a_rebound_name(server) -> None:
    def get(headers: dict[str, str]) -> tuple[int, str, dict]:
        request = urllib.request.Request(server.metrics_url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return resp.status, resp.read().decode(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(), dict(exc.headers)

    code, text, headers = get({"Host": f"{EVIL}:9464"})
    assert code == 403 and "tokenwire_" not in text and headers.get("X-Content-Type-Options") == "nosniff"
    code, text, _ = get({"Host": "localhost"})
    assert code == 200 and "tokenwire_tokens_generated" in text
    assert get({"Host": "localhost", "Origin": "http://evil.example"})[0] == 403


def test_a_non_loopback_bind_needs_its_host_names_or_keys(models_dir, tmp_path) -> None:
    bridge = subprocess.run(cli("bridge", "--http-host", "0.0.0.0", "--http-port", str(free_port())),
                            capture_output=True, text=True, timeout=60)
    assert bridge.returncode != 0 and "--allowed-hosts" in bridge.stderr
    served = subprocess.run(cli("serve", "--host", "0.0.0.0", "--port", str(free_port()), "--metrics-port", "0",
                                "--models-dir", str(models_dir), "--database", str(tmp_path / "open.db")),
                            capture_output=True, text=True, timeout=60)
    assert served.returncode != 0 and "--insecure-open" in served.stderr and "keys create" in served.stderr
    proc = start_server(tmp_path, models_dir, "--host", "0.0.0.0", "--insecure-open", "--metrics-port", "0")
    try:
        import grpc

        from tokenwire.v1 import inference_pb2 as pb
        from tokenwire.v1 import inference_pb2_grpc as pb_grpc

        with grpc.insecure_channel(proc.target) as channel:
            assert pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=30).models
    finally:
        proc.stop()
