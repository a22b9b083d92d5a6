"""The bridge's SSE API (/api/*) end to end: real server, real bridge, real sockets, a real HTTP client."""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from conftest import DEFAULT_INT4, start_bridge, start_server, stop_spanning_tokens

from tokenwire.server.engine.tokenizer import TokenizerBundle
from tokenwire.v1 import inference_pb2 as pb

PROMPT = "The capital of France is"
USAGE_KEYS = {"prompt_tokens", "completion_tokens", "cached_prompt_tokens", "time_to_first_token_ms", "decode_tokens_per_second",
              "total_time_ms", "queue_time_ms"}


@dataclass
class SSE:
    """A parsed event stream: (event, data, arrival time) triples and the comments seen."""

    status: int
    headers: dict[str, str]
    events: list[tuple[str, dict, float]] = field(default_factory=list)
    comments: list[tuple[str, float]] = field(default_factory=list)

    def of(self, name: str) -> list[dict]:
        return [data for event, data, _ in self.events if event == name]


async def read_events(resp: aiohttp.ClientResponse, until=None) -> SSE:
    """Reads `event:`/`data:` blocks line by line, stamping each with its arrival time.
    `until(sse)` returning True stops early (the caller then closes the connection)."""
    sse = SSE(resp.status, dict(resp.headers))
    name, data = "message", []
    while True:
        raw = await resp.content.readline()
        if not raw:
            return sse
        line = raw.decode().rstrip("\n")
        if line.startswith(":"):
            sse.comments.append((line[1:].strip(), time.perf_counter()))
        elif line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data.append(line.split(":", 1)[1].strip())
        elif line == "" and data:
            sse.events.append((name, json.loads("\n".join(data)), time.perf_counter()))
            name, data = "message", []
            if until is not None and until(sse):
                return sse


async def generate(url: str, body: dict, headers: dict | None = None, until=None) -> SSE:
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/api/generate", json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            return await read_events(resp, until)


def grpc_tokens(stub, max_tokens: int, sampling: pb.SamplingParams | None = None, **kwargs) -> list[pb.TokenDelta]:
    request = pb.GenerateRequest(sampling=sampling or pb.SamplingParams(temperature=0.0), max_tokens=max_tokens,
                                 **kwargs)
    return [r.token for r in stub.Generate(request, timeout=120) if r.WhichOneof("event") == "token"]


def grpc_greedy_text(stub, max_tokens: int, **kwargs) -> str:
    return "".join(t.text for t in grpc_tokens(stub, max_tokens, **kwargs))


def ending(log: str, request_id: str) -> re.Match | None:
    """The server's log line for the end of a request: `request <id> ... generated=N ... finish=R`."""
    return re.search(rf"request {re.escape(request_id)} .*generated=(\d+) .*finish=(\w+)", log)


async def wait_for_ending(server, request_id: str, timeout: float = 20) -> re.Match:
    deadline = time.monotonic() + timeout
    while not (match := ending(server.log(), request_id)) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert match, f"no ending for {request_id} in the server log"
    return match


async def assert_cancelled_at_once(bridge, server, request_id: str, received: int) -> None:
    """The request's generation was cancelled, and promptly: a 32-token generation started after
    the client left (decoded in the same batch, step for step) ends after it."""
    probe_id = f"probe-{time.monotonic_ns()}"
    await generate(bridge.url, {"prompt": "Count to ten:", "max_tokens": 32, "temperature": 0, "ignore_eos": True},
                   headers={"X-Request-Id": probe_id})
    cancelled, probe = await wait_for_ending(server, request_id), await wait_for_ending(server, probe_id)
    assert cancelled.group(2) == "cancelled", cancelled.group(0)
    assert received <= int(cancelled.group(1)) and cancelled.start() < probe.start(), \
        f"the generation went on after the client left: {cancelled.group(0)}"


