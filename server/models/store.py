"""The model store: a folder of model folders, each described by a `tokenwire.json` manifest.

A model folder holds `model.onnx` (+ external data), `config.json`, `tokenizer.json`,
optionally `generation_config.json` and `chat_template.jinja`, and the manifest. The store
also keeps `aliases.json` (e.g. "smollm2-135m" -> "smollm2-135m:int4"), written by `pull`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenwire.server.engine.model_config import DEFAULT_CONTEXT_LENGTH, ModelConfig

MANIFEST = "tokenwire.json"
ALIASES = "aliases.json"
DEFAULT_ALIAS_KEY = "default"
# Which variant a bare model name picks when it has several (NAME -> NAME:int4 before NAME:fp32).
VARIANT_ORDER = ("int4", "int8", "fp16", "bf16", "fp32")


def _variant_rank(variant: str) -> tuple[int, str]:
    return (VARIANT_ORDER.index(variant) if variant in VARIANT_ORDER else len(VARIANT_ORDER), variant)


def default_store_path() -> Path:
    """`$TOKENWIRE_MODELS`, else `~/.local/share/tokenwire/models` (outside any clone, like Ollama's)."""
    env = os.environ.get("TOKENWIRE_MODELS")
    if env:
        return Path(env).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "tokenwire" / "models"


def folder_name(model_id: str) -> str:
    """The folder a model id lives in (":" is awkward in paths on some systems)."""
    return model_id.replace(":", "_").replace("/", "_")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def folder_size(path: Path) -> int:
    """The bytes a folder's own files take: a symlink (a GGUF model's `source.gguf`) counts nothing."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def weight_files(folder: Path) -> dict[str, int]:
    """The graph and its external data (model.onnx, model.onnx_data, ...): name -> bytes. A folder
    whose only graph is the native one (a GGUF import) has model_native.onnx and its .data instead."""
    found = sorted(folder.glob("model.onnx*")) or sorted(folder.glob("model_native.onnx*"))
    return {p.name: p.stat().st_size for p in found if p.is_file()}


REQUIRED_FILES = ("model.onnx", "config.json", "tokenizer.json")
# Models that are not ONNX decoders or encoders: the files each kind needs besides the manifest.
# (An OCR model's three graphs are named in its manifest's "files" and recorded in "weight_files".)
KIND_FILES: dict[str, tuple[str, ...]] = {
    "speech": ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt"),  # a CTranslate2 Whisper
    "ocr": (),
}


def required_files(manifest: dict[str, Any]) -> tuple[str, ...]:
    kind = str(manifest.get("kind", "") or "generate")
    if kind in KIND_FILES:
        return KIND_FILES[kind] + tuple(str(v) for v in (manifest.get("files") or {}).values())
    graphs = manifest.get("graphs")  # a decoder with other graphs than model.onnx (a GGUF import)
    if isinstance(graphs, list) and graphs:
        return (*(str(g) for g in graphs), *REQUIRED_FILES[1:])
    return REQUIRED_FILES


def model_weight_bytes(entry: ModelEntry) -> int:
    """The bytes of a model's weights: its graph files, or what a speech or OCR model's manifest
    recorded (its weight files that are still there)."""
    recorded = entry.manifest.get("weight_files")
    if entry.kind in KIND_FILES and isinstance(recorded, dict):
        return sum((entry.path / name).stat().st_size for name in recorded if (entry.path / name).is_file())
    return sum(weight_files(Path(entry.path)).values())


def _check_files(folder: Path, manifest: dict[str, Any]) -> str:
    """Why the folder cannot serve ("" when it looks whole): missing files, or weights whose size
    differs from what the manifest recorded (a truncated copy, an interrupted download)."""
    missing = [name for name in required_files(manifest) if not (folder / name).is_file()]
    if missing:
        return "missing " + ", ".join(missing)
    recorded = manifest.get("weight_files")
    if isinstance(recorded, dict):
        for name, size in recorded.items():
            path = folder / name
            if not path.is_file():
                return f"missing {name}"
            actual = path.stat().st_size
            if actual != size:
                return f"{name} is {actual} bytes but the manifest says {size}: truncated or replaced"
    return ""


def _dropped_in(folder: Path) -> ModelEntry:
    """A folder without a manifest: an optimum export copied in as it is serves under the
    folder's name; anything else is listed as failed with what it lacks."""
    if not (folder / "model.onnx").is_file():
        return ModelEntry(id=folder.name, path=folder,
                          error=f"not a model folder: no {MANIFEST} and no model.onnx "
                                "(add models with `tokenwire pull` or `tokenwire import`)")
    config = ModelConfig.read_or_empty(folder)
    manifest = {"id": folder.name, "architecture": config.model_type,
                "context_length": config.context_length, "source": {"dropped_in": str(folder)}}
    entry = ModelEntry(id=folder.name, path=folder, manifest=manifest)
    entry.error = _check_files(folder, manifest)
    return entry


@dataclass
class ModelEntry:
    """One model folder as found on disk (it may be broken: see `error`)."""

    id: str
    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def architecture(self) -> str:
        return str(self.manifest.get("architecture", ""))

    @property
    def precision(self) -> str:
        return str(self.manifest.get("precision", ""))

    @property
    def kind(self) -> str:
        """"generate" (a decoder: chat, completions), "embedding" (an encoder: embeddings), "speech"
        (speech to text: transcriptions) or "ocr" (the text in an image)."""
        return str(self.manifest.get("kind", "") or "generate")

    @property
    def context_length(self) -> int:
        """The context window the manifest records, else the one every reader assumes."""
        return int(self.manifest.get("context_length", 0) or 0) or DEFAULT_CONTEXT_LENGTH

    @property
    def parameter_count(self) -> int:
        return int(self.manifest.get("parameter_count", 0) or 0)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(folder / MANIFEST)


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text())


