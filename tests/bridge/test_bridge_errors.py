"""Bad requests and failures get the right HTTP status in OpenAI's error shape, and the bridge keeps serving."""

from __future__ import annotations

import json

import aiohttp
import pytest
from conftest import free_port, start_bridge
from yarl import URL

from tokenwire.bridge.app import create_app
from tokenwire.bridge.config import STATIC_DIR
from tokenwire.bridge.routes.openai_request import CHAT_FIELDS, COMPLETION_FIELDS
from tokenwire.bridge.routes.stream import GENERATE_FIELDS

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]
JSON = {"Content-Type": "application/json"}


def chat(**extra) -> bytes:
    return json.dumps({"model": "", "messages": MESSAGES, "max_tokens": 2, **extra}).encode()


# (name, path, body bytes, headers, status, param, code)
CASES = [
    ("bad json", CHAT, b'{"messages": [', JSON, 400, None, "invalid_json"),
    ("NaN is not JSON", CHAT, b'{"messages": [], "temperature": NaN}', JSON, 400, None, "invalid_json"),
    ("empty body", CHAT, b"", JSON, 400, None, "invalid_json"),
    ("array body", CHAT, b"[1, 2]", JSON, 400, None, "invalid_json"),
    ("text/plain", CHAT, chat(), {"Content-Type": "text/plain"}, 415, None, "unsupported_media_type"),
    ("form", "/api/generate", b"prompt=hi", {"Content-Type": "application/x-www-form-urlencoded"}, 415, None,
     "unsupported_media_type"),
    ("oversize", CHAT, chat(user="x" * (6 << 20)), JSON, 413, None, "request_too_large"),
    ("unknown parameter", CHAT, chat(frobnicate=1), JSON, 400, "frobnicate", "unsupported_parameter"),
    ("tools", CHAT, chat(tools=[{"type": "function", "function": {"name": "a b"}}]), JSON, 400,
     "tools[0].function.name", None),
    ("unknown response format", CHAT, chat(response_format={"type": "yaml"}), JSON, 400, "response_format.type",
     None),
    ("schema the engine cannot enforce", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "not": {}}}}), JSON, 400, "sampling.json_schema",
     "invalid_response_format"),
    ("logit_bias past the vocabulary", CHAT, chat(logit_bias={"50256": -100}), JSON, 400, "logit_bias", None),
    ("n=9", CHAT, chat(n=9), JSON, 400, "n", None),
    ("top_logprobs without logprobs", CHAT, chat(top_logprobs=3), JSON, 400, "top_logprobs", None),
    ("temperature too high", CHAT, chat(temperature=2.5), JSON, 400, "temperature", None),
    ("temperature not a number", CHAT, chat(temperature="hot"), JSON, 400, "temperature", None),
    ("top_p zero (server check)", CHAT, chat(top_p=0), JSON, 400, "top_p", None),
    ("max_tokens 0", CHAT, chat(max_tokens=0), JSON, 400, "max_tokens", None),
    ("no messages", CHAT, json.dumps({"model": ""}).encode(), JSON, 400, "messages", None),
    ("tool result without its call", CHAT, chat(messages=[{"role": "tool", "content": "x"}]), JSON, 400,
     "messages[0].tool_call_id", None),
    ("bad role (server check)", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), JSON, 400,
     "messages[0].role", None),
    ("image part without a URL", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {}}]}]), JSON, 400, "messages[0].content[0].image_url.url", None),
    ("unknown model", CHAT, chat(model="no-such-model"), JSON, 404, "model", "model_not_found"),
    ("context window", CHAT, chat(max_tokens=10**6), JSON, 400, "max_tokens", "context_length_exceeded"),
    ("echo", "/v1/completions", json.dumps({"prompt": "x", "echo": True}).encode(), JSON, 400, "echo",
     "unsupported_value"),
    ("best_of", "/v1/completions", json.dumps({"prompt": "x", "best_of": 3}).encode(), JSON, 400, "best_of",
     "unsupported_value"),
    ("suffix", "/v1/completions", json.dumps({"prompt": "x", "suffix": "!"}).encode(), JSON, 400, "suffix",
     "unsupported_value"),
    ("completion logprobs 6", "/v1/completions", json.dumps({"prompt": "x", "logprobs": 6}).encode(), JSON, 400,
     "logprobs", None),
    ("token-id prompt", "/v1/completions", json.dumps({"prompt": [1, 2, 3]}).encode(), JSON, 400, "prompt", None),
    ("native unknown model", "/api/generate", json.dumps({"prompt": "x", "model": "nope"}).encode(), JSON, 404,
     "model", "model_not_found"),
]


def check_error(body: dict, status: int) -> dict:
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error"), error
    return error


