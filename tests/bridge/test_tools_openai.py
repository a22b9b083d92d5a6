"""Tool calling through the OpenAI SDK on the real model (the compatibility issue, item 3): a forced
call and a named call, streamed and not, parse and validate against the tool's schema; the stream
sends the call's id and name before its arguments; a tool result turn is answered; `auto` is
checked on the prompt the model sees (the tools through the generic prompt, SmolLM2's template
takes none) rather than on what a 135M model happens to choose; bad tools are 400s naming the field."""

from __future__ import annotations

import json

import jsonschema
import pytest
from openai import BadRequestError, OpenAI

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now.",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a time zone.",
                                      "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(bridge) -> OpenAI:
    return OpenAI(base_url=bridge.url + "/v1", api_key="unused")


def test_a_required_call_parses_and_validates(client) -> None:
    reply = client.chat.completions.create(model="smollm2-135m", messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=120, temperature=0, parallel_tool_calls=False)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert len(calls) == 1 and calls[0].type == "function" and calls[0].id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].function.arguments), SCHEMAS[calls[0].function.name])
    assert "<tool_call>" not in (choice.message.content or ""), "the call is not also given as text"


def test_a_named_call_streams_its_name_then_its_arguments(client) -> None:
    chunks = list(client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "What time is it in Tokyo?"}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=120, temperature=0,
        parallel_tool_calls=False, stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].id.startswith("call_") and deltas[0].function.name == "get_time"
    assert all(d.index == 0 for d in deltas)
    assert all(d.id is None and d.function.name is None for d in deltas[1:]), "id and name come once, first"
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), TIME)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()


def test_a_tool_result_turn_is_answered_in_text(client) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]
    reply = client.chat.completions.create(model="smollm2-135m", messages=messages, tools=TOOLS, tool_choice="none",
                                           max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.tool_calls is None
    assert choice.message.content
    assert reply.usage.prompt_tokens > 200, "the tools and the call's result are in the prompt"


def test_auto_shows_the_tools_and_frees_the_text(client, bridge) -> None:
    """The prompt grows by the tools' generic prompt; with auto the model may answer in prose."""
    plain = client.chat.completions.create(model="smollm2-135m", messages=ASK, max_tokens=1, temperature=0)
    auto = client.chat.completions.create(model="smollm2-135m", messages=ASK, tools=TOOLS, max_tokens=20,
                                          temperature=0)
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 100
    choice = auto.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    if choice.finish_reason == "tool_calls":  # whatever the model chose, a call is a valid one
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_parallel_calls_are_indexed(client) -> None:
    reply = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Weather in Paris and in Rome?"}], tools=TOOLS,
        tool_choice="required", max_tokens=200, temperature=0)
    calls = reply.choices[0].message.tool_calls
    assert calls and len({c.id for c in calls}) == len(calls)
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                              "properties": {"x": {"type": "nope"}}}}}],
      "tool_choice": "required"}, "tools"),
])
def test_bad_tools_are_400s_naming_the_field(client, kwargs, param) -> None:
    with pytest.raises(BadRequestError) as caught:
        client.chat.completions.create(model="smollm2-135m", messages=ASK, max_tokens=5, **kwargs)
    assert caught.value.body["param"] == param, caught.value.body
