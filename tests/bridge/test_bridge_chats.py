"""/api/chats over HTTP (real bridge, real server, real sockets), and API keys through the bridge:
the Authorization header reaches the server on every endpoint, OpenAI's included."""

from __future__ import annotations

import subprocess

import aiohttp
import openai
import pytest
from conftest import DEFAULT_INT4, cli, start_bridge, start_server
from test_bridge_sse import read_events

from tokenwire.bridge.app import create_app
from tokenwire.bridge.routes.chats_openapi import DOCUMENTED_FIELDS

GREEDY = {"temperature": 0, "max_tokens": 6}


async def post_message(url: str, chat_id: str, body: dict, headers: dict | None = None):
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/api/chats/{chat_id}/messages", json=body, headers=headers) as resp:
            if resp.status != 200:
                return resp.status, await resp.json()
            return resp.status, await read_events(resp)


async def call(method: str, url: str, body: dict | None = None, headers: dict | None = None):
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, json=body, headers=headers) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()


async def test_a_chat_over_http(bridge) -> None:
    status, chat = await call("POST", bridge.url + "/api/chats", {"system": "You are terse.", "model": DEFAULT_INT4})
    assert status == 201 and chat["title"] == "" and chat["message_count"] == 1 and chat["owner"] == "local"

    status, sse = await post_message(bridge.url, chat["id"], {"content": "Name a colour.", **GREEDY})
    assert status == 200 and {k.lower(): v for k, v in sse.headers.items()}["x-request-id"]
    names = [name for name, _, _ in sse.events]
    assert names[:2] == ["started", "chat"] and names[-1] == "done" and "token" in names
    assert sse.of("started")[0]["model"] == DEFAULT_INT4
    first = sse.of("chat")[0]
    assert first["chat_id"] == chat["id"] and first["dropped_messages"] == 0
    reply = "".join(t["text"] for t in sse.of("token"))
    done = sse.of("done")[0]
    assert done["model"] == DEFAULT_INT4 and done["usage"]["completion_tokens"] == len(sse.of("token"))

    status, got = await call("GET", f"{bridge.url}/api/chats/{chat['id']}")
    assert status == 200 and got["chat"]["title"] == "Name a colour." and got["chat"]["message_count"] == 3
    assert [(m["role"], m["content"]) for m in got["messages"]] == [
        ("system", "You are terse."), ("user", "Name a colour."), ("assistant", reply)]
    stored = got["messages"][-1]
    assert stored["id"] == first["reply_message_id"] and got["messages"][1]["id"] == first["user_message_id"]
    assert stored["status"] == ("complete" if done["finish_reason"] == "stop" else "length")
    assert stored["model"] == DEFAULT_INT4 and stored["usage"]["completion_tokens"] == done["usage"]["completion_tokens"]

    # The next message carries only itself; the server supplies the context.
    status, sse = await post_message(bridge.url, chat["id"], {"content": "Another one.", **GREEDY})
    assert status == 200 and sse.of("done")[0]["usage"]["prompt_tokens"] > done["usage"]["prompt_tokens"]
    # ...and the server reuses the first turn's KV for it: at least the whole first prompt.
    assert sse.of("done")[0]["usage"]["cached_prompt_tokens"] >= done["usage"]["prompt_tokens"]

    status, renamed = await call("PATCH", f"{bridge.url}/api/chats/{chat['id']}", {"title": "Colours"})
    assert status == 200 and renamed["title"] == "Colours"
    status, listed = await call("GET", bridge.url + "/api/chats?limit=1")
    assert status == 200 and [c["id"] for c in listed["chats"]] == [chat["id"]]  # the latest activity first
    if listed["next_cursor"]:  # other tests' chats follow, a page at a time
        status, more = await call("GET", bridge.url + f"/api/chats?limit=1&cursor={listed['next_cursor']}")
        assert status == 200 and len(more["chats"]) == 1 and more["chats"][0]["id"] != chat["id"]
    status, found = await call("GET", bridge.url + "/api/chats/search?q=colour")
    assert status == 200 and found["results"][0]["chat"]["id"] == chat["id"]
    spans = found["results"][0]["snippets"][0]["spans"]
    assert any(s["highlighted"] and s["text"].lower().startswith("colour") for s in spans)

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{bridge.url}/api/chats/{chat['id']}/export?format=markdown") as resp:
            assert resp.status == 200 and resp.content_type == "text/markdown"
            assert f'filename="chat-{chat["id"]}.md"' in resp.headers["Content-Disposition"]
            assert (await resp.text()).startswith("# Colours\n")

    status, deleted = await call("DELETE", f"{bridge.url}/api/chats/{chat['id']}")
    assert status == 200 and deleted == {"id": chat["id"], "deleted": True, "deleted_messages": 5}
    for method, path, body in (("GET", "", None), ("PATCH", "", {"title": "x"}), ("DELETE", "", None),
                               ("GET", "/export", None)):
        status, error = await call(method, f"{bridge.url}/api/chats/{chat['id']}{path}", body)
        assert status == 404 and error["error"]["code"] == "chat_not_found", (method, path, error)
    status, error = await post_message(bridge.url, chat["id"], {"content": "hello?"})
    assert status == 404 and error["error"]["code"] == "chat_not_found"