async def test_each_bad_request_gets_its_status_and_the_bridge_carries_on(bridge) -> None:
    async with aiohttp.ClientSession() as http:
        for name, path, data, headers, status, param, code in CASES:
            async with http.post(bridge.url + path, data=data, headers=headers) as resp:
                assert resp.status == status, (name, await resp.text())
                assert resp.content_type == "application/json", name
                error = check_error(await resp.json(), status)
                assert error["param"] == param, (name, error)
                assert error["code"] == code, (name, error)
            async with http.get(bridge.url + "/healthz") as resp:
                assert resp.status == 200, f"bridge unhealthy after {name}"
        # ... and still answers a good request.
        async with http.post(bridge.url + CHAT, data=chat(), headers=JSON) as resp:
            assert resp.status == 200
            assert (await resp.json())["choices"][0]["finish_reason"] in ("stop", "length")


async def test_oversize_chunked_body_without_content_length(bridge) -> None:
    async def body():
        for _ in range(112):
            yield b"x" * 65536  # 7 MiB in all (past the 6 MiB limit), no Content-Length

    async with aiohttp.ClientSession() as http:
        async with http.post(bridge.url + CHAT, data=body(), headers=JSON) as resp:
            assert resp.status == 413
            assert check_error(await resp.json(), 413)["code"] == "request_too_large"
        async with http.get(bridge.url + "/healthz") as resp:
            assert resp.status == 200


async def test_unknown_route_and_method(bridge) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(bridge.url + "/v2/nothing") as resp:
            assert resp.status == 404 and resp.content_type == "application/json"
            assert check_error(await resp.json(), 404)["code"] == "not_found"
        async with http.get(bridge.url + CHAT) as resp:
            assert resp.status == 405 and "POST" in resp.headers["Allow"]
            check_error(await resp.json(), 405)
        # No escaping the static folder.
        async with http.get(URL(bridge.url + "/static/%2e%2e/app.py", encoded=True)) as resp:
            assert resp.status == 404
        async with http.get(bridge.url + "/") as resp:  # the page is in the repository: it is served
            assert resp.status == 200 and resp.content_type == "text/html"
            assert await resp.read() == (STATIC_DIR / "index.html").read_bytes()


async def test_a_missing_page_is_a_json_404(tmp_path) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from tokenwire.bridge.config import BridgeSettings

    (tmp_path / "app.js").write_text("// no index.html beside me")
    app = create_app(f"127.0.0.1:{free_port()}", BridgeSettings(static_dir=tmp_path))
    async with TestClient(TestServer(app)) as http:
        resp = await http.get("/")
        assert resp.status == 404 and resp.content_type == "application/json"
        error = check_error(await resp.json(), 404)
        assert error["code"] == "not_found" and "index.html" in error["message"]
        resp = await http.get("/static/app.js")  # the rest of the folder is still served
        assert resp.status == 200 and await resp.text() == "// no index.html beside me"


async def test_server_down_is_503_and_the_bridge_stays_up(tmp_path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    bridge = start_bridge(tmp_path, dead)
    try:
        async with aiohttp.ClientSession() as http:
            requests = [
                ("GET", "/api/models", None),
                ("GET", "/v1/models", None),
                ("POST", "/api/generate", {"prompt": "hi"}),
                ("POST", CHAT, {"messages": MESSAGES}),
                ("POST", CHAT, {"messages": MESSAGES, "stream": True}),
                ("POST", "/v1/completions", {"prompt": "hi", "stream": True}),
            ]
            for method, path, body in requests:
                async with http.request(method, bridge.url + path, json=body) as resp:
                    assert resp.status == 503, (path, await resp.text())
                    assert resp.content_type == "application/json", path
                    error = check_error(await resp.json(), 503)
                    assert "unreachable" in error["message"] and dead in error["message"], error
            async with http.get(bridge.url + "/healthz") as resp:
                assert resp.status == 200
    finally:
        bridge.stop()
    assert "Traceback" not in bridge.log()


async def test_openapi_document_matches_the_routes(bridge) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(bridge.url + "/openapi.json") as resp:
            assert resp.status == 200
            doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    routes = {(r.resource.canonical, r.method.lower()) for r in create_app("127.0.0.1:1").router.routes()
              if r.method != "HEAD"}
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert documented == routes
    schemas = doc["components"]["schemas"]
    assert set(schemas["ChatCompletionRequest"]["properties"]) == set(CHAT_FIELDS)
    assert set(schemas["CompletionRequest"]["properties"]) == set(COMPLETION_FIELDS)
    assert set(schemas["GenerateRequest"]["properties"]) == set(GENERATE_FIELDS)
    refs = {v for v in _walk(doc) if isinstance(v, str) and v.startswith("#/components/")}
    for ref in refs:
        _, _, kind, name = ref.split("/")
        assert name in doc["components"][kind], ref


def _walk(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)
    else:
        yield node


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/generate"])
async def test_request_id_is_echoed(bridge, path) -> None:
    body = {"messages": MESSAGES, "max_tokens": 2}
    async with aiohttp.ClientSession() as http:
        async with http.post(bridge.url + path, json=body, headers={"X-Request-Id": "abc-123"}) as resp:
            assert resp.status == 200
            assert resp.headers["X-Request-Id"] == "abc-123"
            await resp.read()
