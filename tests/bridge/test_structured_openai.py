"""Structured outputs through the OpenAI SDK (the compatibility issue, item 2): a strict json_schema
with nested objects, arrays and enums validates on 5 prompts (streamed and not), json_object parses,
the SDK's own `parse` with a pydantic model round-trips, the extensions (regex, choice) match, a
completion takes response_format too, and a schema the engine cannot enforce is a 400 naming it."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from openai import BadRequestError, OpenAI
from pydantic import BaseModel

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 30},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "genres": {"type": "array", "items": {"enum": ["drama", "comedy", "horror", "scifi"]},
                   "minItems": 1, "maxItems": 2},
        "director": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30}},
                     "required": ["name"], "additionalProperties": False},
    },
    "required": ["title", "year", "genres", "director"],
    "additionalProperties": False,
}
PROMPTS = ["Recommend a film.", "Describe a movie from the 1990s.", "A science-fiction film, as JSON.",
           "Tell me about a comedy.", "What is a good horror film?"]


@pytest.fixture(scope="module")
def client(bridge) -> OpenAI:
    return OpenAI(base_url=bridge.url + "/v1", api_key="unused")


def strict(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "film", "schema": schema, "strict": True}}


def test_a_strict_schema_holds_on_five_prompts(client) -> None:
    for i, prompt in enumerate(PROMPTS):
        kwargs = dict(model="smollm2-135m", messages=[{"role": "user", "content": prompt}], max_tokens=300,
                      response_format=strict(SCHEMA), temperature=0.7 if i % 2 else 0, seed=i)
        if i < 3:
            reply = client.chat.completions.create(**kwargs)
            text, reason = reply.choices[0].message.content, reply.choices[0].finish_reason
        else:
            chunks = list(client.chat.completions.create(**kwargs, stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        assert reason == "stop", (prompt, text)
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_and_the_sdks_parse(client) -> None:
    reply = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "A cat, as JSON"}],
                                           response_format={"type": "json_object"}, max_tokens=300, temperature=0,
                                           extra_body={"repetition_penalty": 1.3})  # a 135M model loops without it
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)

    class Pet(BaseModel):
        name: str
        legs: int
        indoor: bool

    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    parsed = parse(model="smollm2-135m", messages=[{"role": "user", "content": "Invent a pet."}],
                   response_format=Pet, max_tokens=300, temperature=0, extra_body={"repetition_penalty": 1.3})
    pet = parsed.choices[0].message.parsed
    assert isinstance(pet, Pet) and isinstance(pet.legs, int)


def test_extensions_and_completions(client) -> None:
    reply = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "A date?"}],
                                           response_format={"type": "regex", "regex": r"20\d\d-[01]\d-[0-3]\d"},
                                           max_tokens=20, temperature=0.5, seed=1)
    assert re.fullmatch(r"20\d\d-[01]\d-[0-3]\d", reply.choices[0].message.content)
    reply = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Pick one"}],
                                           response_format={"type": "choice", "choice": ["left", "right"]},
                                           max_tokens=10)
    assert reply.choices[0].message.content in ("left", "right")
    done = client.completions.create(model="smollm2-135m", prompt="The answer is", max_tokens=10,
                                     extra_body={"response_format": {"type": "regex", "regex": r" \d{1,3}"}})
    assert re.fullmatch(r" \d{1,3}", done.choices[0].text), done.choices[0].text


@pytest.mark.parametrize(("fmt", "words"), [
    (strict({"type": "object", "not": {"type": "string"}}), "not"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "name"),
    ({"type": "yaml"}, "response_format.type"),
    ({"type": "regex", "regex": "("}, "regex"),
])
def test_what_cannot_be_enforced_is_a_400(client, fmt, words) -> None:
    with pytest.raises(BadRequestError) as refused:
        client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "x"}],
                                       response_format=fmt, max_tokens=5)
    assert words in refused.value.body["message"], refused.value.body
