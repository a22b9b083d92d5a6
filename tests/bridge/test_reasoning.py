"""Reasoning models (the compatibility issue, item 5), on the real weights under a Qwen3-style chat
template that marks thinking with <think> and takes enable_thinking (a copy of the default model's
folder, its files linked, only the template and id its own). A regex constraint makes the model
write a thinking block and then an answer, so the split is checked on what it really wrote: the
OpenAI endpoint sends the thinking as reasoning_content (streamed as its own deltas) and the
answer as content, Ollama's as message.thinking; think false renders the template's switch; and
think true on a model that does not think is a 400."""

from __future__ import annotations

import json
import re
from pathlib import Path

import ollama
import pytest
from conftest import free_port, start_bridge, start_server
from openai import BadRequestError, OpenAI

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
SHAPE = {"type": "regex", "regex": r"<think>\n[a-z ]{4,30}\n</think>\n\n[A-Z][a-z]{2,12}\."}
ASK = [{"role": "user", "content": "Is the sky blue? Think first."}]


@pytest.fixture(scope="module")
def thinker(int4_dir: Path, models_dir: Path, tmp_path_factory):
    store = tmp_path_factory.mktemp("thinker-store")
    folder = store / "thinker_int4"
    folder.mkdir()
    for item in int4_dir.iterdir():
        if item.name not in ("chat_template.jinja", "tokenwire.json", "tokenizer_config.json"):
            (folder / item.name).symlink_to(item)
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    config = json.loads((int4_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    manifest = json.loads((int4_dir / "tokenwire.json").read_text())
    (folder / "tokenwire.json").write_text(json.dumps({**manifest, "id": "thinker:int4"}))
    for other in ("smollm2-135m_int4",):
        (store / other).symlink_to(models_dir / other)
    ollama_port = free_port()
    server = start_server(store, store)
    bridge = start_bridge(store, server.target, "--ollama-port", str(ollama_port))
    yield bridge, f"http://127.0.0.1:{ollama_port}"
    bridge.stop()
    server.stop()


def test_thinking_is_reasoning_content_and_the_answer_content(thinker) -> None:
    bridge, _ = thinker
    client = OpenAI(base_url=bridge.url + "/v1", api_key="unused")
    reply = client.chat.completions.create(model="thinker:int4", messages=ASK, max_tokens=60, temperature=0,
                                           response_format=SHAPE)
    message = reply.choices[0].message
    thinking = message.model_extra["reasoning_content"]
    assert re.fullmatch(r"[a-z ]{4,30}", thinking), thinking
    assert re.fullmatch(r"[A-Z][a-z]{2,12}\.", message.content), message.content
    chunks = list(client.chat.completions.create(model="thinker:int4", messages=ASK, max_tokens=60, temperature=0,
                                                 response_format=SHAPE, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert streamed == thinking and "".join(d.content or "" for d in deltas) == message.content
    first_reasoning = next(i for i, d in enumerate(deltas) if (d.model_extra or {}).get("reasoning_content"))
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert first_reasoning < first_content, "the thinking streams before the answer"


def test_think_false_uses_the_templates_switch(thinker) -> None:
    bridge, _ = thinker
    client = OpenAI(base_url=bridge.url + "/v1", api_key="unused")
    on = client.chat.completions.create(model="thinker:int4", messages=ASK, max_tokens=1, temperature=0)
    off = client.chat.completions.create(model="thinker:int4", messages=ASK, max_tokens=1, temperature=0,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.usage.prompt_tokens > on.usage.prompt_tokens, "the empty <think></think> is in the prompt"
    with pytest.raises(BadRequestError) as caught:
        client.chat.completions.create(model="smollm2-135m", messages=ASK, max_tokens=1, extra_body={"think": True})
    assert caught.value.body["param"] == "think"


def test_ollama_says_thinking_apart(thinker) -> None:
    from tokenwire.bridge.ollama.routes import _Piece

    _, url = thinker
    client = ollama.Client(host=url)
    assert client.chat(model="thinker:int4", messages=ASK, think=True, options={"num_predict": 2}).done
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="smollm2-135m", messages=ASK, think=True, options={"num_predict": 1})
    assert caught.value.status_code == 400 and "think" in caught.value.error
    assert client.chat(model="smollm2-135m", messages=ASK, think=False, options={"num_predict": 1}).done
    assert _Piece(chat=True).text("m", "Yes.", "it is blue")["message"] == {
        "role": "assistant", "content": "Yes.", "thinking": "it is blue"}
    assert _Piece(chat=False).text("m", "Yes.", "hm")["thinking"] == "hm"
