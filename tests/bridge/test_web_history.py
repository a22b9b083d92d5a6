"""The web page's chat sidebar in headless Chromium against the session's real server and bridge:
a chat started, the page reloaded, the chat found in the sidebar and continued (greedy, so the
model's memory of the first turn shows in the tokens), then renamed, searched and deleted."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from test_web_page import (  # noqa: F401  (browser, open_page: fixtures)
    CHROMIUM,
    MODEL,
    PHONE,
    browser,
    horizontal_overflow,
    last_reply,
    open_page,
    send,
    set_generation,
    shot,
    wait_idle,
)

pytestmark = pytest.mark.skipif(not __import__("pathlib").Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing")

SYSTEM = "You are a helpful assistant. The user will tell you their name; remember it."


def stored(bridge, chat_id: str) -> dict:
    with urllib.request.urlopen(f"{bridge.url}/api/chats/{chat_id}", timeout=30) as reply:
        return json.load(reply)


def item(page, chat_id: str):
    return page.locator(f".chat-item[data-chat-id='{chat_id}']")


def test_chat_survives_a_reload_and_continues_from_the_sidebar(open_page, bridge, tmp_path):  # noqa: F811
    page = open_page()
    page.select_option("#model-select", MODEL)
    set_generation(page, max_tokens=24, temperature=0, system=SYSTEM)
    send(page, "My name is Maria.")
    wait_idle(page)
    first_reply = last_reply(page).locator(".content").inner_text()
    chat_id = page.evaluate("window.tokenwire.chatId()")
    assert chat_id and page.evaluate("location.hash") == f"#chat={chat_id}"
    item(page, chat_id).wait_for()
    assert item(page, chat_id).locator(".chat-title").inner_text() == "My name is Maria."
    assert item(page, chat_id).get_attribute("aria-current") == "true"

    # A reload keeps the open chat (its id is in the address).
    page.reload()
    page.wait_for_selector("body[data-models=ready]")
    page.wait_for_selector(".message.assistant")
    assert page.locator(".message.user .content").all_inner_texts() == ["My name is Maria."]

    # A fresh visit starts empty; the chat is in the sidebar; opening it brings the messages back.
    page.goto(bridge.url + "/")
    page.wait_for_selector("body[data-models=ready]")
    assert page.locator(".message").count() == 0 and page.evaluate("window.tokenwire.chatId()") is None
    item(page, chat_id).wait_for()
    shot(page, tmp_path, "history-sidebar")
    item(page, chat_id).locator(".chat-open").click()
    page.wait_for_selector(".message.assistant")
    assert page.locator(".system-note").inner_text() == f"System: {SYSTEM}"
    assert page.locator(".message.user .content").all_inner_texts() == ["My name is Maria."]
    assert last_reply(page).locator(".content").inner_text() == first_reply
    assert page.evaluate("window.tokenwire.chatId()") == chat_id

    # Continued: only the new message goes out, and the answer comes from the earlier turn.
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/messages") else None)
    send(page, "What is my name? Answer with just my name.")
    wait_idle(page)
    assert "Maria" in last_reply(page).locator(".content").inner_text()
    assert bodies and bodies[-1]["content"] == "What is my name? Answer with just my name."
    messages = stored(bridge, chat_id)["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert "Maria" in messages[-1]["content"]
    shot(page, tmp_path, "history-continued")

    # Rename in place.
    item(page, chat_id).locator(".chat-rename").click()
    page.fill(".chat-title-input", "Maria's chat")
    page.press(".chat-title-input", "Enter")
    page.wait_for_function(
        f"""() => document.querySelector(".chat-item[data-chat-id='{chat_id}'] .chat-title")?.textContent
             === "Maria's chat" """)
    assert stored(bridge, chat_id)["chat"]["title"] == "Maria's chat"

    # Search: the chat comes back with the word highlighted; a word in no chat finds nothing.
    page.fill("#chat-search", "maria")
    page.wait_for_selector("#history[data-loaded=search]")
    item(page, chat_id).wait_for()
    assert "maria" in [m.lower() for m in item(page, chat_id).locator("mark").all_inner_texts()]
    shot(page, tmp_path, "history-search")
    page.fill("#chat-search", "zebracornium")
    page.wait_for_selector("#chat-list-status:has-text('No chats match')")
    assert page.locator(".chat-item").count() == 0
    page.fill("#chat-search", "")
    page.wait_for_selector("#history[data-loaded=list]")

    # Delete, after a confirmation; the open chat closes with it.
    item(page, chat_id).locator(".chat-delete").click()
    item(page, chat_id).locator(".chat-confirm-delete").click()
    item(page, chat_id).wait_for(state="detached")
    assert page.evaluate("window.tokenwire.chatId()") is None and page.locator(".message").count() == 0
    with pytest.raises(urllib.error.HTTPError) as gone:
        stored(bridge, chat_id)
    assert gone.value.code == 404


def test_phone_sidebar_is_a_drawer(open_page, tmp_path):  # noqa: F811
    page = open_page(PHONE, color_scheme="dark")
    assert not page.is_visible("#chat-search")
    page.click("#history-toggle")
    page.wait_for_selector("#chat-search", state="visible")
    page.wait_for_timeout(300)  # the drawer slides in
    opened = horizontal_overflow(page)
    assert not opened["offenders"], opened
    shot(page, tmp_path, "phone-history")
    page.click("#history-close")
    page.wait_for_selector("#chat-search", state="hidden")
    closed = horizontal_overflow(page)
    assert closed["scrollWidth"] <= PHONE["width"] and not closed["offenders"], closed