async def test_chat_request_errors(bridge) -> None:
    status, chat = await call("POST", bridge.url + "/api/chats", {})
    assert status == 201
    cases = [
        ({"content": "hi", "temprature": 0}, "temprature"),
        ({"content": "  "}, "content"),
        ({"content": "hi", "max_tokens": 0}, "max_tokens"),
        ({"content": "hi", "temperature": -1}, None),
        ({}, None),  # nothing to answer yet
    ]
    for body, param in cases:
        status, error = await post_message(bridge.url, chat["id"], body)
        assert status == 400, (body, error)
        if param:
            assert error["error"]["param"] == param, (body, error)
    status, error = await post_message(bridge.url, chat["id"], {"content": "hi", "model": "no-such-model"})
    assert status == 404 and error["error"]["code"] == "model_not_found"
    status, error = await call("PATCH", f"{bridge.url}/api/chats/{chat['id']}", {"title": ""})
    assert status == 400
    status, error = await call("GET", bridge.url + "/api/chats/search?q=")
    assert status == 400 and error["error"]["param"] == "q"
    status, error = await call("GET", bridge.url + "/api/chats?cursor=bogus!")
    assert status == 400


async def test_openapi_documents_the_chat_fields(bridge) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(bridge.url + "/openapi.json") as resp:
            doc = await resp.json()
    for schema, fields in DOCUMENTED_FIELDS.items():
        assert set(doc["components"]["schemas"][schema]["properties"]) == set(fields), schema
    routes = {(r.resource.canonical, r.method.lower()) for r in create_app("127.0.0.1:1").router.routes()
              if r.method != "HEAD"}
    assert {(p, m) for p, ops in doc["paths"].items() for m in ops} == routes


@pytest.fixture(scope="module")
def keyed(models_dir, tmp_path_factory):
    """A server with API keys for alice and bob, and a bridge in front of it."""
    tmp = tmp_path_factory.mktemp("keyed")
    db = tmp / "chats.db"
    keys = {}
    for name in ("alice", "bob"):
        done = subprocess.run(cli("keys", "create", name, "--database", str(db)), capture_output=True, text=True,
                              timeout=60, check=True)
        keys[name] = done.stdout.strip()
    server = start_server(tmp, models_dir, "--database", str(db), "--metrics-port", "0")
    bridge = start_bridge(tmp, server.target)
    yield bridge, keys
    bridge.stop()
    server.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_the_bridge_passes_keys_on(keyed) -> None:
    bridge, keys = keyed
    url = bridge.url
    generate = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for method, path, body in (("GET", "/api/chats", None), ("POST", "/api/chats", {}), ("GET", "/api/models", None),
                               ("POST", "/api/generate", generate), ("GET", "/v1/models", None),
                               ("POST", "/v1/chat/completions", generate)):
        for headers in (None, bearer("tw_wrong"), {"Authorization": "Basic abc"}):
            status, error = await call(method, url + path, body, headers)
            assert status == 401, (path, headers, error)
            assert error["error"]["type"] == "authentication_error"
    status, _ = await call("GET", url + "/healthz")
    assert status == 200

    alice, bob = bearer(keys["alice"]), bearer(keys["bob"])
    status, chat = await call("POST", url + "/api/chats", {}, alice)
    assert status == 201 and chat["owner"] == "alice"
    status, sse = await post_message(url, chat["id"], {"content": "The secret is pineapple.", **GREEDY}, alice)
    assert status == 200 and sse.of("done")
    for method, path, body in (("GET", "", None), ("PATCH", "", {"title": "x"}), ("GET", "/export", None),
                               ("DELETE", "", None)):
        status, error = await call(method, f"{url}/api/chats/{chat['id']}{path}", body, bob)
        assert status == 404 and error["error"]["code"] == "chat_not_found", (method, path)
    status, error = await post_message(url, chat["id"], {"content": "What is the secret?"}, bob)
    assert status == 404 and error["error"]["code"] == "chat_not_found"
    assert (await call("GET", url + "/api/chats/search?q=pineapple", None, bob))[1] == {"results": []}
    assert (await call("GET", url + "/api/chats", None, bob))[1]["chats"] == []
    status, found = await call("GET", url + "/api/chats/search?q=pineapple", None, alice)
    assert [r["chat"]["id"] for r in found["results"]] == [chat["id"]]
    status, got = await call("GET", f"{url}/api/chats/{chat['id']}", None, alice)
    assert status == 200 and len(got["messages"]) == 2

    # The OpenAI SDK's api_key is the bearer token, so it just works with a real key.
    client = openai.OpenAI(base_url=url + "/v1", api_key=keys["alice"], max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=DEFAULT_INT4, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=2, temperature=0)
    assert reply.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="tw_nope", max_retries=0).models.list()


async def test_only_the_owner_may_follow_or_stop_a_reply(keyed) -> None:
    """Another user's reply being written answers as a chat that does not exist (404), whether
    they follow it or stop it; its owner does both."""
    from test_reply_reattach import events, new_chat, start_reply

    bridge, keys = keyed
    alice, bob = bearer(keys["alice"]), bearer(keys["bob"])
    async with aiohttp.ClientSession() as http:
        chat_id = await new_chat(http, bridge.url, alice)
        before = await start_reply(http, bridge.url, chat_id, 2000, 2, alice)  # hangs up: it goes on
        path = f"{bridge.url}/api/chats/{chat_id}/messages/{before[1][2]['reply_message_id']}"
        for method, suffix in (("GET", "/events"), ("POST", "/stop")):
            async with http.request(method, path + suffix, headers=bob) as resp:
                assert resp.status == 404 and (await resp.json())["error"]["code"] == "chat_not_found"
        async with http.get(path + "/events", headers={**alice, "Last-Event-ID": str(before[-1][0])}) as resp:
            assert resp.status == 200
            more = await events(resp, 1)
            assert more[0][0] == before[-1][0] + 1
        async with http.post(path + "/stop", headers=alice) as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "stopped"
