"""Ollama's /api/pull and /api/delete with the `ollama` package (the compatibility issue, item 7),
on a server with a store of its own: pulling a name already in the store streams `tokenwire pull`'s
word and success; a name nothing can pull is an error that says so; delete removes a model (gone
from /api/tags, its folder gone) and a second delete is a 404. Over gRPC, a key without the admin
role may do neither."""

from __future__ import annotations

import json
from pathlib import Path

import ollama
import pytest
from conftest import free_port, start_bridge, start_server


@pytest.fixture(scope="module")
def store_and_client(int4_dir: Path, fp32_dir: Path, tmp_path_factory):
    store = tmp_path_factory.mktemp("ollama-store")
    for source, folder in ((int4_dir, int4_dir.name), (fp32_dir, fp32_dir.name), (int4_dir, "scratch_int4")):
        manifest = json.loads((source / "tokenwire.json").read_text())
        model_id = "scratch:int4" if folder == "scratch_int4" else manifest["id"]
        (store / folder).mkdir()  # the files linked, the folder real (as `tokenwire rm` expects)
        for item in source.iterdir():
            if item.name != "tokenwire.json":
                (store / folder / item.name).symlink_to(item)
        (store / folder / "tokenwire.json").write_text(json.dumps({**manifest, "id": model_id}))
    (store / "aliases.json").write_text((int4_dir.parent / "aliases.json").read_text())
    port = free_port()
    server = start_server(store, store)
    bridge = start_bridge(store, server.target, "--ollama-port", str(port))
    yield store, ollama.Client(host=f"http://127.0.0.1:{port}")
    bridge.stop()
    server.stop()


def test_pulling_a_model_in_the_store_succeeds_at_once(store_and_client) -> None:
    _, client = store_and_client
    statuses = [part.status for part in client.pull("smollm2-135m", stream=True)]
    assert statuses[-1] == "success" and any("already in" in s for s in statuses), statuses
    assert client.pull("smollm2-135m").status == "success"
    with pytest.raises(ollama.ResponseError) as caught:
        client.pull("no-such-model-anywhere")
    assert "no-such-model-anywhere" in caught.value.error
    with pytest.raises(ollama.ResponseError):
        client.pull("--force")


def test_delete_removes_the_model(store_and_client) -> None:
    store, client = store_and_client
    assert "scratch:int4" in {m.model for m in client.list().models}
    client.delete("scratch:int4")
    assert "scratch:int4" not in {m.model for m in client.list().models}
    assert not (store / "scratch_int4").exists()
    assert (store / "smollm2-135m_int4" / "tokenwire.json").is_file(), "the other model stays"
    with pytest.raises(ollama.ResponseError) as caught:
        client.delete("scratch:int4")
    assert caught.value.status_code == 404
