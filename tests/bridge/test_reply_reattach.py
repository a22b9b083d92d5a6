"""A chat reply over HTTP outlives its connection (issue 17, item 4): every SSE event carries an
`id:`, GET .../messages/{id}/events with Last-Event-ID (or ?last_event_id=) replays what was
missed and goes on live, POST .../stop ends it at once. Real bridge, real server, real sockets."""

from __future__ import annotations

import json
import time

import aiohttp
from conftest import DEFAULT_INT4

STORY = "Tell me a long story about a dragon who learns to bake bread."


async def events(resp: aiohttp.ClientResponse, tokens: int | None = None) -> list[tuple[int | None, str, dict]]:
    """(id, event, data) of each event, to the end or to the `tokens`-th token."""
    out, event_id, name, data = [], None, "message", []
    while True:
        raw = await resp.content.readline()
        if not raw:
            return out
        line = raw.decode().rstrip("\n")
        if line.startswith("id:"):
            event_id = int(line[3:].strip())
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            out.append((event_id, name, json.loads("\n".join(data))))
            event_id, name, data = None, "message", []
            if tokens is not None and sum(n == "token" for _, n, _ in out) == tokens:
                return out


def text(got: list[tuple[int | None, str, dict]]) -> str:
    return "".join(d["text"] for _, n, d in got if n == "token")


async def new_chat(http: aiohttp.ClientSession, url: str, headers: dict | None = None) -> str:
    async with http.post(url + "/api/chats", json={"model": DEFAULT_INT4}, headers=headers) as resp:
        assert resp.status == 201
        return (await resp.json())["id"]


async def stored_reply(http: aiohttp.ClientSession, url: str, chat_id: str, headers: dict | None = None) -> dict:
    async with http.get(f"{url}/api/chats/{chat_id}", headers=headers) as resp:
        return (await resp.json())["messages"][-1]


async def start_reply(http: aiohttp.ClientSession, url: str, chat_id: str, max_tokens: int, tokens: int,
                      headers: dict | None = None) -> list[tuple[int | None, str, dict]]:
    """Posts a message and reads its reply to the `tokens`-th token, then hangs up."""
    body = {"content": STORY, "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}
    async with http.post(f"{url}/api/chats/{chat_id}/messages", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return await events(resp, tokens)


async def test_a_reply_survives_its_connection_and_resumes_after_last_event_id(bridge) -> None:
    url = bridge.url
    async with aiohttp.ClientSession() as http:
        chat_id = await new_chat(http, url)
        before = await start_reply(http, url, chat_id, 40, 5)  # the connection closes here
        assert [i for i, _, _ in before] == list(range(1, len(before) + 1)), "every event has its id, in order"
        assert [n for _, n, _ in before[:2]] == ["started", "chat"]
        reply_id = before[1][2]["reply_message_id"]
        assert (await stored_reply(http, url, chat_id))["status"] == "pending"

        path = f"{url}/api/chats/{chat_id}/messages/{reply_id}/events"
        async with http.get(path, headers={"Last-Event-ID": str(before[-1][0])}) as resp:
            assert resp.status == 200 and resp.content_type == "text/event-stream"
            rest = await events(resp)
        assert [i for i, _, _ in rest] == list(range(before[-1][0] + 1, before[-1][0] + 1 + len(rest)))
        assert rest[-1][1] == "done" and rest[-1][2]["finish_reason"] == "length"
        stored = await stored_reply(http, url, chat_id)
        assert stored["status"] == "length" and stored["usage"]["completion_tokens"] == 40
        assert text(before) + text(rest) == stored["content"]

        # The query parameter does the same for clients that cannot set the header.
        async with http.get(path + "?last_event_id=2") as resp:
            replay = await events(resp)
        assert replay[0][0] == 3 and replay == before[2:] + rest


async def test_stop_ends_the_reply_at_once(bridge) -> None:
    url = bridge.url
    async with aiohttp.ClientSession() as http:
        chat_id = await new_chat(http, url)
        body = {"content": STORY, "temperature": 0, "max_tokens": 2000, "ignore_eos": True}
        async with http.post(f"{url}/api/chats/{chat_id}/messages", json=body) as resp:
            before = await events(resp, 3)
            reply_id = before[1][2]["reply_message_id"]
            started = time.monotonic()
            async with http.post(f"{url}/api/chats/{chat_id}/messages/{reply_id}/stop") as stop:
                assert stop.status == 200
                stopped = await stop.json()
            assert time.monotonic() - started < 3
            rest = await events(resp)  # the open stream sees the end
        assert stopped["status"] == "stopped" and stopped["id"] == reply_id
        assert 3 <= stopped["usage"]["completion_tokens"] < 200
        assert rest[-1][1] == "done" and rest[-1][2]["finish_reason"] == "cancelled"
        assert text(before) + text(rest) == stopped["content"] == (await stored_reply(http, url, chat_id))["content"]


async def test_reply_route_errors(bridge) -> None:
    url = bridge.url
    async with aiohttp.ClientSession() as http:
        chat_id = await new_chat(http, url)
        got = await start_reply(http, url, chat_id, 2, 2)
        user_id = got[1][2]["user_message_id"]
        base = f"{url}/api/chats/{chat_id}/messages"
        for method, path, headers, status, field in [
            ("GET", f"{base}/{user_id}/events", {"Last-Event-ID": "abc"}, 400, "Last-Event-ID"),
            # a digit that int() refuses (U+00B2, the byte 0xB2 read as latin-1): a 400, not a 500
            ("GET", f"{base}/{user_id}/events", {"Last-Event-ID": "\u00b2"}, 400, "Last-Event-ID"),
            ("GET", f"{base}/%C2%B2/events", None, 400, "message_id"),
            ("GET", f"{base}/{user_id}/events?last_event_id=-1", None, 400, "last_event_id"),
            ("GET", f"{base}/x/events", None, 400, "message_id"),
            ("POST", f"{base}/0/stop", None, 400, "message_id"),
            ("GET", f"{base}/999999999/events", None, 404, "message_not_found"),
            ("POST", f"{base}/999999999/stop", None, 404, "message_not_found"),
            ("GET", f"{url}/api/chats/0123456789abcdef/messages/1/events", None, 404, "chat_not_found"),
            ("GET", f"{base}/{user_id}/events", None, 409, "reply_finished"),
        ]:
            async with http.request(method, path, headers=headers) as resp:
                error = (await resp.json())["error"]
                assert resp.status == status, (path, error)
                assert field in (error["param"], error["code"]), (path, error)
                assert error["message"]
