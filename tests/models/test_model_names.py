"""How a name finds a model (ModelStore.find, the rule the README documents under "Model names")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenwire.server.models.manager import ModelManager, ModelNotFound
from tokenwire.server.models.store import ModelStore, folder_name


def add_model(root: Path, model_id: str) -> None:
    folder = root / folder_name(model_id)
    folder.mkdir(parents=True)
    for name in ("model.onnx", "config.json", "tokenizer.json"):
        (folder / name).write_text("{}")
    (folder / "tokenwire.json").write_text(json.dumps({"id": model_id, "precision": model_id.split(":")[-1]}))


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    for model_id in ("solo:fp32", "pair:fp32", "pair:int4", "odd:q5k", "odd:fp32", "alpha:zz", "alpha:aa",
                     "plain", "aliased:fp32", "aliased:int4"):
        add_model(tmp_path, model_id)
    store = ModelStore(tmp_path)
    store.set_alias("default", "pair")
    store.set_alias("aliased", "aliased:fp32")
    store.set_alias("chat", "solo")
    return store


@pytest.mark.parametrize("name,expected", [
    ("solo:fp32", "solo:fp32"),  # an id is itself
    ("solo", "solo:fp32"),  # `import --name solo` made only solo:fp32: the bare name answers
    ("pair", "pair:int4"),  # several variants: int4 before fp32
    ("odd", "odd:fp32"),  # a known variant before an unknown one
    ("alpha", "alpha:aa"),  # unknown variants alphabetically
    ("plain", "plain"),  # an id without a variant
    ("aliased", "aliased:fp32"),  # an alias wins over the variant rule
    ("chat", "solo:fp32"),  # an alias to a bare name follows the rule too
    ("", "pair:int4"),  # the default alias, then the rule
])
def test_a_name_finds_its_model(store: ModelStore, name: str, expected: str) -> None:
    entry = store.find(name)
    assert entry is not None and entry.id == expected


@pytest.mark.parametrize("name", ["pair:int8", "pai", "solo:", ":fp32", "nothing"])
def test_names_that_are_no_model(store: ModelStore, name: str) -> None:
    assert store.find(name) is None


def test_the_manager_refuses_unknown_names_listing_the_store(store: ModelStore) -> None:
    manager = ModelManager(store)
    try:
        assert manager.resolve("solo").id == "solo:fp32"
        with pytest.raises(ModelNotFound) as info:
            manager.resolve("nothing")
        assert "solo:fp32" in str(info.value) and info.value.known == [e.id for e in store.scan()]
    finally:
        manager.close()
