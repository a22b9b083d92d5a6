"""The web page (bridge/static) in a real browser: Debian's chromium driven by Playwright, against
the session's real server and bridge.

Screenshots land in the test's tmp_path and in /tmp/tokenwire-shots/ for a person to look at.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

playwright_sync = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHOTS = Path("/tmp/tokenwire-shots")
DESKTOP = {"width": 1366, "height": 860}
PHONE = {"width": 390, "height": 844}
MODEL = "smollm2-135m:int4"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: `make browser` installs it")


@pytest.fixture(scope="module")
def browser():
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def open_page(browser, bridge):
    """open_page(viewport) -> a page on the bridge's web chat, models listed. Page errors fail the test."""
    contexts = []
    errors: list[str] = []

    def open_(viewport=DESKTOP, color_scheme="light"):
        context = browser.new_context(viewport=viewport, color_scheme=color_scheme)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        # Whatever the page does must pass its Content-Security-Policy (no inline styles or scripts).
        page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
        page.goto(bridge.url + "/")
        page.wait_for_selector("body[data-models=ready]")
        return page

    yield open_
    for context in contexts:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path))
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SHOTS / path.name)
    return path


def api_models(bridge) -> list[dict]:
    with urllib.request.urlopen(bridge.url + "/api/models", timeout=30) as reply:
        return json.load(reply)["models"]


def set_generation(page, *, max_tokens: int, temperature: float, system: str = "") -> None:
    page.fill("#max-tokens", str(max_tokens))
    page.dispatch_event("#max-tokens", "change")
    page.eval_on_selector(
        "#temperature",
        "(el, t) => { el.value = String(t); el.dispatchEvent(new Event('input', {bubbles: true})); }",
        temperature,
    )
    page.fill("#system-prompt", system)


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def wait_idle(page, timeout_ms: float = 60_000) -> None:
    page.wait_for_selector("body[data-state=idle] .message.assistant[data-finish]", timeout=timeout_ms)


def last_reply(page):
    return page.locator(".message.assistant").last


def horizontal_overflow(page) -> dict:
    """What sticks out past the viewport's right edge (ignoring content of scrollable boxes and
    the closed settings drawer)."""
    return page.evaluate(
        """() => {
          const width = window.innerWidth;
          const offenders = [];
          for (const el of document.body.querySelectorAll('*')) {
            const style = getComputedStyle(el);
            if (style.display === 'none' || style.visibility === 'hidden') continue;
            if (el.closest('.settings') && !document.body.classList.contains('settings-open')) continue;
            let p = el.parentElement, scrolled = false;
            while (p && p !== document.body) {
              const ox = getComputedStyle(p).overflowX;
              if (ox === 'auto' || ox === 'scroll') { scrolled = true; break; }
              p = p.parentElement;
            }
            if (scrolled) continue;
            const r = el.getBoundingClientRect();
            if (r.width > 0 && (r.right > width + 1 || r.left < -1)) offenders.push(el.tagName + '.' + el.className + ' ' + Math.round(r.left) + '..' + Math.round(r.right));
          }
          return {scrollWidth: document.documentElement.scrollWidth, bodyScrollWidth: document.body.scrollWidth,
                  width, offenders: offenders.slice(0, 10)};
        }"""
    )


# ---- tests ------------------------------------------------------------------------------------


def test_page_lists_the_servers_models(open_page, bridge, tmp_path):
    page = open_page()
    # The picker offers the models that chat: not the embedding, speech and OCR models.
    models = [m for m in api_models(bridge) if m.get("kind", "generate") == "generate"]
    options = page.eval_on_selector_all("#model-select option", "els => els.map(o => [o.value, o.textContent])")
    assert [value for value, _ in options] == [m["id"] for m in models]
    default = next(m for m in models if m["is_default"])
    assert page.input_value("#model-select") == default["id"]
    for (_, label), m in zip(options, models, strict=True):
        assert m["state"] in label  # state and size are shown in the picker
        assert re.search(r"\d+(\.\d)? (KB|MB|GB)", label), label
    info = page.inner_text("#model-info")
    assert default["id"] in info and default["precision"] in info and "Size on disk" in info
    assert page.title() == "tokenwire"
    # Static files come from the bridge, nothing from elsewhere (the machine is offline).
    assert page.evaluate("[...document.querySelectorAll('script[src],link[href]')].every(e => "
                         "(e.src || e.href).startsWith(location.origin) || (e.href || '').startsWith('data:'))")


