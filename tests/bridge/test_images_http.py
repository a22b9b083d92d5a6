"""Images over HTTP (the voice-and-image issue, item 3): an OpenAI image_url part (a data URL) with the
official SDK, Ollama's base64 images with Ollama's client, and the chats API's images, which GET
gives back with their text; remote URLs are refused (the server fetches nothing), oversize images
are 413s and corrupt ones 400s, each naming the field."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import pytest
from images_drawn import text_image
from openai import BadRequestError, OpenAI

INVOICE = ["Invoice number: 48213", "Amount due: 950 EUR"]
QUESTION = "What is the invoice number in the image? Answer with the number only."


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def post(url: str, body: dict) -> tuple[int, dict | str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            text = reply.read().decode()
            return reply.status, json.loads(text) if reply.headers.get_content_type() == "application/json" else text
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_openai_image_url_parts(bridge) -> None:
    client = OpenAI(base_url=bridge.url + "/v1", api_key="unused")
    parts = [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": data_url(text_image(INVOICE))}}]
    reply = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": parts}],
                                           max_tokens=24, temperature=0)
    assert "48213" in reply.choices[0].message.content
    cases = [
        ("https://example.com/cat.png", 400, "messages[0].content[0].image_url.url: remote image URLs are refused"),
        ("data:image/png;base64,aGVsbG8=", 400, "messages[0].images[0] is not an image that can be read"),
        ("data:image/png;base64," + "A" * (5 << 20), 413, "messages[0].content[0].image_url.url is 3.8 MiB"),
        ("data:image/png;base64," + "A" * (7 << 20), 413, "request body is "),
    ]
    for url, status, start in cases:
        code, body = post(bridge.url + "/v1/chat/completions", {
            "model": "smollm2-135m", "max_tokens": 2,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
        assert code == status and body["error"]["message"].startswith(start), (url[:40], code, body)
    with pytest.raises(BadRequestError):
        client.chat.completions.create(model="smollm2-135m", max_tokens=2, messages=[
            {"role": "system", "content": [{"type": "image_url", "image_url": {"url": data_url(text_image(["x"]))}}]},
            {"role": "user", "content": "hi"}])


def test_the_chats_api_keeps_images_with_their_text(bridge) -> None:
    code, chat = post(bridge.url + "/api/chats", {})
    png = text_image(INVOICE)
    code, _ = post(f"{bridge.url}/api/chats/{chat['id']}/messages",
                   {"content": QUESTION, "images": [data_url(png)], "max_tokens": 24, "temperature": 0})
    assert code == 200
    with urllib.request.urlopen(f"{bridge.url}/api/chats/{chat['id']}", timeout=30) as reply:
        user = json.load(reply)["messages"][0]
    assert user["content"] == QUESTION
    assert user["images"] == [{"media_type": "image/png", "text": "\n".join(INVOICE), "url": data_url(png)}]
    code, body = post(f"{bridge.url}/api/chats/{chat['id']}/messages", {"images": ["iVBORw0KGgo="]})
    assert code == 400 and body["error"]["param"] == "images[0]"
