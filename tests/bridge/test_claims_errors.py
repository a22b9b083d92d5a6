"""The bridge's gRPC → HTTP error table (bridge/errors.py) over real sockets, before and during a
stream, on /v1 and /api.

Two upstreams: a real server over a store of its own (the default model, linked in, beside a
model that cannot load), killed mid-stream at the end; and a scripted gRPC server in this process
for the statuses a healthy tokenwire server never sends (DEADLINE_EXCEEDED, CANCELLED, INTERNAL,
...), each behind a real bridge process.
"""

from __future__ import annotations

import asyncio
import json
import os
from concurrent import futures
from pathlib import Path

import aiohttp
import grpc
import pytest
from conftest import DEFAULT_INT4, start_bridge, start_server

from tokenwire.server.models.store import ModelStore
from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc

CHAT = "/v1/chat/completions"
BROKEN = "broken:int4"


def chat(model: str = "", stream: bool = False, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": stream,
            **extra}


async def read_stream(resp: aiohttp.ClientResponse, until=None) -> list:
    """The `data:` payloads of an SSE body (parsed JSON, or "[DONE]"), with `event:` names kept
    as {"event": name, "data": ...}; `until(items)` True stops early."""
    items, name = [], None
    while raw := await resp.content.readline():
        line = raw.decode().rstrip("\n")
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            text = line.split(":", 1)[1].strip()
            data = text if text == "[DONE]" else json.loads(text)
            items.append({"event": name, "data": data} if name else data)
            name = None
            if until is not None and until(items):
                break
    return items


def check_error(body: dict, status: int, code: str | None) -> dict:
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    expected_type = {429: "rate_limit_error", 499: "server_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error")
    assert error["type"] == expected_type, (status, error)
    assert error["code"] == code, error
    return error


# ---- a scripted upstream -------------------------------------------------------------------------

