"""The model manager: limits and LRU eviction, single-flight loading, keep-alive, unload while
streaming, hot add/remove of model folders. Tiny random-init models (tests/tiny_models.py) in a
store of their own; servers over real sockets, plus the eviction policy in-process."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import cli, start_server

from tokenwire.server.build.smoke_test import greedy_with_cache
from tokenwire.server.engine.optimum_engine import OptimumEngine
from tokenwire.server.engine.tokenizer import TokenizerBundle
from tokenwire.server.models.manager import ModelBusy, ModelLimits, ModelManager, ModelTooLarge
from tokenwire.server.models.store import ModelStore
from tokenwire.v1 import inference_pb2 as pb
from tokenwire.v1 import inference_pb2_grpc as pb_grpc

LLAMA, QWEN, GPT2 = "tiny-llama:fp32", "tiny-qwen2:fp32", "tiny-gpt2:fp32"
PROMPT = "Hello there, how are you doing today?"
N_TOKENS = 8


def copy_model(src: Path, root: Path, model_id: str | None = None, manifest: bool = True) -> Path:
    """Copies a model folder into a store, optionally under another id (or with no manifest)."""
    dest = root / (model_id.replace(":", "_") if model_id else src.name)
    shutil.copytree(src, dest)
    if not manifest:
        (dest / "tokenwire.json").unlink()
    elif model_id:
        data = json.loads((dest / "tokenwire.json").read_text())
        data["id"] = model_id
        (dest / "tokenwire.json").write_text(json.dumps(data))
    return dest


def generate(stub, model: str, n: int = N_TOKENS, **fields) -> tuple[list[int], pb.Finished]:
    request = pb.GenerateRequest(model=model, prompt=PROMPT, max_tokens=n, ignore_eos=True,
                                 sampling=pb.SamplingParams(temperature=0.0), **fields)
    tokens, finished = [], None
    for response in stub.Generate(request, timeout=120):
        if response.HasField("token"):
            tokens.append(response.token.token_id)
        elif response.HasField("finished"):
            finished = response.finished
    return tokens, finished


def listing(stub) -> tuple[dict[str, pb.ModelInfo], pb.ListModelsResponse]:
    reply = stub.ListModels(pb.ListModelsRequest(), timeout=30)
    return {m.id: m for m in reply.models}, reply


def wait_for_state(stub, model: str, state: int, timeout: float = 15) -> pb.ModelInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = listing(stub)[0][model]
        if info.state == state or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_models) -> Path:
    root = tmp_path_factory.mktemp("manager-store")
    for arch in ("llama", "qwen2", "gpt2"):
        copy_model(tiny_models[arch], root)
    return root


@pytest.fixture(scope="module")
def references(tiny_models) -> dict[str, list[int]]:
    """Greedy tokens of each tiny model, decoded in this process without the server."""
    refs = {}
    for arch, model_id in (("llama", LLAMA), ("qwen2", QWEN), ("gpt2", GPT2)):
        folder = tiny_models[arch]
        ids = TokenizerBundle(folder).encode(PROMPT)
        refs[model_id], _ = greedy_with_cache(OptimumEngine(folder / "model.onnx"), ids, N_TOKENS)
    return refs


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory):
    """A server that may hold one model at a time."""
    proc = start_server(tmp_path_factory.mktemp("manager-server"), store, "--max-loaded-models", "1",
                        "--metrics-port", "0")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def mstub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.InferenceStub(channel)


# ---- over gRPC ---------------------------------------------------------------------------------

def test_budget_of_one_model_alternates_and_both_answer(mstub, references) -> None:
    before = {m: info.load_count for m, info in listing(mstub)[0].items()}
    memory_seen = {}
    for model in (LLAMA, QWEN, LLAMA, QWEN):
        tokens, finished = generate(mstub, model)
        assert tokens == references[model], f"{model} answered differently from its own greedy decode"
        assert finished.model == model
        models, reply = listing(mstub)
        other = QWEN if model == LLAMA else LLAMA
        assert models[model].state == pb.MODEL_STATE_LOADED and models[model].memory_bytes > 0
        assert models[other].state == pb.MODEL_STATE_AVAILABLE, "the other model must have been unloaded"
        assert models[other].memory_bytes == 0 and models[other].kv_cache_bytes == 0
        assert reply.memory_in_use_bytes == models[model].memory_bytes
        assert reply.max_loaded_models == 1
        assert models[model].last_used_unix_ms > 0 and models[model].load_time_ms > 0
        memory_seen[model] = models[model].memory_bytes
    after = listing(mstub)[0]
    assert after[LLAMA].load_count - before[LLAMA] == 2
    assert after[QWEN].load_count - before[QWEN] == 2
    # Memory is measured at load: at least the weights (a tiny model's graph is ~25 MB).
    assert all(m > 20e6 for m in memory_seen.values()), memory_seen


def test_eight_concurrent_first_requests_load_once(mstub, references) -> None:
    mstub.UnloadModel(pb.UnloadModelRequest(model=GPT2), timeout=60)
    assert listing(mstub)[0][GPT2].state == pb.MODEL_STATE_AVAILABLE
    before = listing(mstub)[0][GPT2].load_count
    barrier = threading.Barrier(8)
    results: list = [None] * 8

    def one(i: int) -> None:
        barrier.wait()
        results[i] = generate(mstub, GPT2)[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r == references[GPT2] for r in results)
    assert listing(mstub)[0][GPT2].load_count == before + 1, "8 concurrent first requests must share one load"


def test_unload_while_streaming_lets_the_stream_finish(mstub, references, server) -> None:
    n = 400
    stream = mstub.Generate(pb.GenerateRequest(model=LLAMA, prompt=PROMPT, max_tokens=n, ignore_eos=True,
                                               sampling=pb.SamplingParams(temperature=0.0)), timeout=120)
    tokens = []
    for response in stream:  # wait until it streams
        if response.HasField("token"):
            tokens.append(response.token.token_id)
            break
    memory_loaded = listing(mstub)[1].memory_in_use_bytes
    assert memory_loaded > 0
    unload: dict = {}
    worker = threading.Thread(target=lambda: unload.setdefault(
        "reply", mstub.UnloadModel(pb.UnloadModelRequest(model=LLAMA), timeout=120)))
    worker.start()
    finished = None
    for response in stream:
        if response.HasField("token"):
            tokens.append(response.token.token_id)
        elif response.HasField("finished"):
            finished = response.finished
    worker.join(120)
    assert finished is not None and finished.reason == pb.FINISH_REASON_LENGTH, finished
    assert len(tokens) == n and tokens[:N_TOKENS] == references[LLAMA]
    reply = unload["reply"]
    assert reply.was_loaded and reply.drain_ms > 0, "the unload must have waited for the stream"
    assert reply.model.state == pb.MODEL_STATE_AVAILABLE
    models, after = listing(mstub)
    assert models[LLAMA].state == pb.MODEL_STATE_AVAILABLE and models[LLAMA].memory_bytes == 0
    assert after.memory_in_use_bytes < memory_loaded, "memory reported must go down after an unload"
    # The model loads again on the next request.
    assert generate(mstub, LLAMA)[0] == references[LLAMA]


def test_keep_alive_zero_unloads_right_after_the_request(mstub, references) -> None:
    tokens, _ = generate(mstub, QWEN, keep_alive_s=0)
    assert tokens == references[QWEN]
    info = wait_for_state(mstub, QWEN, pb.MODEL_STATE_AVAILABLE)
    assert info.state == pb.MODEL_STATE_AVAILABLE and info.memory_bytes == 0


def test_short_keep_alive_expires(mstub) -> None:
    generate(mstub, QWEN, keep_alive_s=1.0)
    info = listing(mstub)[0][QWEN]
    assert info.state == pb.MODEL_STATE_LOADED
    assert info.expires_unix_ms > 0 and info.expires_unix_ms / 1000 - time.time() < 2
    assert wait_for_state(mstub, QWEN, pb.MODEL_STATE_AVAILABLE).state == pb.MODEL_STATE_AVAILABLE


def test_load_model_streams_progress_until_ready(mstub) -> None:
    mstub.UnloadModel(pb.UnloadModelRequest(model=GPT2), timeout=60)
    events = list(mstub.LoadModel(pb.LoadModelRequest(model=GPT2, keep_alive_s=-1), timeout=120))
    stages = [e.stage for e in events]
    assert pb.LOAD_STAGE_LOADING in stages and stages[-1] == pb.LOAD_STAGE_READY
    assert all(e.message for e in events)
    ready = events[-1].model
    assert ready.id == GPT2 and ready.state == pb.MODEL_STATE_LOADED and ready.memory_bytes > 0
    assert ready.expires_unix_ms == 0, "keep_alive_s < 0 keeps it loaded until unloaded"
    again = list(mstub.LoadModel(pb.LoadModelRequest(model=GPT2), timeout=60))
    assert [e.stage for e in again] == [pb.LOAD_STAGE_READY], "an already loaded model is ready at once"
    with pytest.raises(grpc.RpcError) as err:
        list(mstub.LoadModel(pb.LoadModelRequest(model="no-such-model"), timeout=30))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert LLAMA in err.value.details() and QWEN in err.value.details()


def test_ps_shows_loaded_models_and_memory(server, mstub) -> None:
    list(mstub.LoadModel(pb.LoadModelRequest(model=GPT2), timeout=120))
    proc = subprocess.run(cli("ps", "--server", server.target), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith(GPT2))
    assert "loaded" in line and "MB" in line
    assert "at most 1" in proc.stdout
    data = json.loads(subprocess.run(cli("ps", "--json", "--server", server.target), capture_output=True,
                                     text=True, timeout=60).stdout)
    assert [m["id"] for m in data["models"]] == [GPT2] and int(data["models"][0]["memory_bytes"]) > 0


def test_hot_add_remove_and_a_corrupt_model(mstub, store, tiny_models, references) -> None:
    ids = set(listing(mstub)[0])
    added = copy_model(tiny_models["llama"], store, "tiny-copy:fp32")
    dropped = copy_model(tiny_models["qwen2"], store, "dropped-in-qwen", manifest=False)
    broken = copy_model(tiny_models["gpt2"], store, "tiny-broken:fp32")
    graph = broken / "model.onnx"
    with open(graph, "r+b") as f:
        f.truncate(graph.stat().st_size // 2)
    models = listing(mstub)[0]
    assert set(models) == ids | {"tiny-copy:fp32", "dropped-in-qwen", "tiny-broken:fp32"}, "no restart needed"
    assert models["tiny-copy:fp32"].state == pb.MODEL_STATE_AVAILABLE
    assert models["dropped-in-qwen"].state == pb.MODEL_STATE_AVAILABLE
    assert models["dropped-in-qwen"].architecture == "qwen2"
    assert models["tiny-broken:fp32"].state == pb.MODEL_STATE_FAILED
    assert "truncated" in models["tiny-broken:fp32"].error_message
    with pytest.raises(grpc.RpcError) as err:
        generate(mstub, "tiny-broken:fp32")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "truncated" in err.value.details()
    # The others still work, the copies included.
    assert generate(mstub, "tiny-copy:fp32")[0] == references[LLAMA]
    assert generate(mstub, "dropped-in-qwen")[0] == references[QWEN]
    assert generate(mstub, GPT2)[0] == references[GPT2]
    for folder in (added, dropped, broken):
        shutil.rmtree(folder)
    assert set(listing(mstub)[0]) == ids


def test_a_model_that_fails_to_load_is_failed_and_the_rest_serve(mstub, store, tiny_models, references) -> None:
    """No size in the manifest to catch it early: the load itself fails."""
    broken = copy_model(tiny_models["llama"], store, "tiny-unloadable:fp32")
    data = json.loads((broken / "tokenwire.json").read_text())
    del data["weight_files"]
    (broken / "tokenwire.json").write_text(json.dumps(data))
    (broken / "model.onnx").write_bytes(b"this is not an onnx graph")
    try:
        assert listing(mstub)[0]["tiny-unloadable:fp32"].state == pb.MODEL_STATE_AVAILABLE
        with pytest.raises(grpc.RpcError) as err:
            generate(mstub, "tiny-unloadable:fp32")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "tiny-unloadable:fp32 failed to load" in err.value.details()
        info = listing(mstub)[0]["tiny-unloadable:fp32"]
        assert info.state == pb.MODEL_STATE_FAILED and "failed to load" in info.error_message
        assert generate(mstub, QWEN)[0] == references[QWEN]
    finally:
        shutil.rmtree(broken)


def test_a_model_larger_than_the_budget_is_refused(store, tmp_path) -> None:
    proc = start_server(tmp_path, store, "--memory-budget-bytes", "1M", "--metrics-port", "0")
    try:
        with grpc.insecure_channel(proc.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                generate(stub, LLAMA)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "memory budget" in err.value.details()
            assert listing(stub)[1].memory_budget_bytes == 1 << 20
    finally:
        proc.stop()


# ---- the eviction policy, in-process ------------------------------------------------------------

@pytest.fixture
def three_store(tmp_path, tiny_models) -> Path:
    for name in ("a", "b", "c"):
        copy_model(tiny_models["llama"], tmp_path, f"{name}:fp32")
    return tmp_path


def manager_for(store: Path, **limits) -> ModelManager:
    manager = ModelManager(ModelStore(store), limits=ModelLimits(**limits))
    manager.rss = lambda: 0  # resident = the weights exactly: sizes below are deterministic
    return manager


def test_memory_budget_evicts_the_least_recently_used_idle_model(three_store) -> None:
    w = sum(p.stat().st_size for p in (three_store / "a_fp32").glob("model.onnx*"))
    # Room for two models (w each), not for two and a third's first estimate (1.5 w).
    manager = manager_for(three_store, max_loaded=0, memory_budget_bytes=int(3.4 * w))
    try:
        manager.get("a:fp32")
        manager.get("b:fp32")
        assert sorted(manager.loaded_ids()) == ["a:fp32", "b:fp32"]
        manager.get("a:fp32")  # a is now more recently used than b
        manager.get("c:fp32")
        assert sorted(manager.loaded_ids()) == ["a:fp32", "c:fp32"], "b was the least recently used"
        assert manager.memory_in_use() <= 3.4 * w
        assert manager.status("b:fp32").memory_bytes == 0
        assert manager.load_count == {"a:fp32": 1, "b:fp32": 1, "c:fp32": 1}
    finally:
        manager.close()


def test_a_busy_model_is_never_evicted(three_store) -> None:
    manager = manager_for(three_store, max_loaded=1, room_wait_s=0.3)
    try:
        a = manager.acquire("a:fp32")  # a request holds it
        with pytest.raises(ModelBusy, match="busy"):
            manager.acquire("b:fp32")
        assert manager.loaded_ids() == ["a:fp32"]
        manager.release(a)
        b = manager.acquire("b:fp32")
        assert manager.loaded_ids() == ["b:fp32"]
        manager.release(b)
    finally:
        manager.close()


def test_a_load_waits_for_a_busy_model_to_finish(three_store) -> None:
    manager = manager_for(three_store, max_loaded=1, room_wait_s=30)
    try:
        a = manager.acquire("a:fp32")
        threading.Timer(0.3, manager.release, args=(a,)).start()
        started = time.monotonic()
        b = manager.acquire("b:fp32")
        assert time.monotonic() - started >= 0.25 and manager.loaded_ids() == ["b:fp32"]
        manager.release(b)
    finally:
        manager.close()


def test_a_model_alone_over_the_budget_is_too_large(three_store) -> None:
    manager = manager_for(three_store, memory_budget_bytes=1000)
    try:
        with pytest.raises(ModelTooLarge, match="memory budget"):
            manager.get("a:fp32")
        assert manager.state("a:fp32")[0] == "failed"
    finally:
        manager.close()


def test_kv_is_counted_in_the_memory_budget(three_store) -> None:
    """What a model's scheduler may admit is the budget less every loaded model's weights and the
    other models' KV: the manager gives each scheduler that room (KVRoom), and none without a budget."""
    w = sum(p.stat().st_size for p in (three_store / "a_fp32").glob("model.onnx*"))
    budget = int(3.4 * w)
    manager = manager_for(three_store, max_loaded=0, memory_budget_bytes=budget)
    unlimited = manager_for(three_store)
    try:
        a, b = manager.get("a:fp32"), manager.get("b:fp32")
        weights = a.resident_bytes + b.resident_bytes
        assert a.scheduler.kv_room() == budget - weights - b.kv_bytes
        b.scheduler.prefix_cache.stats.bytes += 12345  # b's cached turns hold KV: a's room shrinks by as much
        assert a.scheduler.kv_room() == budget - weights - b.kv_bytes
        assert manager.kv_room("a:fp32") == manager.kv_room("b:fp32") - b.kv_bytes + a.kv_bytes
        assert unlimited.get("a:fp32").scheduler.kv_room() is None
    finally:
        manager.close()
        unlimited.close()
