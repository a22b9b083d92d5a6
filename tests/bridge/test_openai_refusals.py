"""Every refusal of the OpenAI request parser, with its exact parameter and message (what mutation
testing showed a substring check lets drift), and the values next to each refusal that are taken."""

from __future__ import annotations

from typing import Any

import pytest

from tokenwire.bridge.errors import ApiError
from tokenwire.bridge.routes.openai_request import parse_chat, parse_completion

USER = [{"role": "user", "content": "hi"}]
NAME_RULE = "1 to 64 letters, digits, '_' or '-'"


def refused(body: dict[str, Any], parse=parse_chat) -> tuple[str | None, str]:
    with pytest.raises(ApiError) as caught:
        parse({"messages": USER, "prompt": "x", **body} if parse is parse_completion else {"messages": USER, **body},
              "r")
    assert caught.value.status == 400
    return caught.value.param, caught.value.message


def schema_format(**spec: Any) -> dict[str, Any]:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "f", **spec}}}


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"response_format": "text"}, "response_format", "response_format must be an object with a type"),
    ({"response_format": {"type": 5}}, "response_format", "response_format must be an object with a type"),
    ({"response_format": {"type": "yaml"}}, "response_format.type",
     "response_format.type must be one of text, json_object, json_schema, regex, choice, grammar, got 'yaml'"),
    ({"response_format": {"type": "text", "regex": "x"}}, "response_format.regex",
     "response_format.regex has no place in type text"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema",
     "response_format.json_schema needs a name (and a schema)"),
    (schema_format(name="a b"), "response_format.json_schema.name", f"response_format.json_schema.name must be {NAME_RULE}"),
    (schema_format(description=5), "response_format.json_schema.description", "description must be a string"),
    (schema_format(strict="yes"), "response_format.json_schema.strict", "strict must be true or false"),
    (schema_format(schema=[]), "response_format.json_schema.schema", "schema must be a JSON Schema object"),
    ({"response_format": {"type": "regex", "regex": ""}}, "response_format.regex",
     "response_format.regex must be a non-empty string"),
    ({"response_format": {"type": "regex", "regex": 5}}, "response_format.regex",
     "response_format.regex must be a non-empty string"),
    ({"response_format": {"type": "choice", "choice": []}}, "response_format.choice",
     "response_format.choice must be non-empty strings"),
    ({"response_format": {"type": "choice", "choice": ["a", ""]}}, "response_format.choice",
     "response_format.choice must be non-empty strings"),
    ({"response_format": {"type": "choice", "choice": ["a", 5]}}, "response_format.choice",
     "response_format.choice must be non-empty strings"),
    ({"response_format": {"type": "grammar", "grammar": ""}}, "response_format.grammar",
     "response_format.grammar must be a non-empty string"),
    ({"response_format": {"type": "grammar", "grammar": "x", "syntax": "ebnf"}}, "response_format.syntax",
     "response_format.syntax must be lark or gbnf"),
    ({"metadata": 5}, "metadata", "metadata must be an object, got number"),
    ({"service_tier": 5}, "service_tier", "service_tier must be a string, got number"),
    ({"functions": {"name": "f"}}, "functions", "functions must be an array, got object"),
    ({"functions": [{"name": "f"}], "tools": [{"type": "function", "function": {"name": "g"}}]}, "functions",
     "send tools or the legacy functions, not both"),
    ({"functions": [{"name": "a b"}]}, "functions[0].name",
     "functions[0].name must be 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'"),
    ({"functions": [{"name": "f"}], "function_call": "always"}, "function_call",
     'function_call must be "none", "auto", "required" or a function, got \'always\''),
    ({"function_call": {"name": "f"}}, "function_call", "function_call goes with functions; with tools send tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice",
     "tool_choice 'function' needs tools"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": 5}]}, "messages[0].tool_call_id",
     "messages[0].tool_call_id: a tool message names the call it answers"),
    ({"chat_template_kwargs": {"x": 1}}, "chat_template_kwargs", "chat_template_kwargs takes only enable_thinking"),
    ({"chat_template_kwargs": []}, "chat_template_kwargs", "chat_template_kwargs takes only enable_thinking"),
    ({"chat_template_kwargs": {"enable_thinking": 1}}, "chat_template_kwargs.enable_thinking",
     "enable_thinking must be true or false"),
    ({"chat_template_kwargs": {"enable_thinking": True}, "think": False}, "think",
     "think and chat_template_kwargs.enable_thinking disagree"),
])
def test_each_refusal_names_its_field_exactly(body: dict[str, Any], param: str, message: str) -> None:
    assert refused(body) == (param, message)