def test_reply_streams_and_stop_cancels_it(open_page, bridge, server, tmp_path):
    page = open_page()
    page.select_option("#model-select", MODEL)
    # Greedy: this prompt runs to max_tokens (checked against the default model), so Stop matters.
    set_generation(page, max_tokens=200, temperature=0)
    request_ids: list[str] = []
    page.on("response", lambda r: request_ids.append(r.headers.get("x-request-id", ""))
            if r.url.endswith("/messages") else None)

    send(page, "Tell me a long story about a dragon who learns to bake bread.")
    page.wait_for_selector("body[data-state=streaming]")
    assert page.is_visible("#stop") and not page.is_visible("#send")
    reply = last_reply(page)

    # The text grows in steps while it streams, not in one jump at the end.
    lengths: list[int] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        n = len(reply.locator(".content").inner_text())
        if n and (not lengths or n != lengths[-1]):
            lengths.append(n)
        if len(lengths) >= 5 and "tok/s" in page.inner_text("#stats"):
            break
        time.sleep(0.05)
    assert len(lengths) >= 5, f"reply did not grow in steps: {lengths}"
    assert lengths == sorted(lengths)
    live = page.inner_text("#stats")
    assert live.startswith("streaming") and "first token" in live and "tok/s" in live, live
    assert page.get_attribute("#stats", "data-source") == "client"
    shot(page, tmp_path, "desktop-streaming")

    assert page.get_attribute("body", "data-state") == "streaming", "the reply ended before Stop"
    page.click("#stop")
    page.wait_for_selector("body[data-state=idle]", timeout=5_000)
    assert page.is_visible("#send") and not page.is_visible("#stop")
    assert reply.get_attribute("data-finish") == "stopped"
    assert page.get_attribute("#stats", "data-finish") == "stopped"
    assert page.inner_text("#stats").startswith("stopped")
    assert "stopped" in reply.locator(".meta").inner_text()
    stopped_text = reply.locator(".content").inner_text()
    time.sleep(1.0)
    assert reply.locator(".content").inner_text() == stopped_text, "the reply kept growing after Stop"

    # The server saw the cancellation: its log line for this request ends with finish=cancelled,
    # well short of max_tokens.
    assert request_ids and request_ids[0], "the bridge sent no X-Request-Id"
    pattern = re.compile(rf"request {re.escape(request_ids[0])} .*generated=(\d+) .*finish=cancelled")
    deadline = time.monotonic() + 10
    while not (match := pattern.search(server.log())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert match, f"no cancelled log line for request {request_ids[0]}:\n{server.log()[-2000:]}"
    assert int(match.group(1)) < 200
    # The partial reply stays in the conversation.
    assert page.evaluate("window.tokenwire.conversation().map(m => m.role)") == ["user", "assistant"]
    shot(page, tmp_path, "desktop-stopped")


def test_follow_up_sends_the_conversation(open_page, bridge, tmp_path):
    page = open_page()
    set_generation(page, max_tokens=12, temperature=0, system="You are a terse assistant.")
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/messages") else None)

    send(page, "What is the capital of France?")
    wait_idle(page)
    first = last_reply(page)
    assert first.get_attribute("data-finish") in ("stop", "length")
    first_text = page.evaluate("window.tokenwire.conversation()[1].content")
    assert first_text.strip()
    # At the end, the server's usage replaces the live client-side figures.
    assert page.get_attribute("#stats", "data-source") == "server"
    assert re.search(r"first token \d+ ms · [\d.]+ tok/s · \d+ tokens · \d+ prompt", page.inner_text("#stats"))

    send(page, "And of Italy?")
    wait_idle(page)
    assert page.locator(".message.assistant").count() == 2
    assert len(bodies) == 2
    assert bodies[0]["model"] == MODEL and bodies[0]["max_tokens"] == 12 and bodies[0]["temperature"] == 0
    # The page sends only the new message; the server holds the conversation and adds the reply.
    assert bodies[1]["content"] == "And of Italy?" and "messages" not in bodies[1]
    chat_id = page.evaluate("window.tokenwire.chatId()")
    with urllib.request.urlopen(f"{bridge.url}/api/chats/{chat_id}", timeout=30) as reply:
        stored = json.load(reply)["messages"]
    assert [(m["role"], m["content"]) for m in stored[:4]] == [
        ("system", "You are a terse assistant."),
        ("user", "What is the capital of France?"),
        ("assistant", first_text),
        ("user", "And of Italy?"),
    ]
    assert [m["role"] for m in stored] == ["system", "user", "assistant", "user", "assistant"]
    # Shift+Enter makes a new line instead of sending.
    page.fill("#prompt", "line one")
    page.press("#prompt", "Shift+Enter")
    page.keyboard.type("line two")
    assert page.input_value("#prompt") == "line one\nline two"
    assert page.locator(".message.user").count() == 2


INJECTIONS = [
    '<img src=x onerror="window.__pwned=1">',
    "<script>window.__pwned=2</script>",
    '<a href="javascript:window.__pwned=3">x</a>',
    "[click me](javascript:window.__pwned=4)",
    '[ok](https://example.com/" onmouseover="window.__pwned=5)',
    '`<b>code</b>` **<i>bold</i>** <svg onload="window.__pwned=6">',
    "```html\n<iframe src=javascript:window.__pwned=7></iframe>\n```",
]
ALLOWED_TAGS = {"P", "BR", "H1", "H2", "H3", "H4", "H5", "H6", "STRONG", "EM", "DEL", "CODE", "PRE", "UL", "OL",
                "LI", "A", "BLOCKQUOTE", "HR", "DIV", "SPAN", "BUTTON", "TABLE", "THEAD", "TBODY", "TR", "TH", "TD"}


def fake_stream(*tokens: str) -> str:
    events = [": heartbeat\n\n", 'event: queued\ndata: {"position":1}\n\n']
    for i, text in enumerate(tokens):
        events.append(f"event: token\ndata: {json.dumps({'text': text, 'token_id': i, 'index': i})}\n\n")
    usage = {"prompt_tokens": 5, "completion_tokens": len(tokens), "time_to_first_token_ms": 12.0,
             "decode_tokens_per_second": 50.0, "total_time_ms": 40.0, "queue_time_ms": 0.5}
    events.append(f"event: done\ndata: {json.dumps({'finish_reason': 'stop', 'usage': usage, 'model': MODEL})}\n\n")
    return "".join(events)


def test_html_in_messages_and_replies_is_inert(open_page, tmp_path):
    page = open_page()
    payload = "\n\n".join(INJECTIONS)

    # The renderer on its own: only its own tags, no event handlers, http(s) links only.
    for source in [*INJECTIONS, payload]:
        report = page.evaluate(
            """(src) => {
              const t = document.createElement('template');
              t.innerHTML = window.tokenwire.renderMarkdown(src);
              const els = [...t.content.querySelectorAll('*')];
              return {tags: els.map(e => e.tagName),
                      attrs: els.flatMap(e => [...e.attributes].map(a => a.name + '=' + a.value)),
                      text: t.content.textContent};
            }""",
            source,
        )
        assert set(report["tags"]) <= ALLOWED_TAGS, (source, report)
        assert not [a for a in report["attrs"] if a.lower().startswith("on")], (source, report)
        assert all(a.startswith("href=https://") for a in report["attrs"] if a.startswith("href")), (source, report)
        assert "javascript:" not in " ".join(a for a in report["attrs"] if a.startswith("href"))

    # A model reply made of hostile tokens (split across events, as a tokenizer would), served by
    # a stubbed /api/chats/{id}/messages; the user's own message carries the same payload.
    hostile = ["<im", 'g src=x onerror="window.__pwned=1">', " <scr", "ipt>window.__pwned=2</script> ",
               "[x](javascript:window.__pwned=4) **bold**"]
    page.route("**/api/chats/*/messages", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=fake_stream(*hostile)))
    send(page, payload)
    wait_idle(page)
    page.wait_for_timeout(300)  # give any injected handler a chance to run
    assert page.evaluate("window.__pwned") is None
    user = page.locator(".message.user").last
    assert user.locator(".content").inner_text() == payload  # shown as typed
    reply = last_reply(page).locator(".content")
    assert "<img src=x" in reply.inner_text() and "<script>" in reply.inner_text()
    assert reply.locator("strong").inner_text() == "bold"
    assert page.locator("#messages img, #messages script, #messages iframe, #messages svg").count() == 0
    assert page.locator("#messages a[href^='javascript']").count() == 0
    assert page.get_attribute("#stats", "data-finish") == "stop"

    # A non-2xx answer's JSON error message is shown, and the prompt comes back for a retry.
    page.unroute("**/api/chats/*/messages")
    page.eval_on_selector("#model-select", "s => { s.add(new Option('no-such-model', 'no-such-model')); "
                          "s.value = 'no-such-model'; }")
    send(page, "hello?")
    wait_idle(page)
    failed = last_reply(page)
    assert failed.get_attribute("data-finish") == "error"
    assert "no-such-model" in failed.locator(".error-box").inner_text()
    assert page.get_attribute("#stats", "data-finish") == "error"
    assert page.input_value("#prompt") == "hello?"
    shot(page, tmp_path, "desktop-injection-and-error")


