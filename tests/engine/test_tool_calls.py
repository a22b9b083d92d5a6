"""Tool calling's pieces without a server (the compatibility issue, item 3): the parser reads each
common call format whole and piece by piece alike and gives back what only looks like a call; the
grammar, sampled from random logits on the real tokenizer, always yields calls that parse and
validate; the generic prompt and the template shape carry the tools, calls and results."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from tokenwire.server.engine.constraints import OutputConstraint, RowConstraint
from tokenwire.server.engine.tokenizer import TokenizerBundle
from tokenwire.server.engine.tool_calls import (
    CallOut,
    TextOut,
    ToolCallStream,
    ToolError,
    ToolSpec,
    ToolUse,
    args_key,
    call_grammar,
    generic_messages,
    template_messages,
    template_takes_tools,
)

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = (ToolSpec("get_weather", "Weather now", WEATHER), ToolSpec("ping"))


def run(text: str, pieces: int | None = None) -> tuple[str, list[tuple[str, dict]]]:
    """The prose and the calls the stream makes of `text`, fed whole or in `pieces`-character bits."""
    stream = ToolCallStream(TOOLS)
    step = pieces or len(text) or 1
    parts = [p for i in range(0, len(text), step) for p in stream.feed(text[i:i + step])] + stream.finish()
    prose = "".join(p.text for p in parts if isinstance(p, TextOut))
    calls = [(p.call.name, json.loads(p.call.arguments)) for p in parts if isinstance(p, CallOut)]
    assert [p.index for p in parts if isinstance(p, CallOut)] == list(range(len(calls)))
    assert [(c.name, json.loads(c.arguments)) for c in stream.calls] == calls
    return prose, calls


PARIS = {"city": "Paris", "unit": "c"}


@pytest.mark.parametrize(("text", "prose", "calls"), [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>', "",
     [("get_weather", PARIS)]),
    ('Checking.\n<tool_call>{"name": "ping", "arguments": {}}</tool_call>\n<tool_call>{"name": "get_weather", '
     '"arguments": {"city": "Paris", "unit": "c"}}</tool_call>\n', "Checking.\n",
     [("ping", {}), ("get_weather", PARIS)]),
    ('<tool_call>{"name": "ping", "arguments": "{}"}', "", [("ping", {})]),  # no closing tag; arguments as text
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}, {"name": "ping", '
     '"arguments": {}}]', "", [("get_weather", PARIS), ("ping", {})]),
    ('[TOOL_CALLS]ping[ARGS]{}', "", [("ping", {})]),
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}', "", [("get_weather", PARIS)]),
    ('<|python_tag|>{"name": "ping", "parameters": {}}; {"name": "ping", "parameters": {}}', "",
     [("ping", {}), ("ping", {})]),
    # Only looks like a call: given back as it was.
    ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', '<tool_call>{"name": "rm_rf", "arguments": {}}'
     '</tool_call>', []),
    ('<tool_call>not json</tool_call> ok', "<tool_call>not json</tool_call> ok", []),
    ('{"answer": 42}', '{"answer": 42}', []),
    ("a < b and [TOOL] x", "a < b and [TOOL] x", []),
    ("Plain prose.", "Plain prose.", []),
])
def test_each_format_parses_whole_and_piecewise(text: str, prose: str, calls: list) -> None:
    for pieces in (None, 1, 3, 7):
        assert run(text, pieces) == (prose, calls), pieces


def test_prose_is_said_as_it_comes_and_only_a_possible_opening_is_held() -> None:
    stream = ToolCallStream(TOOLS)
    assert stream.feed("Hello wor") == [TextOut("Hello wor")]
    assert stream.feed("ld <tool") == [TextOut("ld ")], "'<tool' may open a call"
    assert stream.feed("s are fun") == [TextOut("<tools are fun")]


def test_call_ids_are_unique() -> None:
    stream = ToolCallStream(TOOLS)
    stream.feed('<tool_call>{"name": "ping", "arguments": {}}</tool_call>' * 5)
    ids = [c.id for c in stream.calls]
    assert len(set(ids)) == 5 and all(i.startswith("call_") and len(i) == 29 for i in ids)


@pytest.fixture(scope="module")
def tok(int4_dir) -> TokenizerBundle:
    return TokenizerBundle(int4_dir)


def sample(tok: TokenizerBundle, grammar: str, seed: int, steps: int = 400) -> str:
    row = RowConstraint(grammar, tok.grammar)
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for _ in range(steps):
        logits = row.mask(rng.standard_normal(tok.tokenizer.get_vocab_size()).astype(np.float32) * 3)
        token = int(np.argmax(logits))
        if token in tok.eos_token_ids:
            assert row.accepting
            break
        row.consume(token)
        out.append(token)
        if row.done:
            break
    return tok.tokenizer.decode(out)


@pytest.mark.parametrize("use", [ToolUse(TOOLS, "required"), ToolUse(TOOLS, "function", "get_weather"),
                                 ToolUse(TOOLS, "required", parallel=False)])
def test_sampled_forced_calls_always_parse_and_validate(tok, use: ToolUse) -> None:
    grammar = OutputConstraint("lark", call_grammar(use)).grammar()
    for seed in range(2):
        text = sample(tok, grammar, seed)
        prose, calls = run(text)
        assert calls and not prose.strip(), text
        assert len(calls) == 1 or use.parallel
        for name, arguments in calls:
            assert name == use.name or use.choice == "required"
            jsonschema.validate(arguments, WEATHER if name == "get_weather" else {"type": "object"})


def test_auto_text_never_holds_a_broken_call(tok) -> None:
    """With auto, random rows are prose or calls; whatever opens a call is a valid call."""
    grammar = OutputConstraint("lark", call_grammar(ToolUse(TOOLS))).grammar()
    for seed in range(3):
        text = sample(tok, grammar, seed, steps=80)
        prose, _ = run(text)
        assert "<tool_call>" not in prose, text


def test_auto_with_a_schema_is_that_json_or_calls(tok) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    grammar = OutputConstraint("lark", call_grammar(ToolUse(TOOLS), json_schema=schema)).grammar()
    for seed in range(2):
        text = sample(tok, grammar, seed)
        prose, calls = run(text)
        if not calls:
            jsonschema.validate(json.loads(prose), schema)


def test_the_generic_prompt_carries_tools_calls_and_results() -> None:
    call = {"id": "call_1", "function": {"name": "ping", "arguments": "{}"}}
    got = generic_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "", "tool_calls": [call]},
                            {"role": "tool", "content": "pong", "tool_call_id": "call_1"}], TOOLS)
    assert got[0]["role"] == "system" and got[0]["content"].startswith("Be brief.\n\n")
    shown = [json.loads(line) for line in got[0]["content"].split("<tools>\n")[1].split("\n</tools>")[0].splitlines()]
    assert [t["function"]["name"] for t in shown] == ["get_weather", "ping"]
    assert shown[0]["function"]["parameters"] == WEATHER
    assert got[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>'}
    assert got[3] == {"role": "user", "content": "<tool_response>\npong\n</tool_response>"}
    assert generic_messages([{"role": "user", "content": "hi"}], TOOLS)[0]["role"] == "system"


def test_templates_get_calls_as_objects_and_results_with_their_names() -> None:
    call = {"id": "call_1", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}}
    got = template_messages([{"role": "assistant", "content": "", "tool_calls": [call]},
                             {"role": "tool", "content": "5", "tool_call_id": "call_1"}])
    assert got[0]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo", "unit": "c"}
    assert got[1] == {"role": "tool", "content": "5", "tool_call_id": "call_1", "name": "get_weather"}
    assert template_takes_tools("{% if tools %}...{% endif %}") and not template_takes_tools("{{ messages }}")
    assert args_key('{{- "<|python_tag|>" }} "parameters"') == "parameters"
    assert args_key("<tool_call>{{ tools }}") == "arguments"


@pytest.mark.parametrize(("use", "field"), [
    (ToolUse((ToolSpec("a b"),)), "tools[0].name"),
    (ToolUse((ToolSpec("f"), ToolSpec("f"))), "tools[1].name"),
    (ToolUse(TOOLS, "sometimes"), "tool_choice"),
    (ToolUse((), "required"), "tool_choice"),
    (ToolUse(TOOLS, "function", "nope"), "tool_choice"),
    (ToolUse(tuple(ToolSpec(f"t{i}") for i in range(129))), "tools"),
])
def test_bad_tool_uses_name_their_field(use: ToolUse, field: str) -> None:
    with pytest.raises(ToolError) as caught:
        use.check()
    assert caught.value.field == field