class ModelStore:
    """Reads the store folder. Cheap enough to rescan on every listing."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else default_store_path()

    def scan(self) -> list[ModelEntry]:
        if not self.root.is_dir():
            return []
        entries: list[ModelEntry] = []
        seen: dict[str, Path] = {}
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            entry = self._entry(folder)
            if entry.id in seen:  # a copied folder whose manifest still names the original
                entry = ModelEntry(id=folder.name, path=folder, manifest=entry.manifest,
                                   error=f"duplicate id {entry.id!r} (also in {seen[entry.id].name}): "
                                         f"change \"id\" in {folder / MANIFEST}")
            seen.setdefault(entry.id, folder)
            entries.append(entry)
        return entries

    def _entry(self, folder: Path) -> ModelEntry:
        try:
            manifest = read_manifest(folder)
        except FileNotFoundError:
            return _dropped_in(folder)
        except (OSError, json.JSONDecodeError) as exc:
            return ModelEntry(id=folder.name, path=folder, error=f"unreadable {MANIFEST}: {exc}")
        entry = ModelEntry(id=str(manifest.get("id") or folder.name), path=folder, manifest=manifest)
        entry.error = _check_files(folder, manifest)
        return entry

    def remove(self, model_id: str) -> Path:
        """Deletes a model's folder and the aliases that lead to it; returns the folder removed."""
        entry = self.get(model_id)
        if entry is None:
            raise KeyError(model_id)
        stale = [name for name in self.aliases() if self.resolve(name) == entry.id]
        trash = entry.path.with_name(f".removing-{entry.path.name}")
        entry.path.replace(trash)  # atomic: a listing never sees half a folder
        shutil.rmtree(trash, ignore_errors=True)
        data = {k: v for k, v in self.aliases().items() if k not in stale}
        self._write_aliases(data)
        return entry.path

    def aliases(self) -> dict[str, str]:
        try:
            data = json.loads((self.root / ALIASES).read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return {str(k): str(v) for k, v in data.items()}

    def set_alias(self, name: str, target: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        data = self.aliases()
        data[name] = target
        self._write_aliases(data)

    def _write_aliases(self, data: dict[str, str]) -> None:
        tmp = self.root / (ALIASES + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.root / ALIASES)

    def resolve(self, name: str) -> str:
        """Maps an alias (or "" for the default) to a model id; other names come back as they are."""
        aliases = self.aliases()
        if not name:
            name = aliases.get(DEFAULT_ALIAS_KEY, "")
        seen = set()
        while name in aliases and name not in seen:
            seen.add(name)
            name = aliases[name]
        return name

    def default_id(self) -> str:
        return self.resolve("")

    def find(self, name: str, entries: list[ModelEntry] | None = None) -> ModelEntry | None:
        """The entry a name refers to, by the documented rule (README, "Model names"):
        "" is the default model; an alias leads to its target; an id is itself; otherwise a bare
        NAME is a variant NAME:VARIANT: the only one, or of several the first in VARIANT_ORDER
        (smallest first: int4, int8, fp16, bf16, fp32), then alphabetically."""
        entries = self.scan() if entries is None else entries
        by_id = {e.id: e for e in entries}
        model_id = self.resolve(name)
        if model_id in by_id:
            return by_id[model_id]
        if not model_id or ":" in model_id:
            return None
        variants = [e for e in entries if e.id.split(":", 1)[0] == model_id and ":" in e.id]
        if not variants:
            return None
        return min(variants, key=lambda e: _variant_rank(e.id.split(":", 1)[1]))

    def get(self, model_id: str) -> ModelEntry | None:
        for entry in self.scan():
            if entry.id == model_id:
                return entry
        return None
