"""The web page and a reply that outlives its connection (issue 17, items 4 and 5), in headless
Chromium against real servers and bridges: after a reload the page follows a reply still being
written (the text so far, then the rest live); when its bridge dies mid-reply it follows the
reply again from its last event (Last-Event-ID) once the bridge is back; and a chat that outgrew
the context window says which messages the model no longer sees."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from conftest import Proc, cli, free_port
from test_web_page import (  # noqa: F401  (browser, open_page: fixtures)
    CHROMIUM,
    MODEL,
    browser,
    last_reply,
    open_page,
    send,
    set_generation,
    shot,
    wait_idle,
)

from tokenwire.v1 import history_pb2 as hpb
from tokenwire.v1 import history_pb2_grpc as hpb_grpc

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing")

STORY = "Tell me a long story about a dragon who learns to bake bread."


def stored_reply(url: str, chat_id: str) -> dict:
    with urllib.request.urlopen(f"{url}/api/chats/{chat_id}", timeout=30) as reply:
        return json.load(reply)["messages"][-1]


def reply_text(page) -> int:
    return len(last_reply(page).locator(".content").inner_text())


def wait_for_text(page, at_least: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while reply_text(page) < at_least:
        assert time.monotonic() < deadline, "the reply did not grow"
        time.sleep(0.05)


def test_the_page_follows_a_reply_again_after_a_reload(open_page, bridge, tmp_path):  # noqa: F811
    page = open_page()
    page.select_option("#model-select", MODEL)
    set_generation(page, max_tokens=300, temperature=0)  # this prompt runs to max_tokens
    send(page, STORY)
    wait_for_text(page, 40)
    chat_id = page.evaluate("window.tokenwire.chatId()")
    before = last_reply(page).locator(".content").inner_text()

    page.reload()  # the page's stream goes; the reply goes on on the server
    page.wait_for_selector("body[data-models=ready]")
    page.wait_for_selector("body[data-state=streaming] .message.assistant.streaming")
    assert page.is_visible("#stop")
    reply = last_reply(page)
    # The text so far at once, then it grows live.
    page.wait_for_function("n => document.querySelector('.message.assistant .content').innerText.length > n",
                           arg=len(before))
    assert reply.locator(".content").inner_text().startswith(before[:30])
    lengths = []
    while page.get_attribute("body", "data-state") == "streaming" and len(lengths) < 4:
        n = reply_text(page)
        if not lengths or n > lengths[-1]:
            lengths.append(n)
        time.sleep(0.05)
    assert len(lengths) >= 3, f"the reply did not grow after the reload: {lengths}"
    shot(page, tmp_path, "reattached-after-reload")
    page.click("#stop")  # Stop works on a reply followed again too
    wait_idle(page, 10_000)
    stored = stored_reply(bridge.url, chat_id)
    assert stored["status"] == "stopped" and reply.get_attribute("data-finish") == "stopped"
    assert page.evaluate("window.tokenwire.conversation()") == [
        {"role": "user", "content": STORY}, {"role": "assistant", "content": stored["content"]}]


def launch_bridge(tmp: Path, target: str, port: int) -> Proc:
    """A bridge of this test's own on `port` (killed and started again on the same port)."""
    log_path = tmp / f"bridge-{port}-{time.monotonic_ns()}.log"
    proc = subprocess.Popen(cli("bridge", "--server", target, "--http-port", str(port), "--ollama-port", "0"),
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1).read()
            return Proc(proc, log_path, url=url)
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)


def test_the_page_resumes_a_broken_stream_from_its_last_event(browser, server, tmp_path):  # noqa: F811
    port = free_port()
    own = launch_bridge(tmp_path, server.target, port)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        follows: list[str | None] = []
        page.on("request", lambda r: follows.append(r.headers.get("last-event-id")) if "/events" in r.url else None)
        page.goto(own.url + "/")
        page.wait_for_selector("body[data-models=ready]")
        page.select_option("#model-select", MODEL)
        set_generation(page, max_tokens=80, temperature=0)  # it may end while the bridge is down: still replayed
        send(page, STORY)
        wait_for_text(page, 30)
        own.proc.send_signal(signal.SIGKILL)  # the connection breaks mid-reply
        own.proc.wait(10)
        time.sleep(0.5)
        own = launch_bridge(tmp_path, server.target, port)
        wait_idle(page)
        chat_id = page.evaluate("window.tokenwire.chatId()")
        stored = stored_reply(own.url, chat_id)
        reply = last_reply(page)
        assert reply.get_attribute("data-finish") == "length" and not reply.locator(".error-box").count()
        assert follows and all(f is not None and int(f) > 2 for f in follows), follows  # after its last event
        # What the page had before the break plus what it was sent after is the stored reply.
        assert page.evaluate("window.tokenwire.conversation()")[-1] == {"role": "assistant",
                                                                      "content": stored["content"]}
    finally:
        context.close()
        own.stop()


def test_the_page_says_which_messages_the_model_no_longer_sees(open_page, bridge, server):  # noqa: F811
    history = hpb_grpc.HistoryStub(grpc.insecure_channel(server.target))
    chat = history.CreateChat(hpb.CreateChatRequest(system_prompt="You are terse.", model=MODEL), timeout=30)
    for role, content in (("user", "word " * 9000), ("assistant", "Noted.")):  # more than the window holds
        history.AppendMessage(hpb.AppendMessageRequest(chat_id=chat.id, role=role, content=content), timeout=30)
    page = open_page()
    page.goto(f"{bridge.url}/#chat={chat.id}")
    page.reload()
    page.wait_for_selector(".message.assistant")
    assert page.locator(".context-divider").count() == 0  # no turn has left anything out yet
    set_generation(page, max_tokens=4, temperature=0)
    send(page, "Say hello.")
    wait_idle(page)
    divider = page.locator(".context-divider")
    assert divider.count() == 1 and "no longer sees the 2 messages above" in divider.inner_text()
    # Right after the two messages left out, before the new turn.
    assert page.evaluate("""() => [...document.querySelector('#messages').children]
        .filter(e => e.matches('.message, .context-divider, .system-note'))
        .map(e => e.classList.contains('context-divider') ? 'divider' : e.dataset.role || 'system')""") == [
        "system", "user", "assistant", "divider", "user", "assistant"]
    page.reload()  # the stored reply says the same
    page.wait_for_selector(".context-divider")
    assert page.locator(".message.user").nth(1).evaluate("e => e.previousElementSibling.className") == \
        "context-divider"
