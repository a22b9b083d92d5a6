"""Images in the web page (headless Chromium against the session's server and bridge): an image
attached with the picker is previewed, goes out with the message, shows in the sent bubble, is
answered from its text, and comes back when the chat is opened again; a file that is no image is
refused in the page."""

from __future__ import annotations

import json

import pytest
from images_drawn import text_image
from test_web_page import (  # noqa: F401  (browser, open_page: fixtures)
    CHROMIUM,
    MODEL,
    browser,
    last_reply,
    open_page,
    set_generation,
    wait_idle,
)

pytestmark = pytest.mark.skipif(not __import__("pathlib").Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing")


def test_an_attached_image_is_sent_shown_answered_and_kept(open_page, bridge, tmp_path):  # noqa: F811
    png = tmp_path / "invoice.png"
    png.write_bytes(text_image(["Invoice number: 48213"]))
    (tmp_path / "notes.txt").write_text("not an image")
    page = open_page()
    page.select_option("#model-select", MODEL)
    set_generation(page, max_tokens=24, temperature=0)

    page.set_input_files("#attach-input", str(tmp_path / "notes.txt"))
    assert page.locator("[data-testid=attach-error]").inner_text() == \
        "notes.txt is not a PNG, JPEG, WebP, GIF or BMP image."
    page.set_input_files("#attach-input", str(png))
    page.wait_for_selector("[data-testid=attachment] img")

    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/messages") else None)
    page.fill("#prompt", "What is the invoice number in the image? Answer with the number only.")
    page.click("#send")
    wait_idle(page)
    assert bodies and len(bodies[-1]["images"]) == 1 and bodies[-1]["images"][0].startswith("data:image/png;base64,")
    assert page.locator("[data-testid=attachments]").is_hidden(), "sent images leave the composer"
    assert page.locator(".message.user [data-testid=message-image]").count() == 1
    assert "48213" in last_reply(page).locator(".content").inner_text()

    chat_id = page.evaluate("window.tokenwire.chatId()")
    page.reload()
    page.wait_for_selector(".message.user [data-testid=message-image]")
    shown = page.locator(".message.user [data-testid=message-image]")
    assert shown.get_attribute("src") == bodies[-1]["images"][0]
    assert shown.get_attribute("title") == "Text read in the image:\nInvoice number: 48213"
    assert chat_id