async def test_healthz_and_models(bridge, stub) -> None:
    grpc_greedy_text(stub, 1, prompt="Hi")  # the default model is loaded (and kept: --keep-alive is 5 minutes)
    async with aiohttp.ClientSession() as http:
        async with http.get(bridge.url + "/healthz") as resp:
            assert resp.status == 200 and await resp.json() == {"status": "ok"}
        async with http.get(bridge.url + "/api/models") as resp:
            assert resp.status == 200
            models = {m["id"]: m for m in (await resp.json())["models"]}
    int4 = models[DEFAULT_INT4]
    assert int4["is_default"] and "smollm2-135m" in int4["aliases"]
    assert int4["state"] == "loaded" and int4["loaded"] is True and int4["memory_bytes"] > 0
    # Every model's state as the server tells it (MODEL_STATE_AVAILABLE -> "available").
    served = {m.id: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
    assert {i: (m["state"], m["loaded"]) for i, m in models.items()} == {
        i: (pb.ModelState.Name(m.state).removeprefix("MODEL_STATE_").lower(), m.loaded) for i, m in served.items()}
    assert {"id", "architecture", "parameter_count", "precision", "context_length", "state",
            "loaded", "size_bytes", "is_default", "aliases", "error_message", "memory_bytes"} <= set(int4)
    assert int4["precision"] == "int4" and int4["size_bytes"] > 0 and int4["context_length"] > 0


async def test_tokens_stream_incrementally_with_usage(bridge, stub) -> None:
    sse = await generate(bridge.url, {"prompt": PROMPT, "max_tokens": 32, "temperature": 0})
    assert sse.headers["Content-Type"].startswith("text/event-stream")
    assert sse.headers["Cache-Control"] == "no-cache" and sse.headers["X-Accel-Buffering"] == "no"
    tokens = sse.of("token")
    assert [name for name, _, _ in sse.events][-1] == "done"
    done = sse.of("done")[0]
    assert done["finish_reason"] in ("stop", "length") and done["model"] == DEFAULT_INT4
    assert set(done["usage"]) == USAGE_KEYS
    # (a last event may carry text held back for a stop string; it has no token of its own)
    assert 8 <= done["usage"]["completion_tokens"] <= len(tokens) <= done["usage"]["completion_tokens"] + 1
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert all(isinstance(t["token_id"], int) and "logprob" not in t for t in tokens)
    # Same greedy text as asking the server directly.
    assert "".join(t["text"] for t in tokens) == grpc_greedy_text(stub, 32, prompt=PROMPT)
    # Incremental delivery: token arrivals spread over about as long as the server took to decode
    # them, rather than landing together at the end.
    arrivals = [at for name, _, at in sse.events if name == "token"]
    usage = done["usage"]
    decode_s = (usage["completion_tokens"] - 1) / usage["decode_tokens_per_second"]
    assert arrivals[-1] - arrivals[0] >= 0.5 * decode_s, (arrivals[-1] - arrivals[0], decode_s)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    mean_gap = decode_s / len(gaps)
    assert sum(g > 0.1 * mean_gap for g in gaps) >= len(gaps) // 3, "tokens came in bursts"


async def test_chat_messages_logprobs_and_stop(bridge, stub, int4_dir: Path) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]
    expected = grpc_tokens(stub, 24, messages=[pb.ChatMessage(**m) for m in messages], include_logprobs=True)
    first = await generate(bridge.url, {"messages": messages, "max_tokens": 24, "temperature": 0, "logprobs": True})
    tokens = first.of("token")
    assert [(t["token_id"], t["text"]) for t in tokens] == [(t.token_id, t.text) for t in expected]
    # The server's logprobs, passed on (the same prompt, now from the prefix cache: equal within float noise).
    assert [t["logprob"] for t in tokens] == pytest.approx([t.logprob for t in expected], abs=1e-4)
    assert min(t["logprob"] for t in tokens) < -0.1
    done = first.of("done")[0]
    assert done["usage"]["cached_prompt_tokens"] == done["usage"]["prompt_tokens"] - 1, "the gRPC call's prefix is reused"
    pieces = [t["text"] for t in tokens]
    stop, at = stop_spanning_tokens(pieces)
    assert len(TokenizerBundle(int4_dir).encode(stop)) >= 2, f"{stop!r} must span tokens"
    second = await generate(bridge.url, {"messages": messages, "max_tokens": 24, "temperature": 0, "stop": stop})
    done = second.of("done")[0]
    assert done["finish_reason"] == "stop" and done["matched_stop"] == stop
    assert "".join(t["text"] for t in second.of("token")) == "".join(pieces)[:at]


# Seeded sampling; each value changes the tokens (checked below), so a field lost on the way shows.
SAMPLING = {"temperature": 1.0, "seed": 7}
FIELDS = {"top_p": 0.5, "top_k": 3, "min_p": 0.2, "repetition_penalty": 1.5, "presence_penalty": 2.0,
          "frequency_penalty": 0.5}


async def test_sampling_fields_reach_the_server(bridge, stub) -> None:
    prompt = "Tell me about the moon."

    def over_grpc(seed: int, **extra) -> list[int]:
        sampling = pb.SamplingParams(**{**SAMPLING, "seed": seed}, **extra)
        return [t.token_id for t in grpc_tokens(stub, 12, sampling, prompt=prompt, ignore_eos=True)]

    # A seed under which every field's value gives tokens of its own (so a field the bridge dropped
    # or sent as another shows); which seed does depends on the CPU's float rounding, so a few are tried.
    for seed in range(SAMPLING["seed"], SAMPLING["seed"] + 8):
        expected = {name: over_grpc(seed, **{name: value}) for name, value in FIELDS.items()}
        outputs = [tuple(t) for t in (over_grpc(seed), *expected.values())]
        if len(set(outputs)) == len(outputs):
            break
    else:
        raise AssertionError(f"no seed made every value change the tokens: {outputs}")
    for name, value in FIELDS.items():
        sse = await generate(bridge.url, {"prompt": prompt, "max_tokens": 12, "ignore_eos": True, **SAMPLING,
                                          "seed": seed, name: value})
        assert [t["token_id"] for t in sse.of("token")] == expected[name], name