def test_phone_layout_has_no_horizontal_overflow(open_page, tmp_path):
    page = open_page(PHONE, color_scheme="dark")
    empty = horizontal_overflow(page)
    assert empty["scrollWidth"] <= PHONE["width"] and not empty["offenders"], empty
    shot(page, tmp_path, "phone-empty")

    page.click("#settings-toggle")
    page.wait_for_selector("#settings", state="visible")
    set_generation(page, max_tokens=40, temperature=0)
    page.click("#settings-close")
    send(page, "Write a python function that adds two numbers, in a code block.")
    wait_idle(page)
    assert last_reply(page).locator(".content").inner_text().strip()
    after = horizontal_overflow(page)
    assert after["scrollWidth"] <= PHONE["width"] and not after["offenders"], after
    shot(page, tmp_path, "phone-chat")

    page.click("#settings-toggle")
    page.wait_for_timeout(300)  # the drawer slides in
    opened = horizontal_overflow(page)
    assert not opened["offenders"], opened
    shot(page, tmp_path, "phone-settings")


def test_table_alignment_survives_the_content_security_policy(open_page):
    """The bridge forbids inline styles (CSP); aligned Markdown columns still align (by class)."""
    page = open_page()
    table = "| left | centre | right |\n|:--|:-:|--:|\n| 1 | 2 | 3 |\n"
    page.route("**/api/chats/*/messages", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=fake_stream(table)))
    send(page, "A table, please.")
    wait_idle(page)
    reply = last_reply(page).locator(".content")
    aligns = [cell.evaluate("e => getComputedStyle(e).textAlign") for cell in reply.locator("td").all()]
    assert aligns == ["left", "center", "right"]
    assert reply.locator("[style]").count() == 0
