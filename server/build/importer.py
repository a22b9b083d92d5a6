"""Bring your own model: `tokenwire import PATH [--name NAME] [--quantize int4|int8]`.

PATH may be
* a folder exported by `optimum-cli export onnx --task text-generation-with-past`
  (model.onnx + config.json + tokenizer.json): copied as it is;
* a transformers checkpoint folder (config.json + *.safetensors / pytorch_model.bin):
  exported with optimum (needs the `export` extra);
* a `.gguf` file that transformers can read: converted as the default model's pipeline does.

Everything is built in a hidden staging folder inside the store, smoke-tested (model_check)
and only then moved into place, so a refused import leaves the store as it was.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tokenwire.server.models.store import MANIFEST, ModelStore, folder_name, folder_size

from .pull import (
    BuildError,
    build_quantized,
    export_onnx,
    gguf_to_checkpoint,
    require_export_extra,
    write_model_manifest,
)
from .smoke_test import SmokeResult, SmokeTestFailed, smoke_test

QUANTIZE_BITS = {"int4": 4, "int8": 8}
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")


class ImportRefused(BuildError):
    """The path cannot become a model; the message says why."""


@dataclass
class ImportResult:
    model_id: str
    folder: Path
    kind: str  # "onnx", "checkpoint", "gguf"
    precision: str
    parameter_count: int
    size_bytes: int
    smoke: SmokeResult


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def detect_kind(path: Path) -> str:
    """"onnx", "checkpoint" or "gguf"; raises ImportRefused saying what PATH lacks."""
    if not path.exists():
        raise ImportRefused(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ImportRefused(f"{path} is a file but not a .gguf; import takes an optimum export folder, "
                                "a transformers checkpoint folder or a .gguf file")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ImportRefused(f"{path} is named .gguf but does not start with the GGUF magic bytes")
        return "gguf"
    if (path / "model.onnx").is_file():
        return "onnx"
    if list(path.glob("decoder*_model*.onnx")):
        raise ImportRefused(f"{path} holds an older optimum layout (decoder_model*.onnx) and no model.onnx: "
                            "export again with `optimum-cli export onnx --task text-generation-with-past`")
    has_config = (path / "config.json").is_file()
    has_weights = any(next(path.glob(p), None) for p in WEIGHT_PATTERNS)
    if has_config and has_weights:
        return "checkpoint"
    if has_config:
        raise ImportRefused(f"{path} has a config.json but no weights (*.safetensors or pytorch_model*.bin), "
                            "so it is not a transformers checkpoint")
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        raise ImportRefused(f"{path} is a folder holding {ggufs[0].name}: pass the file itself "
                            f"(tokenwire import {ggufs[0]})")
    found = sorted(p.name for p in path.iterdir())[:6]
    raise ImportRefused(
        f"{path} is not a model: it has no model.onnx (an optimum export), no config.json with weights "
        f"(a transformers checkpoint) and no .gguf file; it holds: {', '.join(found) or 'nothing'}"
    )


def model_name(path: Path) -> str:
    """A default name from the file or folder name: lower case, [a-z0-9._-]."""
    stem = path.stem if path.is_file() else path.name
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.") or "model"


def graph_facts(model_path: Path) -> tuple[str, int]:
    """(precision, parameter count) read from the graph's initializers (no weights loaded).
    The count is of the graph's float weights (0 for a graph that is already quantized)."""
    try:
        import onnx
    except ImportError:
        return "", 0
    model = onnx.load(str(model_path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            return f"int{bits}", 0
    names = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}
    counts: dict[str, int] = {}
    for init in model.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        key = names.get(init.data_type, "other")
        counts[key] = counts.get(key, 0) + n
    floats = {k: v for k, v in counts.items() if k != "other"}
    if not floats:
        return "", 0
    return max(floats, key=floats.get), sum(floats.values())


def _copy_export(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    for item in src.iterdir():
        if item.is_file() and item.name != MANIFEST and item.suffix != ".gguf":
            shutil.copy2(item, dest / item.name)
    missing = [n for n in ("config.json", "tokenizer.json") if not (dest / n).is_file()]
    if missing:
        raise ImportRefused(f"{src} has model.onnx but no {' or '.join(missing)}; an optimum export carries "
                            "both (export with the tokenizer, or copy them in from the original checkpoint)")


def import_model(
    path: Path,
    store: ModelStore,
    name: str | None = None,
    quantize: str | None = None,
    force: bool = False,
    progress=_stderr,
) -> ImportResult:
    path = Path(path).expanduser().resolve()
    kind = detect_kind(path)
    if quantize is not None and quantize not in QUANTIZE_BITS:
        raise ImportRefused(f"--quantize takes {' or '.join(QUANTIZE_BITS)}, not {quantize!r}")
    if kind != "onnx" or quantize:
        require_export_extra()
    store.root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".import-", dir=store.root))
    try:
        fp = work / "model"
        if kind == "onnx":
            progress(f"copying the optimum export from {path}")
            _copy_export(path, fp)
        elif kind == "checkpoint":
            progress(f"exporting the transformers checkpoint {path} with optimum")
            export_onnx(path, fp)
        else:
            progress(f"converting {path.name} with transformers (GGUF -> fp32 checkpoint)")
            gguf_to_checkpoint(path, work / "checkpoint")
            progress("exporting to ONNX with optimum")
            export_onnx(work / "checkpoint", fp)
        for required in ("model.onnx", "config.json", "tokenizer.json"):
            if not (fp / required).is_file():
                raise ImportRefused(f"the export of {path} has no {required}")
        try:
            precision, params = graph_facts(fp / "model.onnx")
        except Exception as exc:  # protobuf's DecodeError and friends
            raise ImportRefused(f"refusing to import {path}: model.onnx is not a readable ONNX graph "
                                f"(truncated or not ONNX): {exc}") from exc
        final = fp
        extra: dict = {}
        if quantize:
            if precision != "fp32":
                raise ImportRefused(f"--quantize needs an fp32 graph; {path} is {precision or 'of unknown precision'}")
            progress(f"quantizing to {quantize} (MatMulNBits)")
            final = work / quantize
            extra["quantization"] = {"routes": build_quantized(fp, final, bits=QUANTIZE_BITS[quantize])}
            precision = quantize
        base = name or model_name(path)
        model_id = base if ":" in base else f"{base}:{precision or 'unknown'}"
        target = store.root / folder_name(model_id)
        existing = store.get(model_id)
        if (target.exists() or existing is not None) and not force:
            raise ImportRefused(f"model {model_id} is already in the store ({existing.path if existing else target}); "
                                "pass --force to replace it, or --name to import it under another name")
        source = {"import": str(path), "kind": kind}
        write_model_manifest(final, model_id, source, precision, params, extra)
        progress(f"smoke test: greedy decode of a few tokens with and without the KV cache ({model_id})")
        try:
            smoke = smoke_test(final)
        except SmokeTestFailed as exc:
            raise ImportRefused(f"refusing to import {path}: the smoke test failed: {exc}") from exc
        for old in {target, existing.path if existing else target}:
            if old.exists():
                shutil.rmtree(old)
        final.replace(target)
        return ImportResult(model_id, target, kind, precision, params, folder_size(target), smoke)
    finally:
        shutil.rmtree(work, ignore_errors=True)
