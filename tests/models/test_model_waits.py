"""Waiting for a model never parks a shared thread (the Security issue, item 7): requests for a
model that is being unloaded are refused at once (UNAVAILABLE, retry shortly) while other models
load and answer; a keep_alive of 0 never unloads a model another request is using; a load never
evicts a model in use. Real tiny models on real onnxruntime sessions, in-process so that "the
unload is still waiting for a lease" is a fact of the test, not a race."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import wait_until
from test_model_manager import copy_model

from tokenwire.server.api.errors import status_for
from tokenwire.server.models.manager import ModelBusy, ModelLimits, ModelManager, ModelUnloading
from tokenwire.server.models.store import ModelStore


@pytest.fixture
def two_store(tmp_path, tiny_models) -> Path:
    for name in ("a", "b"):
        copy_model(tiny_models["llama"], tmp_path, f"{name}:fp32")
    return tmp_path


def manager_for(store: Path, **limits) -> ModelManager:
    return ModelManager(ModelStore(store), limits=ModelLimits(**limits))


async def test_requests_for_an_unloading_model_are_refused_at_once_and_others_serve(two_store) -> None:
    manager = manager_for(two_store, max_loaded=0)
    try:
        entry_a, entry_b = manager.resolve("a:fp32"), manager.resolve("b:fp32")
        held = manager.acquire(entry_a)  # a stream of model a, still running
        unloading = threading.Thread(target=manager.unload, args=("a:fp32",))
        unloading.start()
        wait_until(lambda: manager.status("a:fp32").state == "loaded" and "a:fp32" not in manager.loaded_ids())
        # More requests for a than the event loop's default executor has threads (6 on 2 cores).
        results = await asyncio.gather(*(manager.acquire_async(entry_a) for _ in range(12)),
                                       return_exceptions=True)
        assert all(isinstance(r, ModelUnloading) for r in results), results
        assert results[0].retry_after_s >= 1 and "being unloaded" in str(results[0])
        # Nothing was parked: the shared executor and another model's load answer meanwhile.
        loop = asyncio.get_running_loop()
        assert await asyncio.wait_for(loop.run_in_executor(None, lambda: 42), 5) == 42
        b = await asyncio.wait_for(manager.acquire_async(entry_b), 60)
        assert b.id == "b:fp32" and b.leases == 1
        assert unloading.is_alive(), "model a's unload must still be waiting for its stream"
        manager.release(b)
        manager.release(held)  # the stream ends: the unload finishes
        unloading.join(30)
        assert not unloading.is_alive() and manager.status("a:fp32").state == "available"
        again = await asyncio.wait_for(manager.acquire_async(entry_a), 60)  # and a loads again
        assert again.id == "a:fp32" and manager.load_count["a:fp32"] == 2
        manager.release(again)
    finally:
        manager.close()


async def test_concurrent_first_requests_share_one_load_and_cancel_gives_the_lease_back(two_store) -> None:
    manager = manager_for(two_store, max_loaded=0)
    try:
        entry = manager.resolve("a:fp32")
        first = asyncio.ensure_future(manager.acquire_async(entry))
        await asyncio.sleep(0)  # the load has started on the manager's pool
        waiters = [asyncio.ensure_future(manager.acquire_async(entry)) for _ in range(7)]
        first.cancel()  # the client of the first request went away while its model loaded
        models = await asyncio.wait_for(asyncio.gather(*waiters), 60)
        assert {m.id for m in models} == {"a:fp32"} and manager.load_count["a:fp32"] == 1
        with pytest.raises(asyncio.CancelledError):
            await first
        for _ in range(500):  # the hand-back runs on the event loop: yield to it while waiting
            if models[0].leases == 7:
                break
            await asyncio.sleep(0.01)
        assert models[0].leases == 7, "the cancelled request's lease was handed back"
        for m in models:
            manager.release(m, 0)
        wait_until(lambda: manager.status("a:fp32").state == "available")
    finally:
        manager.close()


def test_keep_alive_zero_never_unloads_a_model_another_request_is_using(two_store) -> None:
    manager = manager_for(two_store)
    try:
        other = manager.acquire("a:fp32")  # another user's stream
        mine = manager.acquire("a:fp32")
        manager.release(mine, 0)  # "unload when done"
        time.sleep(1.5)  # the reaper runs at least once a second
        assert manager.loaded_ids() == ["a:fp32"] and other.leases == 1 and other.scheduler is not None
        manager.release(other)  # the last lease, with the server's keep-alive
        status = manager.status("a:fp32")
        assert status.state == "loaded" and status.expires_at is not None
        assert status.expires_at - time.time() > manager.limits.keep_alive_s - 5
        alone = manager.acquire("a:fp32")
        manager.release(alone, 0)  # alone with keep_alive 0: unloads at once
        wait_until(lambda: manager.status("a:fp32").state == "available", 5)
    finally:
        manager.close()


async def test_a_load_never_evicts_a_model_in_use(two_store) -> None:
    manager = manager_for(two_store, max_loaded=1, room_wait_s=0.3)
    try:
        held = await manager.acquire_async(manager.resolve("a:fp32"))
        with pytest.raises(ModelBusy, match="busy") as refused:
            await manager.acquire_async(manager.resolve("b:fp32"))
        assert not isinstance(refused.value, ModelUnloading)
        assert manager.loaded_ids() == ["a:fp32"] and held.scheduler is not None
        manager.release(held)
    finally:
        manager.close()


def test_an_unloading_model_is_unavailable_with_retry_after() -> None:
    status = status_for(ModelUnloading("model a is being unloaded", 1))
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert ("retry-after", "1") in status.trailing_metadata
