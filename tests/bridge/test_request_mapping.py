"""Request bodies → GenerateRequest, without a server: every OpenAI parameter (and the stream API's
own) lands in its field, unset values stay unset, and each refusal names its `param` and `code`.

These call bridge/proto_request.py, bridge/routes/openai_request.py and routes/stream.py's
parse_generate directly (pure functions), so they are in the fast tier and reach those modules'
mutants. Values are ones float32 holds exactly, so the proto's floats compare with ==.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from tokenwire.bridge.errors import ApiError
from tokenwire.bridge.params import Params
from tokenwire.bridge.proto_request import (
    MAX_UINT32,
    chat_messages,
    finish_reason_name,
    generate_request,
    request_id_for,
    stream_api_sampling,
)
from tokenwire.bridge.routes.openai_request import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    OpenAIOptions,
    _short,
    parse_chat,
    parse_completion,
)
from tokenwire.bridge.routes.stream import parse_generate
from tokenwire.v1 import inference_pb2 as pb

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "seed")
USER_MSG = [{"role": "user", "content": "hi"}]


def refusal(call, *args: Any, **kwargs: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        call(*args, **kwargs)
    assert info.value.status == 400
    assert info.value.type == "invalid_request_error"
    return info.value


def assert_refused(err: ApiError, param: str, message: str, code: str | None = None) -> None:
    assert (err.param, err.code, err.message) == (param, code, message)


def chat(**body: Any) -> tuple[pb.GenerateRequest, OpenAIOptions]:
    return parse_chat({"messages": USER_MSG, **body}, "rid-1")


def completion(**body: Any) -> tuple[pb.GenerateRequest, OpenAIOptions]:
    return parse_completion({"prompt": "Once", **body}, "rid-2")


def set_sampling(request: pb.GenerateRequest) -> dict[str, Any]:
    return {name: getattr(request.sampling, name) for name in SAMPLING_FIELDS if request.sampling.HasField(name)}


# ---- request ids ------------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["a", "abc-123", "A.b_c:d-9", "x" * 64, "0123456789abcdef"])
def test_a_sane_request_id_is_kept(given: str) -> None:
    assert request_id_for(make_mocked_request("POST", "/v1/chat/completions", headers={"X-Request-Id": given})) == given


@pytest.mark.parametrize("given", ["", "x" * 65, "has space", "semi;colon", "slash/y", "é", "a\tb", "new\nline"])
def test_an_odd_request_id_is_replaced_by_a_fresh_one(given: str) -> None:
    got = request_id_for(make_mocked_request("POST", "/v1/completions", headers={"X-Request-Id": given}))
    assert got != given
    assert re.fullmatch(r"[0-9a-f]{16}", got)


def test_without_a_request_id_each_request_gets_a_fresh_one() -> None:
    ids = {request_id_for(make_mocked_request("GET", "/api/generate")) for _ in range(5)}
    assert len(ids) == 5
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)


def test_the_header_name_is_x_request_id_in_any_case() -> None:
    request = make_mocked_request("POST", "/v1/completions", headers={"x-request-id": "lower-case"})
    assert request_id_for(request) == "lower-case"
    other = make_mocked_request("POST", "/v1/completions", headers={"Request-Id": "other-header"})
    assert request_id_for(other) != "other-header"


# ---- finish reasons ---------------------------------------------------------------------------


def test_finish_reason_names() -> None:
    assert [finish_reason_name(r) for r in (pb.FINISH_REASON_UNSPECIFIED, pb.FINISH_REASON_STOP,
                                            pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_CANCELLED,
                                            pb.FINISH_REASON_ERROR)] == [
        "unspecified", "stop", "length", "cancelled", "error"]
    assert finish_reason_name(99) == "unknown-99"


# ---- chat_messages ----------------------------------------------------------------------------


def test_messages_keep_role_and_content_in_order() -> None:
    got = chat_messages([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello", "name": "bot"}])
    assert [(m.role, m.content) for m in got] == [("system", "be brief"), ("user", "hi"), ("assistant", "hello")]
    assert all(isinstance(m, pb.ChatMessage) for m in got)


def test_developer_is_system() -> None:
    assert [m.role for m in chat_messages([{"role": "developer", "content": "x"}])] == ["system"]


def test_content_null_is_empty_and_text_parts_are_joined() -> None:
    got = chat_messages([
        {"role": "assistant", "content": None},
        {"role": "assistant"},
        {"role": "user", "content": [{"type": "text", "text": "one "}, {"type": "text", "text": "two"}]},
        {"role": "user", "content": []},
        {"role": "user", "content": ""},
    ])
    assert [m.content for m in got] == ["", "", "one two", "", ""]


@pytest.mark.parametrize("value", [None, [], {}, "hi", {"role": "user", "content": "x"}])
def test_messages_must_be_a_non_empty_array(value: Any) -> None:
    assert_refused(refusal(chat_messages, value), "messages",
                   "messages must be a non-empty array of {role, content} objects")


def test_the_param_name_is_the_callers() -> None:
    assert_refused(refusal(chat_messages, [], "new_messages"), "new_messages",
                   "new_messages must be a non-empty array of {role, content} objects")
    assert_refused(refusal(chat_messages, ["x"], "new_messages"), "new_messages[0]",
                   "new_messages[0] must be an object, got string")


@pytest.mark.parametrize(("messages", "param", "message"), [
    ([{"role": "user", "content": "a"}, 5], "messages[1]", "messages[1] must be an object, got number"),
    ([None], "messages[0]", "messages[0] must be an object, got null"),
    ([{"content": "a"}], "messages[0].role", "messages[0].role must be a string"),
    ([{"role": 3, "content": "a"}], "messages[0].role", "messages[0].role must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "42"}], "messages[1].role",
     "messages[1].role 'tool': tool messages need tool calling, which this endpoint does not do (the OpenAI "
     "endpoints do)"),
    ([{"role": "function", "content": "42"}], "messages[0].role",
     "messages[0].role 'function': function messages need function calling, which tokenwire does not support"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}], "messages[0].tool_calls",
     "messages[0].tool_calls: tool calling is not supported here"),
    ([{"role": "assistant", "content": None, "function_call": {"name": "f"}}], "messages[0].function_call",
     "messages[0].function_call: the legacy function_call is not supported; send tool_calls"),
    ([{"role": "user", "content": 7}], "messages[0].content",
     "messages[0].content must be a string or an array of text parts, got number"),
    ([{"role": "user", "content": {"type": "text", "text": "x"}}], "messages[0].content",
     "messages[0].content must be a string or an array of text parts, got object"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]}],
     "messages[0].content[1].image_url.url",
     "messages[0].content[1].image_url.url must be a data: URL string, got null"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}],
     "messages[0].content[0].image_url.url", "messages[0].content[0].image_url.url: remote image URLs are refused "
     "(the server fetches nothing); send the image itself as a data: URL (data:image/png;base64,...)"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "aGVsbG8="}}]}],
     "messages[0].content[0].image_url.url",
     "messages[0].content[0].image_url.url must be a data: URL (data:image/png;base64,...)"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "messages[0].content[0]",
     "messages[0].content[0]: only text and image_url parts are supported, got 'input_audio'"),
    ([{"role": "user", "content": ["plain"]}], "messages[0].content[0]",
     "messages[0].content[0]: only text and image_url parts are supported, got 'string'"),
    ([{"role": "user", "content": [{"text": "no type"}]}], "messages[0].content[0]",
     "messages[0].content[0]: only text and image_url parts are supported, got None"),
    # A text part whose text is not a string: refused, though the message names its (valid) type.
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content[0]",
     "messages[0].content[0]: only text and image_url parts are supported, got 'text'"),
])
def test_message_refusals(messages: list, param: str, message: str) -> None:
    assert_refused(refusal(chat_messages, messages), param, message)


def test_empty_tool_calls_are_no_tool_calls() -> None:
    got = chat_messages([{"role": "assistant", "content": "ok", "tool_calls": [], "function_call": None}])
    assert [(m.role, m.content) for m in got] == [("assistant", "ok")]


# ---- generate_request -------------------------------------------------------------------------


def test_generate_request_maps_every_argument() -> None:
    messages = [pb.ChatMessage(role="user", content="hi")]
    request = generate_request(request_id="r1", model="m:int4", messages=messages, max_tokens=7,
                               stop=["a", "b"], logprobs=True, ignore_eos=True, user="ann",
                               sampling={"temperature": 0.5, "top_k": 3, "seed": 2**64 - 1, "top_p": None})
    assert request == pb.GenerateRequest(
        request_id="r1", model="m:int4", messages=messages, max_tokens=7, stop=["a", "b"], include_logprobs=True,
        ignore_eos=True, user="ann", sampling=pb.SamplingParams(temperature=0.5, top_k=3, seed=2**64 - 1))
    assert not request.sampling.HasField("top_p")
    assert request.prompt == ""


def test_generate_request_defaults_leave_everything_unset() -> None:
    request = generate_request(request_id="r2", model=None, prompt="")
    assert request == pb.GenerateRequest(request_id="r2", prompt="", sampling=pb.SamplingParams())
    assert request.HasField("sampling")
    assert list(request.messages) == [] and not request.include_logprobs and not request.ignore_eos
    assert set_sampling(request) == {}


def test_generate_request_prompt() -> None:
    request = generate_request(request_id="r3", model="", prompt="Once upon", max_tokens=None, stop=None,
                               user=None, sampling={"temperature": 0.0})
    assert (request.prompt, request.max_tokens, list(request.stop), request.user) == ("Once upon", 0, [], "")
    assert request.sampling.HasField("temperature") and request.sampling.temperature == 0.0
    assert not request.messages


@pytest.mark.parametrize("kwargs", [{}, {"prompt": "x", "messages": [pb.ChatMessage(role="user", content="x")]},
                                    {"prompt": "x", "messages": []}])
def test_generate_request_wants_exactly_one_of_prompt_and_messages(kwargs: dict) -> None:
    assert_refused(refusal(generate_request, request_id="r", model=None, **kwargs), "prompt",
                   "set exactly one of prompt and messages")


def test_an_empty_message_list_is_still_messages() -> None:
    request = generate_request(request_id="r", model=None, messages=[])
    assert request.prompt == "" and list(request.messages) == []


# ---- the stream API: stream_api_sampling and /api/generate ------------------------------------


def test_stream_api_sampling_reads_every_field() -> None:
    body = {"temperature": 1.5, "top_p": 0.25, "top_k": 40, "min_p": 0.125, "repetition_penalty": 1.25,
            "presence_penalty": -0.5, "frequency_penalty": 0.75, "seed": -1}
    assert stream_api_sampling(Params(body)) == {
        "temperature": 1.5, "top_p": 0.25, "top_k": 40, "min_p": 0.125, "repetition_penalty": 1.25,
        "presence_penalty": -0.5, "frequency_penalty": 0.75, "seed": 2**64 - 1}


def test_stream_api_sampling_leaves_ranges_to_the_server() -> None:
    body = {"temperature": 9, "top_p": 3, "min_p": -1, "repetition_penalty": 50, "presence_penalty": -7,
            "frequency_penalty": 7, "top_k": 0, "seed": 2**64 + 5}
    assert stream_api_sampling(Params(body)) == {
        "temperature": 9.0, "top_p": 3.0, "top_k": 0, "min_p": -1.0, "repetition_penalty": 50.0,
        "presence_penalty": -7.0, "frequency_penalty": 7.0, "seed": 5}
    assert stream_api_sampling(Params({})) == dict.fromkeys(SAMPLING_FIELDS)


def test_stream_api_top_k_fits_a_uint32() -> None:
    assert MAX_UINT32 == 2**32 - 1
    assert stream_api_sampling(Params({"top_k": MAX_UINT32}))["top_k"] == MAX_UINT32
    assert_refused(refusal(stream_api_sampling, Params({"top_k": MAX_UINT32 + 1})), "top_k",
                   "top_k must be <= 4294967295, got 4294967296")
    assert_refused(refusal(stream_api_sampling, Params({"top_k": -1})), "top_k", "top_k must be >= 0, got -1")


def test_parse_generate_maps_every_field() -> None:
    body = {"prompt": "Once", "model": "m", "max_tokens": 5, "stop": "\n", "logprobs": True, "ignore_eos": True,
            "user": "bob", "keep_alive": 0, "temperature": 0.5, "top_k": 2, "seed": 7}
    request = parse_generate(body, "gen-1")
    assert request == pb.GenerateRequest(
        request_id="gen-1", prompt="Once", model="m", max_tokens=5, stop=["\n"], include_logprobs=True,
        ignore_eos=True, user="bob", keep_alive_s=0.0, sampling=pb.SamplingParams(temperature=0.5, top_k=2, seed=7))
    assert request.HasField("keep_alive_s")


def test_parse_generate_minimal_and_messages() -> None:
    request = parse_generate({"messages": [{"role": "developer", "content": "x"}], "stop": ["a", "b"]}, "gen-2")
    assert [(m.role, m.content) for m in request.messages] == [("system", "x")]
    assert list(request.stop) == ["a", "b"] and request.max_tokens == 0 and request.prompt == ""
    assert not request.HasField("keep_alive_s") and set_sampling(request) == {}
    assert not request.include_logprobs and not request.ignore_eos and request.user == "" and request.model == ""


@pytest.mark.parametrize("body", [{}, {"prompt": "x", "messages": USER_MSG}])
def test_parse_generate_wants_prompt_or_messages(body: dict) -> None:
    assert_refused(refusal(parse_generate, body, "g"), "prompt",
                   "set exactly one of prompt (raw text) and messages (a chat)")


def test_parse_generate_refuses_unknown_fields() -> None:
    assert_refused(refusal(parse_generate, {"prompt": "x", "n": 1}, "g"), "n",
                   "Unrecognized request argument supplied: n", "unsupported_parameter")


# ---- OpenAI chat ------------------------------------------------------------------------------


def test_chat_maps_every_parameter() -> None:
    body = {
        "model": "smollm2-135m", "messages": [{"role": "developer", "content": "sys"},
                                              {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_completion_tokens": 9, "stop": ["\n\n", "END"], "logprobs": True, "top_logprobs": 0,
        "user": "carol", "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
        "temperature": 0.5, "top_p": 0.75, "presence_penalty": 1.5, "frequency_penalty": -1.5, "seed": -2,
        "top_k": 12, "min_p": 0.0625, "repetition_penalty": 1.125,
        "n": 1, "logit_bias": {}, "response_format": {"type": "text"}, "tools": [], "functions": [],
        "tool_choice": "none", "function_call": "none", "parallel_tool_calls": False, "store": False,
        "metadata": {"k": "v"}, "service_tier": "auto", "modalities": ["text"],
    }
    request, opts = parse_chat(body, "chat-1")
    assert request == pb.GenerateRequest(
        request_id="chat-1", model="smollm2-135m",
        messages=[pb.ChatMessage(role="system", content="sys"), pb.ChatMessage(role="user", content="hi")],
        max_tokens=9, stop=["\n\n", "END"], include_logprobs=True, ignore_eos=True, user="carol",
        sampling=pb.SamplingParams(temperature=0.5, top_p=0.75, presence_penalty=1.5, frequency_penalty=-1.5,
                                   seed=2**64 - 2, top_k=12, min_p=0.0625, repetition_penalty=1.125),
        tool_choice="none", parallel_tool_calls=False)
    assert opts == OpenAIOptions(model="smollm2-135m", stream=True, include_usage=True, logprobs=True,
                                 ignore_eos=True, user="carol")


def test_chat_minimal() -> None:
    request, opts = chat()
    assert request == pb.GenerateRequest(request_id="rid-1", messages=[pb.ChatMessage(role="user", content="hi")],
                                         sampling=pb.SamplingParams())
    assert set_sampling(request) == {}
    assert opts == OpenAIOptions(model="", stream=False, include_usage=False, logprobs=False, ignore_eos=False,
                                 user=None)


def test_chat_nulls_count_as_absent() -> None:
    body = dict.fromkeys(["model", "stream", "stream_options", "temperature", "top_p", "stop", "seed", "n",
                          "presence_penalty", "frequency_penalty", "logit_bias", "user", "top_k", "min_p",
                          "repetition_penalty", "max_tokens", "ignore_eos", "max_completion_tokens", "logprobs",
                          "top_logprobs", "response_format", "tools", "tool_choice", "parallel_tool_calls",
                          "functions", "function_call", "store", "metadata", "service_tier", "modalities"])
    request, opts = parse_chat({**body, "messages": USER_MSG}, "nulls")
    assert request == pb.GenerateRequest(request_id="nulls", messages=[pb.ChatMessage(role="user", content="hi")],
                                         sampling=pb.SamplingParams())
    assert opts == OpenAIOptions(model="", stream=False, include_usage=False, logprobs=False, ignore_eos=False,
                                 user=None)


def test_chat_max_completion_tokens_wins_over_max_tokens() -> None:
    assert chat(max_tokens=5)[0].max_tokens == 5
    assert chat(max_completion_tokens=6)[0].max_tokens == 6
    assert chat(max_tokens=5, max_completion_tokens=6)[0].max_tokens == 6
    assert chat(max_tokens=MAX_UINT32)[0].max_tokens == MAX_UINT32
    assert chat(max_completion_tokens=1)[0].max_tokens == 1
    assert chat(max_tokens=3.0)[0].max_tokens == 3


def test_chat_checks_max_tokens_also_beside_max_completion_tokens() -> None:
    """Once a bug: with max_completion_tokens given, a malformed max_tokens was never read."""
    assert_refused(refusal(chat, max_tokens="lots", max_completion_tokens=5), "max_tokens",
                   "max_tokens must be an integer, got string")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("max_tokens", 0, "max_tokens must be >= 1, got 0"),
    ("max_tokens", MAX_UINT32 + 1, "max_tokens must be <= 4294967295, got 4294967296"),
    ("max_completion_tokens", 0, "max_completion_tokens must be >= 1, got 0"),
    ("max_completion_tokens", MAX_UINT32 + 1, "max_completion_tokens must be <= 4294967295, got 4294967296"),
    ("max_completion_tokens", 2.5, "max_completion_tokens must be an integer, got number"),
])
def test_chat_max_tokens_bounds(field: str, value: Any, message: str) -> None:
    assert_refused(refusal(chat, **{field: value}), field, message)


@pytest.mark.parametrize(("stop", "expected"), [("\n", ["\n"]), (["a", "bc"], ["a", "bc"]), ([], []), (None, [])])
def test_chat_stop_as_string_or_list(stop: Any, expected: list[str]) -> None:
    assert list(chat(stop=stop)[0].stop) == expected
    assert list(completion(stop=stop)[0].stop) == expected


def test_stop_must_be_strings() -> None:
    assert_refused(refusal(chat, stop=["a", 1]), "stop", "stop must be a string or an array of strings")
    assert_refused(refusal(completion, stop=5), "stop", "stop must be a string or an array of strings")


@pytest.mark.parametrize(("seed", "expected"), [(0, 0), (42, 42), (-1, 2**64 - 1), (2**64, 0), (2**64 + 3, 3),
                                                 (2**64 - 1, 2**64 - 1), (-(2**64) - 1, 2**64 - 1), (7.0, 7)])
def test_seed_is_taken_modulo_2_64(seed: Any, expected: int) -> None:
    request = chat(seed=seed)[0]
    assert request.sampling.HasField("seed") and request.sampling.seed == expected
    assert completion(seed=seed)[0].sampling.seed == expected


@pytest.mark.parametrize("seed", [1.5, "1", True])
def test_seed_must_be_an_integer(seed: Any) -> None:
    err = refusal(chat, seed=seed)
    assert (err.param, err.code) == ("seed", None)
    assert err.message.startswith("seed must be an integer, got ")


@pytest.mark.parametrize(("field", "low", "high"), [("temperature", 0, 2),
                                                     ("presence_penalty", -2, 2), ("frequency_penalty", -2, 2)])
def test_openai_sampling_ranges(field: str, low: float, high: float) -> None:
    for value in (low, (low + high) / 2, high):
        request = chat(**{field: value})[0]
        assert request.sampling.HasField(field) and getattr(request.sampling, field) == value
        assert getattr(completion(**{field: value})[0].sampling, field) == value
    for value in (low - 0.5, high + 0.5):
        assert_refused(refusal(chat, **{field: value}), field, f"{field} must be in [{low:g}, {high:g}], got {value:g}")
        assert_refused(refusal(completion, **{field: value}), field,
                       f"{field} must be in [{low:g}, {high:g}], got {value:g}")


def test_openai_top_p_excludes_zero() -> None:
    """The documented range (0, 1]: 0 is refused by the bridge, as the server would."""
    assert chat(top_p=1)[0].sampling.top_p == 1.0 and chat(top_p=0.5)[0].sampling.top_p == 0.5
    for value in (0, -0.5, 1.5):
        assert_refused(refusal(chat, top_p=value), "top_p", f"top_p must be in (0, 1], got {float(value)!r}")


def test_openai_extras_are_bounded_as_documented_and_typed() -> None:
    """The server's ranges, as the OpenAPI document states them (bridge/fields.py SAMPLING), are
    checked in the bridge since the fuzz (tests/bridge/test_fuzz_http.py): min_p [0, 1),
    repetition_penalty (0, 10]."""
    request = chat(min_p=0.5, repetition_penalty=3, top_k=MAX_UINT32)[0]
    assert (request.sampling.min_p, request.sampling.repetition_penalty, request.sampling.top_k) == (
        0.5, 3.0, MAX_UINT32)
    assert_refused(refusal(completion, min_p=-4), "min_p", "min_p must be in [0, 1), got -4.0")
    assert_refused(refusal(completion, repetition_penalty=64), "repetition_penalty",
                   "repetition_penalty must be in (0, 10], got 64.0")
    assert_refused(refusal(chat, top_k=-1), "top_k", "top_k must be >= 0, got -1")
    assert_refused(refusal(chat, top_k=MAX_UINT32 + 1), "top_k", "top_k must be <= 4294967295, got 4294967296")
    assert_refused(refusal(chat, min_p="0.1"), "min_p", "min_p must be a number, got string")
    assert_refused(refusal(completion, repetition_penalty=True), "repetition_penalty",
                   "repetition_penalty must be a number, got boolean")
    assert_refused(refusal(chat, temperature="hot"), "temperature", "temperature must be a number, got string")


def test_stream_and_include_usage() -> None:
    assert chat(stream=False)[1].stream is False
    assert chat(stream=True)[1].stream is True
    assert chat(stream=True, stream_options={})[1].include_usage is False
    assert chat(stream=True, stream_options={"include_usage": False})[1].include_usage is False
    assert chat(stream=True, stream_options={"include_usage": True})[1].include_usage is True
    assert completion(stream=True, stream_options={"include_usage": True})[1].include_usage is True
    assert_refused(refusal(chat, stream="yes"), "stream", "stream must be true or false, got string")
    assert_refused(refusal(chat, stream_options=True), "stream_options", "stream_options must be an object")
    assert_refused(refusal(completion, stream_options=[]), "stream_options", "stream_options must be an object")
    assert_refused(refusal(chat, stream_options={"include_usage": 1}), "stream_options.include_usage",
                   "stream_options.include_usage must be true or false")
    assert_refused(refusal(chat, stream_options={"include_usage": "true"}), "stream_options.include_usage",
                   "stream_options.include_usage must be true or false")


def test_model_user_and_ignore_eos_are_typed() -> None:
    assert chat(model="m", user="u")[1] == OpenAIOptions(model="m", stream=False, include_usage=False,
                                                         logprobs=False, ignore_eos=False, user="u")
    assert chat(user="")[0].user == ""
    assert chat(ignore_eos=False)[1].ignore_eos is False
    assert_refused(refusal(chat, model=5), "model", "model must be a string, got number")
    assert_refused(refusal(chat, user=["u"]), "user", "user must be a string, got array")
    assert_refused(refusal(completion, ignore_eos=1), "ignore_eos", "ignore_eos must be true or false, got number")


def test_chat_logprobs_and_top_logprobs() -> None:
    request, opts = chat(logprobs=True)
    assert request.include_logprobs and opts.logprobs is True and request.top_logprobs == 0
    request, opts = chat(logprobs=False, top_logprobs=0)
    assert not request.include_logprobs and opts.logprobs is False
    assert chat(logprobs=True, top_logprobs=20)[0].top_logprobs == 20
    assert_refused(refusal(chat, top_logprobs=3), "top_logprobs", "top_logprobs needs logprobs: true")
    assert_refused(refusal(chat, top_logprobs=21), "top_logprobs", "top_logprobs must be <= 20, got 21")
    assert_refused(refusal(chat, top_logprobs=-1), "top_logprobs", "top_logprobs must be >= 0, got -1")
    assert_refused(refusal(chat, logprobs=0), "logprobs", "logprobs must be true or false, got number")


def test_completion_logprobs_ask_for_alternatives() -> None:
    assert (completion(logprobs=0)[0].include_logprobs, completion(logprobs=0)[0].top_logprobs) == (True, 0)
    assert (completion(logprobs=5)[0].include_logprobs, completion(logprobs=5)[0].top_logprobs) == (True, 5)
    assert not completion()[0].include_logprobs
    assert_refused(refusal(completion, logprobs=6), "logprobs", "logprobs must be <= 5, got 6")


def test_logit_bias_maps_token_ids_to_biases() -> None:
    request = chat(logit_bias={"50": -100, "7": 2.5})[0]
    assert dict(request.sampling.logit_bias) == {50: -100.0, 7: 2.5}
    assert completion(logit_bias={"1": 1})[0].sampling.logit_bias[1] == 1.0
    assert not chat(logit_bias={})[0].sampling.logit_bias
    for value, words in [({"a": 1}, "keys are token ids"), ({"-1": 1}, "keys are token ids"),
                         ({"1": 101}, "in [-100, 100]"), ({"1": "x"}, "in [-100, 100]"), ({"1": True}, "in [-100, 100]"),
                         ([1], "must be an object")]:
        err = refusal(chat, logit_bias=value)
        assert err.param == "logit_bias" and words in err.message, (value, err.message)


def test_chat_needs_messages() -> None:
    assert_refused(refusal(parse_chat, {"model": "m"}, "r"), "messages", "messages is required")
    assert_refused(refusal(parse_chat, {"messages": None}, "r"), "messages", "messages is required")
    assert_refused(refusal(parse_chat, {"messages": []}, "r"), "messages",
                   "messages must be a non-empty array of {role, content} objects")
    assert_refused(refusal(parse_chat, {"messages": [{"role": "tool", "content": "1"}]}, "r"),
                   "messages[0].tool_call_id", "messages[0].tool_call_id: a tool message names the call it answers")


@pytest.mark.parametrize(("field", "value", "allowed"), [
    ("store", True, "false (the bridge stores nothing)"),
    ("store", 0, "false (the bridge stores nothing)"),
    ("modalities", ["text", "audio"], '["text"]'),
    ("modalities", [], '["text"]'),
])
def test_chat_refuses_values_it_cannot_honour(field: str, value: Any, allowed: str) -> None:
    assert_refused(refusal(chat, **{field: value}), field,
                   f"{field}: only {allowed} is supported by tokenwire, got {value!r}", "unsupported_value")


@pytest.mark.parametrize(("value", "param", "words"), [
    ("text", "response_format", "must be an object with a type"),
    ({}, "response_format", "must be an object with a type"),
    ({"type": "yaml"}, "response_format.type", "must be one of text, json_object, json_schema"),
    ({"type": "text", "regex": "x"}, "response_format.regex", "has no place in type text"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema", "needs a name"),
    ({"type": "json_schema", "json_schema": {"name": "a b"}}, "response_format.json_schema.name", "1 to 64"),
    ({"type": "choice", "choice": []}, "response_format.choice", "non-empty strings"),
    ({"type": "grammar", "grammar": "x", "syntax": "ebnf"}, "response_format.syntax", "lark or gbnf"),
])
def test_response_format_shapes_are_checked(value: Any, param: str, words: str) -> None:
    with pytest.raises(ApiError) as refused:
        chat(response_format=value)
    assert refused.value.param == param and words in refused.value.message


@pytest.mark.parametrize(("value", "field", "expected"), [
    ({"type": "text"}, None, None),
    ({"type": "json_object"}, "json_object", True),
    ({"type": "json_schema", "json_schema": {"name": "f", "schema": {"type": "object"}, "strict": True}},
     "json_schema", '{"type": "object"}'),
    ({"type": "regex", "regex": r"\d+"}, "regex", r"\d+"),
    ({"type": "grammar", "grammar": "start: \"a\"", "syntax": "lark"}, "lark", 'start: "a"'),
    ({"type": "grammar", "grammar": "root ::= \"a\"", "syntax": "gbnf"}, "gbnf", 'root ::= "a"'),
])
def test_response_format_becomes_the_constraint(value: Any, field: str | None, expected: Any) -> None:
    request = chat(response_format=value)[0]
    assert request.sampling.WhichOneof("constraint") == field
    if field:
        assert getattr(request.sampling, field) == expected
    choice = chat(response_format={"type": "choice", "choice": ["a", "b c"]})[0]
    assert list(choice.sampling.choice.options) == ["a", "b c"]
    done = completion(response_format={"type": "regex", "regex": "x+"})[0]
    assert done.sampling.regex == "x+"


def test_n_asks_for_choices() -> None:
    assert chat(n=3)[0].n == 3 and completion(n=8)[0].n == 8 and chat(n=1)[0].n == 0
    assert_refused(refusal(chat, n=9), "n", "n must be <= 8, got 9")
    assert_refused(refusal(completion, n=0), "n", "n must be >= 1, got 0")


def test_n_must_be_an_integer() -> None:
    assert_refused(refusal(chat, n="1"), "n", "n must be an integer, got string")
    assert chat(n=1.0)[0].request_id == "rid-1"


def test_tools_map_to_the_request() -> None:
    weather = {"type": "object", "properties": {"city": {"type": "string"}}}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "d", "parameters": weather}},
             {"type": "function", "function": {"name": "noop"}}]
    request = chat(tools=tools, tool_choice={"type": "function", "function": {"name": "noop"}},
                   parallel_tool_calls=False)[0]
    assert list(request.tools) == [pb.Tool(name="get_weather", description="d", parameters_json=json.dumps(weather)),
                                   pb.Tool(name="noop")]
    assert (request.tool_choice, request.tool_choice_name, request.parallel_tool_calls) == ("function", "noop", False)
    assert chat(tools=tools, tool_choice="required")[0].tool_choice == "required"
    assert not chat(tools=tools)[0].HasField("parallel_tool_calls"), "unset: the server's default (true)"
    legacy = chat(functions=[tools[1]["function"]], function_call={"name": "noop"})[0]
    assert (list(legacy.tools), legacy.tool_choice, legacy.tool_choice_name, legacy.parallel_tool_calls) == (
        [pb.Tool(name="noop")], "function", "noop", False)


def test_tool_calls_and_results_in_the_history() -> None:
    call = {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_9", "name": "f", "content": "2"}]
    got = chat(messages=messages)[0].messages
    assert got[1] == pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id="call_9", name="f",
                                                                              arguments_json='{"a": 1}')])
    assert got[2] == pb.ChatMessage(role="tool", content="2", tool_call_id="call_9", name="f")


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "must be true or false"),
    ({"tools": {}}, "tools", "must be an array of tools"),
    ({"tools": [{"type": "code", "function": {"name": "f"}}]}, "tools[0].type", "must be {"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools[0].function.parameters",
     "JSON Schema object"),
    ({"tool_choice": "always"}, "tool_choice", "must be"),
    ({"tool_choice": {"type": "function"}}, "tool_choice", "must be"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"functions": [{"name": "f"}], "tools": [{"type": "function", "function": {"name": "g"}}]}, "functions",
     "not both"),
    ({"function_call": {"name": "f"}}, "function_call", "goes with functions"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls[0]", "must be"),
    ({"messages": [{"role": "user", "content": "a", "tool_calls": [{"id": "1", "function": {"name": "f"}}]}]},
     "messages[0].tool_calls", "only assistant messages"),
])
def test_tool_fields_are_checked(body: dict, param: str, words: str) -> None:
    err = refusal(chat, **body)
    assert err.param == param and words in err.message, err.message


def test_a_long_refused_value_is_shortened() -> None:
    modalities = ["text", "x" * 100]
    err = refusal(chat, modalities=modalities)
    shown = err.message.removeprefix('modalities: only ["text"] is supported by tokenwire, got ')
    assert shown == repr(modalities)[:57] + "..." and len(shown) == 60
    assert _short("x" * 58) == repr("x" * 58)  # 60 characters with the quotes: kept whole
    assert _short("x" * 59) == "'" + "x" * 56 + "..."
    assert _short([1, 2], limit=5) == "[1..."


@pytest.mark.parametrize("field", ["foo", "prompt", "echo", "suffix", "best_of", "keep_alive"])
def test_chat_refuses_unknown_parameters(field: str) -> None:
    assert_refused(refusal(chat, **{field: 1}), field, f"Unrecognized request argument supplied: {field}",
                   "unsupported_parameter")


# ---- OpenAI completions -----------------------------------------------------------------------


def test_completion_maps_every_parameter() -> None:
    body = {"model": "m", "prompt": ["Once"], "max_tokens": 3, "stop": "x", "logprobs": 0, "user": "dan",
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "temperature": 2,
            "top_p": 1, "presence_penalty": 2, "frequency_penalty": -2, "seed": 2**64 + 1, "top_k": 1,
            "min_p": 0.5, "repetition_penalty": 1.5, "n": 1, "logit_bias": {}, "echo": False, "suffix": "",
            "best_of": 1}
    request, opts = parse_completion(body, "cmp-1")
    assert request == pb.GenerateRequest(
        request_id="cmp-1", model="m", prompt="Once", max_tokens=3, stop=["x"], include_logprobs=True,
        ignore_eos=True, user="dan",
        sampling=pb.SamplingParams(temperature=2, top_p=1, presence_penalty=2, frequency_penalty=-2, seed=1,
                                   top_k=1, min_p=0.5, repetition_penalty=1.5))
    assert opts == OpenAIOptions(model="m", stream=True, include_usage=True, logprobs=True, ignore_eos=True,
                                 user="dan")


def test_completion_minimal_defaults_to_16_tokens() -> None:
    assert COMPLETIONS_DEFAULT_MAX_TOKENS == 16
    request, opts = completion()
    assert request == pb.GenerateRequest(request_id="rid-2", prompt="Once", max_tokens=16,
                                         sampling=pb.SamplingParams())
    assert opts == OpenAIOptions(model="", stream=False, include_usage=False, logprobs=False, ignore_eos=False,
                                 user=None)
    assert completion(max_tokens=None)[0].max_tokens == 16
    assert completion(max_tokens=1)[0].max_tokens == 1
    assert completion(max_tokens=MAX_UINT32)[0].max_tokens == MAX_UINT32


def test_completion_max_tokens_bounds() -> None:
    assert_refused(refusal(completion, max_tokens=0), "max_tokens", "max_tokens must be >= 1, got 0")
    assert_refused(refusal(completion, max_tokens=MAX_UINT32 + 1), "max_tokens",
                   "max_tokens must be <= 4294967295, got 4294967296")


def test_completion_logprobs() -> None:
    assert completion(logprobs=None)[1].logprobs is False
    request, opts = completion(logprobs=0)
    assert request.include_logprobs and opts.logprobs is True
    assert_refused(refusal(completion, logprobs=-1), "logprobs", "logprobs must be >= 0, got -1")


@pytest.mark.parametrize("prompt", ["", "text", ["text"]])
def test_completion_prompt_is_one_string(prompt: Any) -> None:
    assert completion(prompt=prompt)[0].prompt == (prompt[0] if isinstance(prompt, list) else prompt)


@pytest.mark.parametrize("prompt", [None, ["a", "b"], [], [1, 2, 3], [[1, 2]], 5, {"text": "a"}])
def test_completion_refuses_other_prompts(prompt: Any) -> None:
    assert_refused(refusal(parse_completion, {"prompt": prompt}, "r"), "prompt",
                   "prompt must be a string (or an array holding one string); token-id prompts and batches are "
                   "not supported")


@pytest.mark.parametrize(("field", "value", "allowed"), [
    ("echo", True, "echo=false"), ("suffix", "end", "an empty suffix"), ("best_of", 2, "best_of=1"),

])
def test_completion_refuses_values_it_cannot_honour(field: str, value: Any, allowed: str) -> None:
    assert_refused(refusal(completion, **{field: value}), field,
                   f"{field}: only {allowed} is supported by tokenwire, got {value!r}", "unsupported_value")


def test_completion_best_of_must_be_an_integer() -> None:
    assert_refused(refusal(completion, best_of="1"), "best_of", "best_of must be an integer, got string")


@pytest.mark.parametrize("field", ["messages", "max_completion_tokens", "top_logprobs", "tools",
                                   "store", "keep_alive", "bogus"])
def test_completion_refuses_unknown_parameters(field: str) -> None:
    assert_refused(refusal(completion, **{field: 1}), field, f"Unrecognized request argument supplied: {field}",
                   "unsupported_parameter")


def test_think_and_enable_thinking_map_to_think() -> None:
    assert not chat()[0].HasField("think")
    assert chat(think=False)[0].think is False and chat(think=True)[0].think is True
    assert chat(chat_template_kwargs={"enable_thinking": False})[0].think is False
    assert chat(chat_template_kwargs={"enable_thinking": True}, think=True)[0].think is True
    assert not chat(chat_template_kwargs={})[0].HasField("think")
    for body, param, words in [
        ({"think": "no"}, "think", "must be true or false"),
        ({"chat_template_kwargs": {"add_vision_id": True}}, "chat_template_kwargs", "takes only enable_thinking"),
        ({"chat_template_kwargs": []}, "chat_template_kwargs", "takes only enable_thinking"),
        ({"chat_template_kwargs": {"enable_thinking": 1}}, "chat_template_kwargs.enable_thinking", "true or false"),
        ({"chat_template_kwargs": {"enable_thinking": True}, "think": False}, "think", "disagree"),
    ]:
        err = refusal(chat, **body)
        assert err.param == param and words in err.message, (body, err.message)


def test_a_tool_result_needs_a_string_call_id_and_only_results_keep_names() -> None:
    err = refusal(chat_messages, [{"role": "tool", "content": "x", "tool_call_id": 5}], tools=True)
    assert (err.param, err.message) == ("messages[0].tool_call_id",
                                        "messages[0].tool_call_id: a tool message names the call it answers")
    kept = chat_messages([{"role": "user", "content": "hi", "name": "ann"},
                          {"role": "tool", "content": "2", "tool_call_id": "c", "name": "f"}], tools=True)
    assert [m.name for m in kept] == ["", "f"]
