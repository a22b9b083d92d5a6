"""Ollama's API on its own listener (--ollama-port), driven by the official `ollama` Python package
against the real server: chat and generate (streamed and not) with options, the model listing,
ps, show, version, load through an empty prompt, Ollama-shaped errors (an unknown model, options
and features it cannot honour), the OpenAI endpoints on the same port, and keys passed on."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import ollama
import pytest
from conftest import free_port, start_bridge

from tokenwire.v1 import inference_pb2 as pb

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def ollama_url(server, tmp_path_factory):
    port = free_port()
    bridge = start_bridge(tmp_path_factory.mktemp("ollama"), server.target, "--ollama-port", str(port))
    yield f"http://127.0.0.1:{port}"
    bridge.stop()


@pytest.fixture(scope="module")
def client(ollama_url) -> ollama.Client:
    return ollama.Client(host=ollama_url)


def grpc_generation(stub, messages: list[dict] | None = None, prompt: str | None = None,
                    n: int = 8) -> tuple[str, int]:
    """The same greedy generation over gRPC (text, tokens): what the Ollama answer must equal."""
    request = pb.GenerateRequest(model=MODEL, max_tokens=n, sampling=pb.SamplingParams(temperature=0.0))
    if messages is not None:
        request.messages.extend(pb.ChatMessage(**m) for m in messages)
    else:
        request.prompt = prompt or ""
    tokens = [r.token.text for r in stub.Generate(request, timeout=60) if r.HasField("token")]
    return "".join(tokens), len(tokens)


def grpc_text(stub, **kw) -> str:
    return grpc_generation(stub, **kw)[0]


def test_chat_streamed_and_whole_equal_the_grpc_generation(client, stub) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    expected, count = grpc_generation(stub, messages=messages)
    options = {"temperature": 0, "num_predict": 8, "num_ctx": 4096}  # num_ctx: accepted, changes nothing
    whole = client.chat(model=MODEL, messages=messages, options=options)
    assert whole.message.role == "assistant" and whole.message.content == expected
    assert whole.done and whole.done_reason in ("stop", "length") and whole.model == f"{MODEL}:int4"
    assert whole.eval_count == count and whole.prompt_eval_count > 10 and whole.total_duration > 0
    parts = list(client.chat(model=MODEL, messages=messages, options=options, stream=True))
    assert "".join(p.message.content for p in parts) == expected
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True] and parts[-1].eval_count == count


def test_generate_renders_the_template_unless_raw(client, stub) -> None:
    templated = grpc_text(stub, messages=[{"role": "user", "content": "Count: one, two,"}], n=6)
    raw = grpc_text(stub, prompt="Count: one, two,", n=6)
    options = {"temperature": 0, "num_predict": 6}
    assert client.generate(model=f"{MODEL}:latest", prompt="Count: one, two,", options=options).response == templated
    streamed = client.generate(model=MODEL, prompt="Count: one, two,", raw=True, options=options, stream=True)
    assert "".join(p.response for p in streamed) == raw
    stopped = client.generate(model=MODEL, prompt="Count: one, two,", raw=True,
                              options={**options, "num_predict": 30, "stop": [raw[2:4]]})
    assert stopped.response == raw[:2] and stopped.done_reason == "stop"


def test_listing_ps_show_version_and_load(client, ollama_url) -> None:
    models = client.list().models
    assert models[0].model == f"{MODEL}:int4", "the default model first"
    assert {m.model for m in models} >= {f"{MODEL}:int4", f"{MODEL}:fp32"}
    assert models[0].details.quantization_level == "int4" and models[0].details.parameter_size == "135M"
    loaded = client.generate(model=f"{MODEL}:fp32", prompt="", keep_alive="2m")  # an empty prompt loads
    assert loaded.done_reason == "load" and loaded.model == f"{MODEL}:fp32"
    running = {m.model: m for m in client.ps().models}
    assert f"{MODEL}:fp32" in running and running[f"{MODEL}:fp32"].size > 0
    shown = client.show(MODEL)
    assert shown.details.family == "llama" and shown.modelinfo["llama.context_length"] == 8192
    with urllib.request.urlopen(ollama_url + "/api/version") as r:
        assert json.load(r)["version"]
    with urllib.request.urlopen(ollama_url + "/") as r:
        assert r.read() == b"Ollama is running"
    with urllib.request.urlopen(ollama_url + "/v1/models") as r:  # OpenAI's API on Ollama's port, as Ollama does
        assert f"{MODEL}:int4" in {m["id"] for m in json.load(r)["data"]}


@pytest.mark.parametrize(("call", "status", "words"), [
    (dict(model="no-such-model"), 404, "no-such-model"),
    (dict(format={"type": "object", "not": {}}), 400, "not"),
    (dict(options={"mirostat": 2}), 400, "options.mirostat"),
    (dict(options={"temperature": -1}), 400, "options.temperature"),
    (dict(options={"warp_speed": 9}), 400, "warp_speed"),
    (dict(tools=[{"type": "function", "function": {"name": "a b", "parameters": {}}}]), 400, "tools[0].function.name"),
])
def test_refusals_are_ollama_errors(client, call, status, words) -> None:
    with pytest.raises(ollama.ResponseError) as refused:
        client.chat(**{"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **call})
    assert refused.value.status_code == status and words in refused.value.error


def test_the_error_body_is_ollamas_shape_and_curl_bodies_parse(ollama_url) -> None:
    # curl -d sends application/x-www-form-urlencoded; Ollama reads the body as JSON anyway.
    request = urllib.request.Request(ollama_url + "/api/chat", method="POST", data=json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False,
         "options": {"num_predict": 2}}).encode(), headers={"Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(request) as r:
        assert json.load(r)["done"] is True
    bad = urllib.request.Request(ollama_url + "/api/chat", method="POST", data=b"{not json")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(bad)
    body = json.load(refused.value)
    assert refused.value.code == 400 and isinstance(body["error"], str) and "JSON" in body["error"]
    for path, method in (("/api/create", "POST"), ("/api/copy", "POST"), ("/api/push", "POST")):
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(urllib.request.Request(ollama_url + path, method=method, data=b"{}"))
        assert missing.value.code == 501 and "tokenwire" in json.load(missing.value)["error"]
    for path, method in (("/api/pull", "POST"), ("/api/delete", "DELETE")):  # no model named: a 400 that says so
        with pytest.raises(urllib.error.HTTPError) as unnamed:
            urllib.request.urlopen(urllib.request.Request(ollama_url + path, method=method, data=b"{}"))
        assert unnamed.value.code == 400 and "model is required" in json.load(unnamed.value)["error"]


def test_a_foreign_host_is_refused(ollama_url) -> None:
    request = urllib.request.Request(ollama_url + "/api/tags", headers={"Host": "evil.example"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request)
    assert refused.value.code == 403


def test_embed_and_the_older_embeddings(client) -> None:
    reply = client.embed(model="all-minilm-l6-v2", input=["A man is playing a guitar.",
                                                            "Someone is playing an instrument.", "Taxes rose."])
    vectors = np.array(reply.embeddings)
    assert vectors.shape == (3, 384) and reply.prompt_eval_count > 0
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    older = client.embeddings(model="all-minilm-l6-v2", prompt="A man is playing a guitar.")
    assert np.allclose(older.embedding, vectors[0], atol=1e-6)
    assert client.show("all-minilm-l6-v2").capabilities == ["embedding"]


def test_format_json_and_a_schema_constrain_the_output(client) -> None:
    reply = client.chat(model=MODEL, messages=[{"role": "user", "content": "Describe a cat."}], format="json",
                        options={"temperature": 0, "num_predict": 200})
    assert isinstance(json.loads(reply.message.content), dict) and reply.done_reason == "stop"
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "legs": {"type": "integer", "minimum": 0, "maximum": 8}},
              "required": ["name", "legs"], "additionalProperties": False}
    generated = client.generate(model=MODEL, prompt="An animal as JSON:", format=schema,
                                options={"temperature": 0, "num_predict": 200})
    value = json.loads(generated.response)
    assert set(value) == {"name", "legs"} and 0 <= value["legs"] <= 8


def test_tools_and_their_results_reach_the_model(client) -> None:
    """Ollama has no tool_choice (the model decides): the tools and a call's result are in the prompt,
    and whatever the model answers, a call in it is one of the tools with object arguments."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                               "parameters": {"type": "object", "required": ["city"],
                                                              "properties": {"city": {"type": "string"}}}}}]
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    plain = client.chat(model=MODEL, messages=ask, options={"temperature": 0, "num_predict": 1})
    asked = client.chat(model=MODEL, messages=ask, tools=tools, options={"temperature": 0, "num_predict": 60})
    assert asked.prompt_eval_count > plain.prompt_eval_count + 80
    for call in asked.message.tool_calls or []:
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    history = [*ask, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "18 degrees, sunny"}]
    answered = client.chat(model=MODEL, messages=history, tools=tools, options={"temperature": 0, "num_predict": 5})
    assert answered.prompt_eval_count > asked.prompt_eval_count and answered.done


def test_a_finished_call_is_in_ollamas_shape() -> None:
    from tokenwire.bridge.ollama.routes import _Piece
    from tokenwire.v1 import inference_pb2 as pb

    finished = pb.Finished(reason=pb.FINISH_REASON_TOOL_CALLS, tool_calls=[
        pb.ToolCall(id="call_1", name="get_weather", arguments_json='{"city": "Paris"}')])
    body = _Piece(chat=True).last(MODEL, finished)
    assert body["message"]["tool_calls"] == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert body["done"] and body["done_reason"] == "stop"


def test_images_are_read_for_their_text(client) -> None:
    """Ollama's base64 `images` on a message: the server reads their text (OCR) for the model."""
    from images_drawn import text_image

    png = text_image(["Invoice number: 48213"])
    reply = client.chat(model="smollm2-135m", options={"temperature": 0, "num_predict": 24}, messages=[
        {"role": "user", "content": "What is the invoice number in the image? Answer with the number only.",
         "images": [png]}])
    assert "48213" in reply.message.content
    with pytest.raises(ollama.ResponseError) as exc:
        client.generate(model="smollm2-135m", prompt="x", images=[png], raw=True)
    assert exc.value.status_code == 400 and "images have no place in a raw prompt" in str(exc.value)
