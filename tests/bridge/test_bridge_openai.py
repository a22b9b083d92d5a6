"""The OpenAI-compatible endpoints, driven by the official `openai` package against a real bridge."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from conftest import DEFAULT_FP32, DEFAULT_INT4, stop_spanning_tokens

from tokenwire.server.engine.tokenizer import TokenizerBundle
from tokenwire.v1 import inference_pb2 as pb

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The three primary colours are"


@pytest.fixture(scope="module")
def client(bridge) -> openai.OpenAI:
    return openai.OpenAI(base_url=bridge.url + "/v1", api_key="x", max_retries=0, timeout=120)


def grpc_generate(stub, max_tokens: int, sampling: pb.SamplingParams | None = None,
                  **kwargs) -> tuple[list[pb.TokenDelta], pb.Finished]:
    request = pb.GenerateRequest(sampling=sampling or pb.SamplingParams(temperature=0.0), max_tokens=max_tokens,
                                 **kwargs)
    tokens, finished = [], None
    for response in stub.Generate(request, timeout=120):
        if response.WhichOneof("event") == "token":
            tokens.append(response.token)
        elif response.WhichOneof("event") == "finished":
            finished = response.finished
    return tokens, finished


def grpc_greedy(stub, max_tokens: int, **kwargs) -> tuple[str, pb.Finished]:
    tokens, finished = grpc_generate(stub, max_tokens, **kwargs)
    return "".join(t.text for t in tokens), finished


def grpc_finish(finished: pb.Finished) -> str:
    return pb.FinishReason.Name(finished.reason).removeprefix("FINISH_REASON_").lower()


def test_models_list_and_retrieve(client) -> None:
    ids = [m.id for m in client.models.list()]
    assert {DEFAULT_INT4, DEFAULT_FP32} <= set(ids)
    assert ids[0] == DEFAULT_INT4, "the default model first (apps such as Open WebUI take the first)"
    assert client.models.retrieve(DEFAULT_FP32).id == DEFAULT_FP32
    assert client.models.retrieve("smollm2-135m").id == DEFAULT_INT4, "an alias names its model"
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("no-such-model")
    assert exc.value.body["code"] == "model_not_found"


def test_chat_non_streaming_matches_grpc(client, stub) -> None:
    expected, finished = grpc_greedy(stub, 24, messages=[pb.ChatMessage(**m) for m in MESSAGES])
    reply = client.chat.completions.create(model="smollm2-135m", messages=MESSAGES, max_tokens=24, temperature=0)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.model == DEFAULT_INT4, "the alias resolves to the model id"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason == grpc_finish(finished)
    assert reply.usage.prompt_tokens == finished.usage.prompt_tokens
    assert reply.usage.completion_tokens == finished.usage.completion_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # The gRPC call just before left this prompt's KV behind: all of it but the last token is reused.
    assert reply.usage.prompt_tokens_details.cached_tokens == reply.usage.prompt_tokens - 1


def test_chat_streaming_matches_grpc(client, stub) -> None:
    expected, finished = grpc_greedy(stub, 24, messages=[pb.ChatMessage(**m) for m in MESSAGES])
    stream = client.chat.completions.create(model="", messages=MESSAGES, max_completion_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].id.startswith("chatcmpl-") and chunks[0].model == DEFAULT_INT4, "empty model = the default"
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) >= max(3, finished.usage.completion_tokens - 1), "one chunk per token, not one at the end"
    assert "".join(c.choices[0].delta.content for c in content) == expected
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == grpc_finish(finished)
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == finished.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_match_grpc(client, stub) -> None:
    expected, finished = grpc_greedy(stub, 20, prompt=PROMPT)
    reply = client.completions.create(model=DEFAULT_INT4, prompt=PROMPT, max_tokens=20, temperature=0)
    assert reply.id.startswith("cmpl-") and reply.object == "text_completion"
    assert reply.choices[0].text == expected and reply.choices[0].finish_reason == grpc_finish(finished)
    assert reply.usage.completion_tokens == finished.usage.completion_tokens
    chunks = list(client.completions.create(model=DEFAULT_INT4, prompt=[PROMPT], max_tokens=20, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == grpc_finish(finished)


def test_completions_default_max_tokens_is_openais_16(client) -> None:
    reply = client.completions.create(model="", prompt="Count: one, two, three,", temperature=0,
                                      extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 16 and reply.choices[0].finish_reason == "length"


def test_logprobs(client, stub) -> None:
    expected, _ = grpc_generate(stub, 8, messages=[pb.ChatMessage(**m) for m in MESSAGES], include_logprobs=True)
    reply = client.chat.completions.create(model="", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True)
    entries = reply.choices[0].logprobs.content
    assert [e.token for e in entries] == [t.text for t in expected] and all(e.top_logprobs == [] for e in entries)
    # The server's logprobs, passed on (the prompt now comes from the prefix cache: equal within float noise).
    assert [e.logprob for e in entries] == pytest.approx([t.logprob for t in expected], abs=1e-4)
    assert min(e.logprob for e in entries) < -0.1
    assert "".join(e.token for e in entries) == reply.choices[0].message.content
    stream = client.chat.completions.create(model="", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True,
                                            top_logprobs=0, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    expected, _ = grpc_generate(stub, 6, prompt=PROMPT, include_logprobs=True)
    completion = client.completions.create(model="", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0)
    lp = completion.choices[0].logprobs
    assert "".join(lp.tokens) == completion.choices[0].text and len(lp.token_logprobs) == len(lp.tokens)
    assert lp.tokens == [t.text for t in expected]
    assert lp.token_logprobs == pytest.approx([t.logprob for t in expected], abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


# Seeded sampling; each value changes the tokens (checked below), so a parameter lost on the way shows.
SAMPLING = {"temperature": 1.0, "seed": 7}
OPENAI = {"top_p": 0.5, "presence_penalty": 2.0, "frequency_penalty": 0.5}  # OpenAI's own parameters
EXTRAS = {"top_k": 3, "min_p": 0.2, "repetition_penalty": 1.5}  # tokenwire's, in extra_body


def test_sampling_parameters_reach_the_server(client, stub) -> None:
    messages = [pb.ChatMessage(**m) for m in MESSAGES]

    def over_grpc(**extra) -> str:
        tokens, _ = grpc_generate(stub, 12, pb.SamplingParams(**SAMPLING, **extra), messages=messages, ignore_eos=True)
        return "".join(t.text for t in tokens)

    expected = {name: over_grpc(**{name: value}) for name, value in {**OPENAI, **EXTRAS}.items()}
    outputs = [over_grpc(), *expected.values()]
    assert len(set(outputs)) == len(outputs), "every value must change the tokens"
    for name, value in {**OPENAI, **EXTRAS}.items():
        given = {name: value, "extra_body": {"ignore_eos": True}} if name in OPENAI else {
            "extra_body": {name: value, "ignore_eos": True}}
        reply = client.chat.completions.create(model="", messages=MESSAGES, max_tokens=12, user="tester", **SAMPLING,
                                               **given)
        assert reply.choices[0].message.content == expected[name], name
    # The legacy completions endpoint takes them all at once.
    everything = {**OPENAI, **EXTRAS}
    tokens, _ = grpc_generate(stub, 12, pb.SamplingParams(**SAMPLING, **everything), prompt=PROMPT, ignore_eos=True)
    plain, _ = grpc_generate(stub, 12, pb.SamplingParams(**SAMPLING), prompt=PROMPT, ignore_eos=True)
    assert [t.token_id for t in tokens] != [t.token_id for t in plain]
    reply = client.completions.create(model="", prompt=PROMPT, max_tokens=12, **SAMPLING, **OPENAI,
                                      extra_body={**EXTRAS, "ignore_eos": True})
    assert reply.choices[0].text == "".join(t.text for t in tokens)


def test_stop_strings(client, stub, int4_dir: Path) -> None:
    tokens, _ = grpc_generate(stub, 16, messages=[pb.ChatMessage(**m) for m in MESSAGES])
    pieces = [t.text for t in tokens]
    stop, at = stop_spanning_tokens(pieces)
    assert len(TokenizerBundle(int4_dir).encode(stop)) >= 2, f"{stop!r} must span tokens"
    stopped = client.chat.completions.create(model="", messages=MESSAGES, max_tokens=16, temperature=0,
                                             stop=[stop, "zzz-never"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == "".join(pieces)[:at]


def test_openai_errors_come_as_sdk_exceptions(client) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="", messages=MESSAGES, n=9)
    assert exc.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="", prompt="x", echo=True)
    assert exc.value.body["param"] == "echo"
