"""The gRPC server end to end, over a real socket on 127.0.0.1, with the real default model."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import DEFAULT_FP32, DEFAULT_INT4, start_server, stop_spanning_tokens
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tokenwire.server.engine.graph import open_engine
from tokenwire.server.engine.sampling import log_softmax
from tokenwire.server.engine.tokenizer import TokenizerBundle
from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc


def greedy(max_tokens: int = 24, **kwargs) -> pb.GenerateRequest:
    return pb.GenerateRequest(sampling=pb.SamplingParams(temperature=0.0), max_tokens=max_tokens, **kwargs)


def collect(stub, request, timeout: float = 120) -> tuple[list[pb.TokenDelta], pb.Finished, list[float]]:
    tokens, arrivals, finished = [], [], None
    for response in stub.Generate(request, timeout=timeout):
        kind = response.WhichOneof("event")
        if kind == "token":
            tokens.append(response.token)
            arrivals.append(time.perf_counter())
        elif kind == "finished":
            finished = response.finished
    assert finished is not None, "every stream ends with a finished event"
    return tokens, finished, arrivals


def text_of(tokens) -> str:
    return "".join(t.text for t in tokens)


def test_health_and_reflection(channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
    reply = health.Check(health_pb2.HealthCheckRequest(service="tokenwire.v1.Inference"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"tokenwire.v1.Inference", "grpc.health.v1.Health"} <= names


def test_list_models_describes_both_variants(stub) -> None:
    collect(stub, greedy(1, prompt="Hi"))  # the default model is loaded (and kept: --keep-alive is 5 minutes)
    models = {m.id: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert {DEFAULT_FP32, DEFAULT_INT4} <= set(models)
    int4, fp32 = models[DEFAULT_INT4], models[DEFAULT_FP32]
    assert int4.architecture == "llama" and int4.context_length == 8192
    assert int4.parameter_count > 100_000_000
    assert (int4.precision, fp32.precision) == ("int4", "fp32")
    assert 0 < int4.size_bytes < fp32.size_bytes
    assert int4.is_default and "smollm2-135m" in int4.aliases, "int4 passed the quality gate, so it is the default"
    assert int4.state == pb.MODEL_STATE_LOADED and int4.loaded and int4.memory_bytes > 0


def test_tokens_stream_as_they_are_made(stub) -> None:
    tokens, finished, arrivals = collect(stub, greedy(64, prompt="Once upon a time, in a small village by the sea,"))
    assert finished.reason == pb.FINISH_REASON_LENGTH and len(tokens) == 64
    assert finished.usage.completion_tokens == 64 and finished.usage.prompt_tokens > 5
    assert finished.usage.time_to_first_token_ms > 0 and finished.usage.decode_tokens_per_second > 0
    assert [t.index for t in tokens] == list(range(64))
    spread = arrivals[-1] - arrivals[0]
    decode_s = (finished.usage.total_time_ms - finished.usage.time_to_first_token_ms) / 1000
    # Buffered output would arrive in one burst at the end: the spread would be ~0.
    assert spread > 0.5 * decode_s, f"tokens arrived within {spread:.3f}s of a {decode_s:.3f}s generation"
    gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:], strict=False))
    assert gaps[len(gaps) // 2] > 0.2 * decode_s / 64


def test_list_models_answers_during_a_long_generation(stub) -> None:
    first_token = threading.Event()
    done = threading.Event()

    def long_generation() -> None:
        for response in stub.Generate(greedy(200, prompt="Write a long essay about rivers."), timeout=120):
            if response.WhichOneof("event") == "token":
                first_token.set()
        done.set()

    thread = threading.Thread(target=long_generation)
    thread.start()
    assert first_token.wait(60)
    started = time.perf_counter()
    stub.ListModels(pb.ListModelsRequest(), timeout=5)
    elapsed = time.perf_counter() - started
    assert not done.is_set(), "the generation should still be running"
    assert elapsed < 1.0
    thread.join()


def test_chat_messages_use_the_chat_template(stub) -> None:
    request = greedy(24, messages=[pb.ChatMessage(role="user", content="What is the capital of France?")],
                     model=DEFAULT_FP32)
    tokens, finished, _ = collect(stub, request)
    assert "Paris" in text_of(tokens)
    assert finished.reason == pb.FINISH_REASON_STOP, "the chat stop token <|im_end|> ends the reply"
    assert finished.model == DEFAULT_FP32


def test_stop_string_spanning_tokens_is_caught(int4_dir: Path, stub) -> None:
    request = greedy(40, messages=[pb.ChatMessage(role="user", content="Write a short story about a cat.")])
    tokens, first, _ = collect(stub, request)
    full = text_of(tokens)
    stop, at = stop_spanning_tokens([t.text for t in tokens])
    assert len(TokenizerBundle(int4_dir).encode(stop)) >= 2, f"{stop!r} must span tokens for this test to mean anything"
    request.stop.append(stop)
    stopped, finished, _ = collect(stub, request)
    assert finished.reason == pb.FINISH_REASON_STOP and finished.matched_stop == stop
    # Not a character of the stop string is sent, though its first token came before the match.
    assert text_of(stopped) == full[:at] and full[:at].endswith(" ")
    # The same prompt again: its KV was kept, all but the last prompt token is reused.
    assert first.usage.prompt_tokens == finished.usage.prompt_tokens
    assert finished.usage.cached_prompt_tokens == finished.usage.prompt_tokens - 1


def test_unicode_round_trips_through_the_stream(stub) -> None:
    prompt = "Input: 🚀🚀🚀\nOutput: 🚀🚀🚀\nInput: 🔥 café\nOutput: 🔥 café\nInput: 🌊 naïve\nOutput:"
    tokens, _, _ = collect(stub, greedy(12, prompt=prompt))
    text = text_of(tokens)
    assert "\ufffd" not in text and all("\ufffd" not in t.text for t in tokens)
    assert "🌊" in text and "naïve" in text
    tokens, _, _ = collect(stub, greedy(12, prompt="Chinese: 你好世界。你好世界。你好世界。你好"))
    assert "\ufffd" not in text_of(tokens) and re.search(r"[\u4e00-\u9fff]", text_of(tokens))


def test_same_seed_same_text(stub) -> None:
    def sampled(seed: int) -> str:
        request = pb.GenerateRequest(prompt="My favourite food is", max_tokens=24,
                                     sampling=pb.SamplingParams(temperature=1.0, top_p=0.95, seed=seed))
        return text_of(collect(stub, request)[0])

    assert sampled(11) == sampled(11)
    assert sampled(11) != sampled(12)


def reference_greedy(folder: Path, prompt: str, steps: int) -> list[tuple[int, float]]:
    """(token, logprob) of greedy decoding, from the model's own logits and log_softmax."""
    engine, _ = open_engine(folder, context_length=64)  # the engine and kernels the server picks
    state = engine.new_prefill()
    logits = engine.prefill(state, TokenizerBundle(folder).encode(prompt)).copy()  # the engine reuses its buffers
    engine.join(state)
    out = []
    for _ in range(steps):
        logprobs = log_softmax(logits.astype(np.float32))
        token = int(np.argmax(logprobs))
        out.append((token, float(logprobs[token])))
        logits = engine.step([token])[0].copy()
    return out