def test_the_values_beside_the_refusals_are_taken() -> None:
    def chat(**body: Any):
        return parse_chat({"messages": USER, **body}, "r")[0]

    assert chat(**schema_format(name="Film_Review-2", description="d", strict=True)).sampling.json_schema == "{}"
    assert chat(**schema_format(strict=None, schema={"type": "object"})).sampling.json_schema == '{"type": "object"}'
    assert chat(response_format={"type": "grammar", "grammar": "start: \"a\""}).sampling.lark == 'start: "a"'
    assert chat(response_format={"type": "grammar", "grammar": "root ::= \"a\"", "syntax": "gbnf"}).sampling.gbnf
    assert list(chat(response_format={"type": "choice", "choice": ["a", "b"]}).sampling.choice.options) == ["a", "b"]
    assert chat(metadata={}, service_tier="auto").request_id == "r"
    legacy = chat(functions=[{"name": "f"}], function_call="auto")
    assert (legacy.tool_choice, legacy.parallel_tool_calls, [t.name for t in legacy.tools]) == ("auto", False, ["f"])
    assert chat(functions=[{"name": "f"}]).tool_choice == "" and chat(tools=[{"type": "function", "function": {
        "name": "g"}}], function_call="auto").tool_choice == ""
    assert chat(tools=[], tool_choice="none").tool_choice == "none"
    think = chat(think=True, chat_template_kwargs={})
    assert think.HasField("think") and think.think is True
    off = chat(chat_template_kwargs={"enable_thinking": False})
    assert off.HasField("think") and off.think is False
    named = chat(messages=[{"role": "user", "content": "hi", "name": "ann"}]).messages[0]
    assert named.name == "", "a name on a message other than a tool result is not passed on"
    assert parse_completion({"prompt": "x", "n": 2}, "r")[0].n == 2


def test_the_edges_of_logit_bias_functions_and_n() -> None:
    def chat(**body: Any):
        return parse_chat({"messages": USER, **body}, "r")

    many = {str(i): 1 for i in range(1024)}
    assert len(chat(logit_bias=many)[0].sampling.logit_bias) == 1024
    assert refused({"logit_bias": {**many, "5000": 1}}) == ("logit_bias", "logit_bias holds at most 1024 tokens, got 1025")
    assert refused({"logit_bias": [1]}) == ("logit_bias", "logit_bias must be an object of token id -> bias, got array")
    assert refused({"logit_bias": {"x": 1}}) == ("logit_bias", "logit_bias keys are token ids, got 'x'")
    assert refused({"logit_bias": {"3": 100.5}}) == ("logit_bias", "logit_bias[3] must be a number in [-100, 100], got 100.5")
    assert dict(chat(logit_bias={"1": -100, "2": 100})[0].sampling.logit_bias) == {1: -100.0, 2: 100.0}
    functions = [{"name": f"f{i}"} for i in range(128)]
    assert len(chat(functions=functions)[0].tools) == 128
    assert refused({"functions": [*functions, {"name": "g"}]}) == ("functions", "functions: at most 128, got 129")
    request, opts = chat(n=2)
    assert request.n == 2 and opts.n == 2
    assert chat()[1].logprobs is False and chat(logprobs=True)[1].logprobs is True