async def test_client_disconnect_cancels_server_generation(bridge, server) -> None:
    request_id = f"bridge-cancel-{time.monotonic_ns()}"
    sse = await generate(bridge.url, {"prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0},
                         headers={"X-Request-Id": request_id}, until=lambda s: len(s.of("token")) >= 3)
    assert len(sse.of("token")) == 3 and not sse.of("done")
    # Leaving the `async with` closed the connection: the bridge must cancel the gRPC call, and
    # the server logs the ending of the generation with its reason.
    await assert_cancelled_at_once(bridge, server, request_id, received=3)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_client_leaving_a_non_streaming_request_cancels_it_too(bridge, server, path) -> None:
    request_id = f"bridge-cancel-{time.monotonic_ns()}"
    body = {"max_tokens": 1000, "temperature": 0, "ignore_eos": True,
            **({"prompt": "Once upon a time"} if path == "/v1/completions" else
               {"messages": [{"role": "user", "content": "Tell me a long story."}]})}
    async with aiohttp.ClientSession() as http:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(http.post(bridge.url + path, json=body, headers={"X-Request-Id": request_id}), 1.5)
    await assert_cancelled_at_once(bridge, server, request_id, received=0)


async def test_errors_before_streaming_are_json(bridge) -> None:
    async with aiohttp.ClientSession() as http:
        for body, status, param in [
            ({"prompt": "hi", "model": "no-such-model"}, 404, "model"),
            ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
            ({"prompt": "hi", "top_k": "many"}, 400, "top_k"),
            ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, 400, "prompt"),
            ({"prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens"),
            ({"prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
        ]:
            async with http.post(bridge.url + "/api/generate", json=body) as resp:
                assert resp.status == status, (body, await resp.text())
                assert resp.content_type == "application/json"
                error = (await resp.json())["error"]
                assert error["param"] == param and error["message"] and error["type"], (body, error)


# ---- a server with one slot and one queue place: queued events, heartbeats, 429, a mid-stream failure ----


@pytest.fixture(scope="module")
def busy(models_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("busy")
    server = start_server(tmp, models_dir, "--max-running", "1", "--queue-size", "1")
    bridge = start_bridge(tmp, server.target, "--heartbeat-s", "0.2", "--retry-after-s", "3")
    yield server, bridge
    bridge.stop()
    server.stop()


async def test_queued_heartbeat_and_429(busy) -> None:
    server, bridge = busy
    long_body = {"prompt": "Once upon a time", "max_tokens": 2000, "temperature": 0}
    async with aiohttp.ClientSession() as http:
        running = await http.post(bridge.url + "/api/generate", json=long_body)
        first = await read_events(running, until=lambda s: bool(s.of("token")))
        assert first.of("token"), "the first request runs"
        waiting = await http.post(bridge.url + "/api/generate", json={**long_body, "max_tokens": 4})
        assert waiting.status == 200
        queued = await read_events(waiting, until=lambda s: bool(s.of("queued")))
        assert queued.of("queued") == [{"position": 1}]
        # While it waits, keep-alive comments come every ~0.2 s (the bridge's --heartbeat-s).
        start = time.perf_counter()
        while sum(c == "keep-alive" and at > start for c, at in queued.comments) < 3:
            line = await asyncio.wait_for(waiting.content.readline(), 5)
            if line.startswith(b":"):
                queued.comments.append((line[1:].decode().strip(), time.perf_counter()))
        # No slot and no queue place left: refused at once with 429 and a Retry-After.
        async with http.post(bridge.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}) as refused:
            assert refused.status == 429
            # the server's own retry-after trailer ("1" by default) wins over the bridge's --retry-after-s 3
            assert refused.headers["Retry-After"] == "1"
            error = (await refused.json())["error"]
            assert error["type"] == "rate_limit_error" and "busy" in error["message"]
        running.close()  # the client goes away: its slot frees and the queued request runs
        rest = await asyncio.wait_for(read_events(waiting), 120)
        assert rest.of("token") and rest.of("done")[0]["finish_reason"] in ("stop", "length")
        waiting.close()
    assert (await generate(bridge.url, {"prompt": "hi", "max_tokens": 2})).of("done")


async def test_server_dying_mid_stream_is_an_error_event(busy) -> None:
    server, bridge = busy
    async with aiohttp.ClientSession() as http:
        async with http.post(bridge.url + "/api/generate",
                             json={"prompt": "Once upon a time", "max_tokens": 2000}) as resp:
            await read_events(resp, until=lambda s: bool(s.of("token")))
            server.proc.kill()
            rest = await asyncio.wait_for(read_events(resp), 30)
    assert not rest.of("done")
    error = rest.of("error")[0]["error"]
    assert error["code"] and error["message"], error
    # The bridge stays up and reports the server as unreachable.
    async with aiohttp.ClientSession() as http:
        async with http.get(bridge.url + "/healthz") as resp:
            assert resp.status == 200
        async with http.post(bridge.url + "/api/generate", json={"prompt": "hi"}) as resp:
            assert resp.status == 503
            assert server.target in (await resp.json())["error"]["message"]