def test_logprobs_only_when_asked(stub, int4_dir: Path) -> None:
    tokens, _, _ = collect(stub, greedy(6, prompt="Hello", include_logprobs=True))
    assert all(t.HasField("logprob") for t in tokens)
    expected = reference_greedy(int4_dir, "Hello", 6)
    assert [t.token_id for t in tokens] == [token for token, _ in expected]
    assert [t.logprob for t in tokens] == pytest.approx([lp for _, lp in expected], abs=1e-3)
    assert min(lp for _, lp in expected) < -0.5, "logprobs far from 0, so a constant 0 would not pass"
    tokens, _, _ = collect(stub, greedy(6, prompt="Hello"))
    assert not any(t.HasField("logprob") for t in tokens)


BAD_REQUESTS = [
    (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "empty prompt"),
    (pb.GenerateRequest(prompt="x", messages=[pb.ChatMessage(role="user", content="y")]),
     grpc.StatusCode.INVALID_ARGUMENT, "not both"),
    (pb.GenerateRequest(prompt="hi", model="no-such-model"), grpc.StatusCode.NOT_FOUND, "smollm2-135m:int4"),
    (pb.GenerateRequest(prompt="hello " * 9000), grpc.StatusCode.INVALID_ARGUMENT, "context window"),
    (pb.GenerateRequest(prompt="hi", max_tokens=9000), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens 9000"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(temperature=-1)),
     grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(top_p=0)), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(top_p=1.5)),
     grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="robot", content="hi")]),
     grpc.StatusCode.INVALID_ARGUMENT, "role"),
    (pb.GenerateRequest(prompt="x" * (2 << 20)), grpc.StatusCode.INVALID_ARGUMENT, "at most"),
    (pb.GenerateRequest(prompt="x" * (5 << 20)), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
]


@pytest.mark.parametrize("request_, code, message", BAD_REQUESTS, ids=[m for _, _, m in BAD_REQUESTS])
def test_bad_input_gets_a_status_and_a_message(stub, request_, code, message) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request_, timeout=60))
    assert info.value.code() == code
    assert message in info.value.details()
    # ...and the server keeps serving.
    tokens, finished, _ = collect(stub, greedy(2, prompt="Hi"))
    assert finished.reason == pb.FINISH_REASON_LENGTH and len(tokens) == 2


def test_cancelling_a_call_stops_its_generation(models_dir, tmp_path) -> None:
    """With one generation slot, a cancelled call must free it within a step: the next call starts at once."""
    server = start_server(tmp_path, models_dir, "--max-running", "1")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            collect(stub, greedy(1, prompt="warm up"))  # load the model
            call = stub.Generate(greedy(2000, prompt="Write a very long story."), timeout=300)
            received = 0
            for response in call:
                if response.WhichOneof("event") == "token":
                    received += 1
                    if received == 3:
                        break
            call.cancel()
            started = time.perf_counter()
            tokens, finished, arrivals = collect(stub, greedy(4, prompt="Hello"))
            assert finished.reason == pb.FINISH_REASON_LENGTH
            assert arrivals[0] - started < 5.0, "the cancelled generation kept the only slot"
            assert finished.usage.queue_time_ms < 3000
        deadline = time.monotonic() + 10
        while "finish=cancelled" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        line = next(ln for ln in server.log().splitlines() if "finish=cancelled" in ln)
        generated = int(re.search(r"generated=(\d+)", line).group(1))
        assert generated < 100, f"generation went on after the cancel: {line}"
    finally:
        server.stop()
