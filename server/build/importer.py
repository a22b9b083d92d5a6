"""Bring your own model: `tokenwire import PATH [--name NAME] [--quantize int4|int8]`.

PATH may be
* a folder exported by `optimum-cli export onnx --task text-generation-with-past`
  (model.onnx + config.json + tokenizer.json): copied as it is;
* a transformers checkpoint folder (config.json + *.safetensors / pytorch_model.bin):
  exported with optimum (needs the `export` extra);
* a `.gguf` file: its blocks carried into tokenwire's native graph as they are (import_gguf,
  gguf_graph.py); an architecture or tensor type that graph does not build goes through
  transformers instead (the default model's pipeline: an fp32 detour, ~9 bytes a parameter of
  memory, refused up front when this machine does not have them).

Everything is built in a hidden staging folder inside the store, smoke-tested (model_check)
and only then moved into place, so a refused import leaves the store as it was.
"""

from __future__ import annotations

import math
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tokenwire.server.engine.graph import NATIVE_GRAPH
from tokenwire.server.models.process_memory import release_free_memory
from tokenwire.server.models.store import (
    MANIFEST,
    ModelEntry,
    ModelStore,
    folder_name,
    folder_size,
    sha256_file,
    weight_files,
    write_manifest,
)

from .pull import (
    BUILD_VERSION,
    BuildError,
    build_quantized,
    export_onnx,
    gguf_to_checkpoint,
    require_export_extra,
    write_model_manifest,
)
from .smoke_test import SmokeResult, SmokeTestFailed, smoke_test

QUANTIZE_BITS = {"int4": 4, "int8": 8}
# Peak memory of the transformers route for a GGUF, per parameter: 6.0 GB for a 0.49 GB Q4_K_M file
# of 0.63B parameters (DESIGN.md, "Facts for the second wave"), rounded up.
TRANSFORMERS_BYTES_PER_PARAM = 9
GGUF_SOURCE_LINK = "source.gguf"  # in a GGUF model's folder: a symlink to the imported file
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
    if not path.is_dir():  # a FIFO, a device: reading it could block or never end
        raise ImportRefused(f"{path} is neither a regular file nor a folder")
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
    check: bool = True,
    transformers: bool = False,
) -> ImportResult:
    """Imports PATH into the store. A .gguf goes to import_gguf (the native graph) unless
    `quantize` or `transformers` asks for the transformers route."""
    path = Path(path).expanduser().resolve()
    kind = detect_kind(path)
    if quantize is not None and quantize not in QUANTIZE_BITS:
        raise ImportRefused(f"--quantize takes {' or '.join(QUANTIZE_BITS)}, not {quantize!r}")
    if kind == "gguf" and not (quantize or transformers):
        return import_gguf(path, store, name=name, force=force, check=check, progress=progress)
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
        target, existing = _free_place(store, model_id, force)
        source = {"import": str(path), "kind": kind}
        write_model_manifest(final, model_id, source, precision, params, extra)
        smoke = _smoke_and_install(final, target, existing, model_id, path, progress)
        return ImportResult(model_id, target, kind, precision, params, folder_size(target), smoke)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _free_place(store: ModelStore, model_id: str, force: bool) -> tuple[Path, ModelEntry | None]:
    """(the folder model_id goes to, the entry it replaces); ImportRefused when taken and not `force`."""
    if folder_name(model_id).startswith("."):  # the store's own hidden folders (.cache, .import-*): never listed
        raise ImportRefused(f"a model name cannot start with '.' ({model_id!r}): pass another --name")
    target = store.root / folder_name(model_id)
    existing = store.get(model_id)
    if (target.exists() or existing is not None) and not force:
        raise ImportRefused(f"model {model_id} is already in the store ({existing.path if existing else target}); "
                            "pass --force to replace it, or --name to import it under another name")
    return target, existing