class Scripted(pb_grpc.InferenceServicer):
    """`model` says what to do: "abort:CODE" fails the call with CODE before any message;
    "mid:CODE" sends `started` and one token, then fails with CODE; "finish:REASON" sends them,
    then `finished` with that reason; "cut" sends them and ends the call without `finished`."""

    def Generate(self, request, context):  # noqa: N802
        how, _, arg = request.model.partition(":")
        if how == "abort":
            context.abort(grpc.StatusCode[arg], f"scripted {arg}")
        yield pb.GenerateResponse(started=pb.Started(model="scripted:v1", request_id=request.request_id))
        yield pb.GenerateResponse(token=pb.TokenDelta(text="Hello", token_id=1, index=0))
        if how == "mid":
            context.abort(grpc.StatusCode[arg], f"scripted {arg} mid-stream")
        if how == "finish":
            yield pb.GenerateResponse(finished=pb.Finished(
                reason=pb.FinishReason.Value(f"FINISH_REASON_{arg}"), error_message="scripted failure",
                model="scripted:v1", usage=pb.Usage(prompt_tokens=1, completion_tokens=1)))

    def ListModels(self, request, context):  # noqa: N802
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "scripted: the listing took too long")


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_InferenceServicer_to_server(Scripted(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    bridge = start_bridge(tmp_path_factory.mktemp("scripted"), f"127.0.0.1:{port}")
    yield bridge
    bridge.stop()
    server.stop(None)


# gRPC status → (HTTP status, OpenAI error code), as bridge/errors.py promises.
STATUSES = [
    ("DEADLINE_EXCEEDED", 504, "timeout"),
    ("CANCELLED", 499, "cancelled"),
    ("INTERNAL", 502, "upstream_error"),
    ("UNKNOWN", 502, "upstream_error"),
    ("DATA_LOSS", 502, "upstream_error"),
    ("UNAVAILABLE", 503, "server_unavailable"),
    ("FAILED_PRECONDITION", 503, "model_unavailable"),
    # Without an ErrorInfo reason RESOURCE_EXHAUSTED is a gRPC limit (a reply over the message size),
    # not the server's refusal: the server's own (QUEUE_FULL, MODEL_BUSY) are 429s, tested over the
    # real server in test_request_mapping.py.
    ("RESOURCE_EXHAUSTED", 502, "upstream_error"),
]


async def test_each_grpc_status_before_the_stream_is_its_http_status(scripted) -> None:
    async with aiohttp.ClientSession() as http:
        for code, status, err_code in STATUSES:
            for path, body in ((CHAT, chat(f"abort:{code}")), (CHAT, chat(f"abort:{code}", stream=True)),
                               ("/v1/completions", {"model": f"abort:{code}", "prompt": "Hi", "stream": True}),
                               ("/api/generate", {"model": f"abort:{code}", "prompt": "Hi"})):
                async with http.post(scripted.url + path, json=body) as resp:
                    where = (code, path, body.get("stream"))
                    assert resp.status == status, (where, await resp.text())
                    assert resp.content_type == "application/json", where
                    error = check_error(await resp.json(), status, err_code)
                    if status == 502:  # the server's failure by its status name (its text stays in its log)
                        assert error["message"].startswith("the model server failed") and code in error["message"], error
                    else:
                        assert f"scripted {code}" in error["message"], (where, error)
        async with http.get(scripted.url + "/v1/models") as resp:  # a unary call: the same table
            assert resp.status == 504, await resp.text()
            check_error(await resp.json(), 504, "timeout")
        async with http.get(scripted.url + "/healthz") as resp:
            assert resp.status == 200


@pytest.mark.parametrize(("code", "err_code"), [("INTERNAL", "upstream_error"), ("DEADLINE_EXCEEDED", "timeout"),
                                                ("CANCELLED", "cancelled")])
async def test_a_status_mid_stream_is_an_error_chunk_then_the_end(scripted, code, err_code) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(scripted.url + CHAT, json=chat(f"mid:{code}", stream=True)) as resp:
            assert resp.status == 200 and resp.content_type == "text/event-stream"
            items = await read_stream(resp)
        assert [c["choices"][0]["delta"].get("content") for c in items[:2]] == ["", "Hello"], items
        assert items[0]["model"] == "scripted:v1"
        assert len(items) == 3 and "[DONE]" not in items, f"the error chunk ends the stream: {items}"
        check_error(items[-1], 500, err_code)  # a mid-stream error has no HTTP status of its own
        async with http.post(scripted.url + "/api/generate", json={"model": f"mid:{code}", "prompt": "Hi"}) as resp:
            events = await read_stream(resp)
        assert [e["event"] for e in events] == ["started", "token", "error"], events
        check_error(events[-1]["data"], 500, err_code)
        # Not streaming: the same failure is the HTTP status of the whole answer.
        status = {"upstream_error": 502, "timeout": 504, "cancelled": 499}[err_code]
        async with http.post(scripted.url + CHAT, json=chat(f"mid:{code}")) as resp:
            assert resp.status == status, await resp.text()
            check_error(await resp.json(), status, err_code)


async def test_a_stream_cut_without_finish_or_ending_in_error_is_not_a_success(scripted) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(scripted.url + CHAT, json=chat("cut")) as resp:
            assert resp.status == 502
            error = check_error(await resp.json(), 502, "upstream_error")
            assert "without a finish event" in error["message"]
        async with http.post(scripted.url + CHAT, json=chat("cut", stream=True)) as resp:
            items = await read_stream(resp)
        assert "[DONE]" not in items and check_error(items[-1], 502, "upstream_error")
        # A generation the server ended with an error has no OpenAI finish reason.
        async with http.post(scripted.url + CHAT, json=chat("finish:ERROR")) as resp:
            assert resp.status == 500
            assert "scripted failure" in check_error(await resp.json(), 500, "generation_error")["message"]
        async with http.post(scripted.url + "/v1/completions",
                             json={"model": "finish:ERROR", "prompt": "Hi", "stream": True}) as resp:
            items = await read_stream(resp)
        assert [c["choices"][0]["text"] for c in items[:-1]] == ["Hello"], items
        check_error(items[-1], 500, "generation_error")
        async with http.post(scripted.url + CHAT, json=chat("finish:CANCELLED")) as resp:
            assert resp.status == 503
            check_error(await resp.json(), 503, "cancelled")
        async with http.post(scripted.url + CHAT, json=chat("finish:LENGTH")) as resp:  # the control
            assert resp.status == 200
            body = await resp.json()
            assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["message"]["content"] == "Hello"


# ---- a real server ---------------------------------------------------------------------------------

def link_model(src: Path, dest: Path, model_id: str | None = None, manifest: dict | None = None) -> Path:
    """A store folder whose files are links to `src`'s (no copy of the weights)."""
    dest.mkdir()
    for item in src.iterdir():
        if item.name != "tokenwire.json":
            os.symlink(item, dest / item.name)
    data = manifest or json.loads((src / "tokenwire.json").read_text())
    if model_id:
        data["id"] = model_id
    (dest / "tokenwire.json").write_text(json.dumps(data))
    return dest


@pytest.fixture(scope="module")
def real(models_dir, tmp_path_factory):
    """A server with the default model and a model whose graph is not ONNX (it fails when loaded),
    and a bridge. The last test kills the server."""
    tmp = tmp_path_factory.mktemp("real")
    store = tmp / "store"
    store.mkdir()
    int4 = ModelStore(models_dir).get(DEFAULT_INT4).path
    link_model(int4, store / "smollm2-135m_int4")
    manifest = json.loads((int4 / "tokenwire.json").read_text())
    del manifest["weight_files"]  # no sizes to catch it early: the load itself fails
    broken = link_model(int4, store / "broken_int4", BROKEN, manifest)
    for graph in ("model.onnx", "model_native.onnx"):
        (broken / graph).unlink()
        (broken / graph).write_bytes(b"this is not an onnx graph")
    server = start_server(tmp, store, "--metrics-port", "0")
    bridge = start_bridge(tmp, server.target)
    yield server, bridge
    bridge.stop()
    server.stop()


async def test_a_model_that_cannot_load_is_503_model_unavailable(real) -> None:
    _, bridge = real
    async with aiohttp.ClientSession() as http:
        for path, body in ((CHAT, chat(BROKEN)), (CHAT, chat(BROKEN, stream=True)),
                           ("/api/generate", {"model": BROKEN, "prompt": "Hi"})):
            async with http.post(bridge.url + path, json=body) as resp:
                assert resp.status == 503, (path, await resp.text())
                error = check_error(await resp.json(), 503, "model_unavailable")
                assert error["param"] == "model" and f"{BROKEN} failed to load" in error["message"], error
                assert "Retry-After" not in resp.headers
        async with http.get(bridge.url + "/api/models") as resp:
            models = {m["id"]: m for m in (await resp.json())["models"]}
        assert models[BROKEN]["state"] == "failed" and "failed to load" in models[BROKEN]["error_message"]
        # The other model of the store serves.
        async with http.post(bridge.url + CHAT, json=chat(DEFAULT_INT4)) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["model"] == DEFAULT_INT4


async def test_the_server_dying_mid_stream_ends_a_v1_stream_with_an_error_chunk(real) -> None:
    server, bridge = real
    body = chat(DEFAULT_INT4, stream=True, max_tokens=4000, ignore_eos=True)
    async with aiohttp.ClientSession() as http:
        async with http.post(bridge.url + CHAT, json=body) as resp:
            assert resp.status == 200
            head = await read_stream(resp, until=lambda items: len(items) >= 3)  # role, then content
            assert all("choices" in c for c in head), head
            server.proc.kill()
            rest = await asyncio.wait_for(read_stream(resp), 30)
        assert rest and "[DONE]" not in rest, rest[-3:]
        assert all("choices" in c for c in rest[:-1]) and not any(
            c["choices"][0]["finish_reason"] for c in head + rest[:-1]), "no finish reason for a cut stream"
        error = check_error(rest[-1], 503, "server_unavailable")
        assert server.target in error["message"], error
        # The bridge stays up and answers 503 while the server is down.
        async with http.get(bridge.url + "/healthz") as resp:
            assert resp.status == 200
        async with http.post(bridge.url + CHAT, json=chat(DEFAULT_INT4, stream=True)) as resp:
            assert resp.status == 503
            check_error(await resp.json(), 503, "server_unavailable")
