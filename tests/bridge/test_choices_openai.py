"""n choices through the OpenAI SDK (the compatibility issue, item 4): n=3 answers three indexed
choices whose usage adds up, each as the same request alone with seed + i would; streamed, every
chunk names its choice and each choice ends with its own finish_reason before one [DONE]."""

from __future__ import annotations

import pytest
from openai import BadRequestError, OpenAI

ASK = [{"role": "user", "content": "Tell me a short story about a fox."}]


@pytest.fixture(scope="module")
def client(bridge) -> OpenAI:
    return OpenAI(base_url=bridge.url + "/v1", api_key="unused")


def test_three_choices_are_three_seeded_replies(client) -> None:
    reply = client.chat.completions.create(model="smollm2-135m", messages=ASK, n=3, seed=7, max_tokens=8,
                                           temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) == 3 and all(c.finish_reason == "length" for c in reply.choices)
    assert reply.usage.completion_tokens == 24
    for i, text in enumerate(texts):
        alone = client.chat.completions.create(model="smollm2-135m", messages=ASK, seed=7 + i, max_tokens=8,
                                               temperature=1.0, extra_body={"ignore_eos": True})
        assert alone.choices[0].message.content == text
        assert alone.usage.prompt_tokens == reply.usage.prompt_tokens


def test_streamed_choices_each_finish(client) -> None:
    chunks = list(client.completions.create(model="smollm2-135m", prompt="Once upon a time", n=2, max_tokens=5,
                                            temperature=1.0, seed=3, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    by_choice: dict[int, str] = {0: "", 1: ""}
    finishes = {}
    for chunk in chunks:
        for choice in chunk.choices:
            by_choice[choice.index] += choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert finishes == {0: "length", 1: "length"} and all(by_choice.values())
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices
    with pytest.raises(BadRequestError):
        client.completions.create(model="smollm2-135m", prompt="x", n=9, max_tokens=1)