def _smoke_and_install(built: Path, target: Path, existing: ModelEntry | None, model_id: str, path: Path,
                       progress) -> SmokeResult:
    """Smoke-tests a built folder, then moves it into place, removing what it replaces (rmtree
    removes a `source.gguf` link, never the file it points to)."""
    progress(f"smoke test: greedy decode of a few tokens with and without the KV cache ({model_id})")
    try:
        smoke = smoke_test(built)
    except SmokeTestFailed as exc:
        raise ImportRefused(f"refusing to import {path}: the smoke test failed: {exc}") from exc
    for old in {target, existing.path if existing else target}:
        if old.exists():
            shutil.rmtree(old)
    built.replace(target)
    return smoke


# ---- GGUF files: the native graph -------------------------------------------------------------

def available_memory() -> int:
    """Bytes this machine can give a new process now (MemAvailable), 0 when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _through_transformers(path: Path, store: ModelStore, why: str, parameters: int, name: str | None,
                          force: bool, check: bool, progress) -> ImportResult:
    """The fallback for a GGUF the native graph cannot build, refused when it would not fit."""
    need = parameters * TRANSFORMERS_BYTES_PER_PARAM
    have = available_memory()
    if parameters and have and need > have:
        raise ImportRefused(
            f"refusing to import {path.name}: the native graph cannot run it ({why}), and the transformers "
            f"route would need about {_gib(need)} of memory ({parameters / 1e9:.2f}B parameters x "
            f"{TRANSFORMERS_BYTES_PER_PARAM} bytes) where this machine has {_gib(have)} available")
    progress(f"the native graph cannot run {path.name}: {why}; importing it through transformers instead "
             f"(fp32, about {_gib(need)} of memory)" if parameters else
             f"the native graph cannot run {path.name}: {why}; importing it through transformers instead")
    return import_model(path, store, name=name, force=force, progress=progress, check=check, transformers=True)


def _gguf_model_id(name: str | None, path: Path, file_type: str) -> str:
    """NAME:FILETYPE; the default NAME is the file's, without a trailing file type
    (qwen2.5-0.5b-instruct-q4_k_m.gguf -> qwen2.5-0.5b-instruct:q4_k_m)."""
    variant = file_type.lower()
    base = name or re.sub(rf"[._-]{re.escape(variant)}$", "", model_name(path)) or model_name(path)
    return base if ":" in base else f"{base}:{variant}"


def import_gguf(path: Path, store: ModelStore, name: str | None = None, force: bool = False, check: bool = True,
                progress=_stderr, fallback: bool = True) -> ImportResult:
    """A GGUF file into the store as a native-graph model (gguf_graph.py), no torch and no fp32 copy.

    The folder gets model_native.onnx + .data (the file's blocks repacked), config.json, the
    tokenizer files (gguf_tokenizer.write_tokenizer), the manifest (precision "gguf:<file type>",
    kernels.native with the paged KV layout) and `source.gguf`, a symlink to the file. Built in a
    hidden folder of the store and smoke-tested before it moves in. A file the native graph cannot
    build (its architecture, a tensor type, the kernels missing here) goes through transformers
    instead when `fallback`, saying why; a corrupt or truncated file is refused, store unchanged."""
    from tokenwire.server.native import loader as native_kernels

    from .gguf_file import GGUFFile
    from .gguf_graph import build_gguf_graph, native_unsupported
    from .gguf_model import GGUFCorrupt, GGUFUnsupported, read_model

    path = Path(path).expanduser().resolve()
    started = time.monotonic()
    for module in ("gguf", "onnx"):
        try:
            __import__(module)
        except ImportError:
            raise BuildError(f"importing a GGUF needs the 'export' extra (missing: {module}): "
                             "pip install 'tokenwire[export]'") from None
    try:
        reader = GGUFFile(path)
    except GGUFCorrupt as exc:
        raise ImportRefused(f"refusing to import {path.name}: {exc}") from exc
    try:
        parts = reader.field("split.count")
        if isinstance(parts, int) and parts > 1:
            raise ImportRefused(f"refusing to import {path.name}: it is one of {parts} parts of a split GGUF; join "
                                "them first (llama.cpp's llama-gguf-split --merge FIRST_PART OUT.gguf)")
        parameters = sum(math.prod(t.shape) for t in reader.tensors)
        try:
            model = read_model(reader)
        except GGUFCorrupt as exc:
            raise ImportRefused(f"refusing to import {path.name}: {exc}") from exc
        except GGUFUnsupported as exc:
            model, why = None, str(exc)
        else:
            lib = native_kernels.library()
            why = native_unsupported(model) or (f"tokenwire's native kernels are unavailable: {lib.reason}"
                                                if lib.path is None else "")
        if why:
            if not fallback:
                raise ImportRefused(f"refusing to import {path.name}: the native graph cannot run it: {why}")
            reader.close()
            return _through_transformers(path, store, why, parameters, name, force, check, progress)
        assert model is not None
        model_id = _gguf_model_id(name, path, model.file_type)
        target, existing = _free_place(store, model_id, force)
        store.root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".import-", dir=store.root))
        try:
            out = work / "model"
            out.mkdir()
            progress(f"{path.name}: {model.architecture}, {model.layers} layers, {model.file_type}; "
                     "writing its tokenizer")
            try:
                tokenizer = _write_tokenizer(path, out)
            except ImportRefused as exc:
                if not fallback:
                    raise
                reader.close()
                return _through_transformers(path, store, str(exc).split(": ", 1)[-1], parameters, name, force,
                                             check, progress)
            release_free_memory()  # what building the tokenizer took (hundreds of MB for 262k tokens)
            progress(f"repacking {len(model.tensors)} tensors into the native graph ({NATIVE_GRAPH})")
            report = build_gguf_graph(model, reader, out)
            reader.close()
            release_free_memory()
            _write_config(model, out)
            (out / GGUF_SOURCE_LINK).symlink_to(path)
            precision = f"gguf:{model.file_type}"
            manifest = _gguf_manifest(model, out, model_id, path, precision, report, tokenizer,
                                      time.monotonic() - started)
            write_manifest(out, manifest)
            smoke = _smoke_and_install(out, target, existing, model_id, path, progress)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if check:  # gguf_check.py: the served graph against the file's float reference, into the manifest
            from .gguf_check import check_import
            check_import(target, progress)
        return ImportResult(model_id, target, "gguf", precision, model.parameter_count, folder_size(target), smoke)
    finally:
        reader.close()


def _write_tokenizer(path: Path, out: Path) -> dict:
    from .gguf_tokenizer import write_tokenizer

    try:
        return dict(write_tokenizer(path, out) or {})
    except Exception as exc:  # an unknown pre-tokenizer, a vocabulary it cannot read: say which
        raise ImportRefused(f"refusing to import {path.name}: its tokenizer cannot be rebuilt from the file: "
                            f"{exc}") from exc


def _write_config(model, out: Path) -> None:
    """config.json from the model and the stop tokens the tokenizer step found."""
    import json

    from .gguf_graph import config_json

    gen = {}
    if (out / "generation_config.json").is_file():
        gen = json.loads((out / "generation_config.json").read_text())
    eos = gen.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    (out / "config.json").write_text(json.dumps(config_json(model, eos_ids, gen.get("bos_token_id")), indent=2) + "\n")


def _gguf_manifest(model, out: Path, model_id: str, path: Path, precision: str, report, tokenizer: dict,
                   seconds: float) -> dict:
    return {
        "id": model_id,
        "source": {"gguf": str(path), "file": path.name, "bytes": path.stat().st_size, "kind": "gguf",
                   "name": model.name},
        "precision": precision,
        "architecture": model.architecture,
        "context_length": model.context_length,
        "parameter_count": model.parameter_count,
        "graph": "gqa",
        "graphs": [NATIVE_GRAPH],
        "build": BUILD_VERSION,
        "graph_sha256": sha256_file(out / NATIVE_GRAPH),
        "weight_files": weight_files(out),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kernels": {"native": {"graph": NATIVE_GRAPH, "weights": "GGUF blocks (BlockLinear/BlockGather)",
                               "activations": "int16 per block of 32", "kv_dtype": "float16",
                               "kv_format": "float16", "kv_layout": "paged"}},
        "gguf": {"file_type": model.file_type, "tensor_types": report.types, "tensor_bytes": report.tensor_bytes,
                 "packed_bytes": report.packed_bytes, "fused": report.fused, "import_seconds": round(seconds, 1)},
        "tokenizer": tokenizer,
    }
