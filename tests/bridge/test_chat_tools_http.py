"""Tools on a stored chat over HTTP (POST /api/chats/{id}/messages): the call streams as `tool_call`
events (id and name, then arguments) and ends the stream with the calls in `done`; GET shows the
stored call; `tool_results` answer it in the next turn; bad results are 400s naming the field."""

from __future__ import annotations

import json
import urllib.request

from test_bridge_chats import call, post_message
from test_web_page import browser, open_page  # noqa: F401  (fixtures)

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
           "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]


async def test_a_call_streams_is_stored_and_its_result_is_answered(bridge) -> None:
    _, chat = await call("POST", bridge.url + "/api/chats", {})
    status, sse = await post_message(bridge.url, chat["id"], {
        "content": "Weather in Rome?", "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False,
        "temperature": 0, "max_tokens": 60})
    assert status == 200
    deltas = sse.of("tool_call")
    assert deltas[0]["name"] == "get_weather" and deltas[0]["id"].startswith("call_") and "arguments" not in deltas[0]
    arguments = "".join(d.get("arguments", "") for d in deltas[1:])
    done = sse.of("done")[0]
    assert done["finish_reason"] == "tool_calls"
    assert done["tool_calls"] == [{"id": deltas[0]["id"], "type": "function",
                                   "function": {"name": "get_weather", "arguments": arguments}}]
    assert set(json.loads(arguments)) == {"city"}

    _, got = await call("GET", f"{bridge.url}/api/chats/{chat['id']}")
    assert got["messages"][-1]["tool_calls"] == done["tool_calls"]

    status, sse = await post_message(bridge.url, chat["id"], {
        "tool_results": [{"tool_call_id": deltas[0]["id"], "content": "21 degrees"}], "tools": TOOLS,
        "tool_choice": "none", "temperature": 0, "max_tokens": 6})
    assert status == 200 and sse.of("done")[0]["finish_reason"] in ("stop", "length")
    _, got = await call("GET", f"{bridge.url}/api/chats/{chat['id']}")
    result = got["messages"][2]
    assert (result["role"], result["content"], result["tool_call_id"], result["name"]) == \
        ("tool", "21 degrees", deltas[0]["id"], "get_weather")
    assert result["id"] == sse.of("chat")[0]["user_message_id"]



async def test_bad_tool_results_are_refused_by_field(bridge) -> None:
    _, chat = await call("POST", bridge.url + "/api/chats", {})
    cases = [
        ({"tool_results": {"tool_call_id": "x"}}, "tool_results", "tool_results must be an array, got object"),
        ({"tool_results": [{"content": "x"}]}, "tool_results[0].tool_call_id",
         "tool_results[0].tool_call_id must be the id of a call (a string)"),
        ({"tool_results": [{"tool_call_id": "c", "content": 3}]}, "tool_results[0].content",
         "tool_results[0].content must be a string"),
        ({"tool_results": [{"tool_call_id": "c", "content": "x", "extra": 1}]}, "tool_results[0].extra",
         "tool_results[0]: unknown field 'extra'"),
        ({"tool_results": [{"tool_call_id": "call_none", "content": "x"}]}, "messages[0].tool_call_id",
         "messages[0].tool_call_id 'call_none' names no tool call of this chat"),
        ({"content": "hi", "tool_choice": "required"}, "tool_choice", "tool_choice 'required' needs tools"),
    ]
    for body, param, message in cases:
        status, error = await post_message(bridge.url, chat["id"], body)
        assert status == 400, body
        assert (error["error"]["param"], error["error"]["message"]) == (param, message)
    _, got = await call("GET", f"{bridge.url}/api/chats/{chat['id']}")
    assert got["messages"] == [], "nothing refused was stored"


def test_the_page_shows_a_call_and_its_result(bridge, open_page) -> None:  # noqa: F811
    def send(path: str, body: dict) -> bytes:
        request = urllib.request.Request(bridge.url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.read()

    chat = json.loads(send("/api/chats", {}))
    events = send(f"/api/chats/{chat['id']}/messages", {
        "content": "Weather in Oslo?", "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False,
        "temperature": 0, "max_tokens": 60}).decode()
    done = json.loads(events.split("event: done\ndata: ")[1].split("\n")[0])
    (stored_call,) = done["tool_calls"]
    send(f"/api/chats/{chat['id']}/messages", {"tool_results": [{"tool_call_id": stored_call["id"],
                                                                 "content": "<b>-3</b> degrees"}], "max_tokens": 4})
    page = open_page()
    page.goto(f"{bridge.url}/#chat={chat['id']}")
    page.reload()  # the hash alone does not load the page again
    page.wait_for_selector("[data-testid=tool-result]")
    shown = page.locator("[data-testid=tool-call]")
    assert shown.get_attribute("data-call-id") == stored_call["id"]
    assert shown.locator(".tool-name").inner_text() == "Called get_weather"
    assert json.loads(shown.locator(".tool-args").inner_text()) == json.loads(stored_call["function"]["arguments"])
    note = page.locator("[data-testid=tool-result]")
    assert note.inner_text() == "Result of get_weather\n<b>-3</b> degrees", "a result is shown as text, not HTML"
