"""Which graph a model folder holds and how to open it: the one place that chooses an engine.

A fast model (built by `tokenwire pull`, manifest `"graph": "gqa"`) has GRAPH with onnxruntime's
kernels and, for AVX2/AVX-512 CPUs, NATIVE_GRAPH with tokenwire's own ops (server/native);
`choose_kernels` picks between them. Anything else is an optimum export, run by OptimumEngine.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from tokenwire.server.native import loader as native_kernels

from .batch_engine import BatchEngine
from .session import make_session

log = logging.getLogger("tokenwire.models")

GRAPH = "model.onnx"  # onnxruntime's own kernels (MatMulNBits + the Q4_1 correction); any device
NATIVE_GRAPH = "model_native.onnx"  # tokenwire's Linear/Attention ops (server/native); AVX2/AVX-512 CPUs


def kv_numpy_dtype(session) -> type:
    """The KV buffers' element type, read from the graph: fp32 (CPU), fp16 (the CUDA layout and
    the native graph), uint8 (the native graph's int8 format, engine/kv_int8.py)."""
    kinds = {i.type for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    if kinds == {"tensor(uint8)"}:
        return np.uint8
    return np.float16 if kinds == {"tensor(float16)"} else np.float32


def open_graph(model_dir: Path, native: bool, device: str = "cpu", threads: int = 0):
    """A session on a fast model's NATIVE_GRAPH (tokenwire's ops registered) or GRAPH."""
    if native:
        return make_session(model_dir / NATIVE_GRAPH, device, threads, custom_ops=native_kernels.require())
    return make_session(model_dir / GRAPH, device, threads)


def choose_kernels(model_dir: Path, device: str = "cpu", kernels: str | None = None) -> tuple[str, str]:
    """Which graph of a fast model to run: ("native" | "onnxruntime", why, when not native).

    `kernels` (else TOKENWIRE_KERNELS, else "auto"): "auto" takes the native kernels where the
    model has them and this machine can run them; "native" insists (ValueError saying why
    not); "onnxruntime" never uses them."""
    choice = kernels or os.environ.get("TOKENWIRE_KERNELS") or "auto"
    if choice not in native_kernels.CHOICES:
        raise ValueError(f"kernels must be one of {', '.join(native_kernels.CHOICES)}, not {choice!r}")
    only_native = not (model_dir / GRAPH).is_file() and (model_dir / NATIVE_GRAPH).is_file()  # a GGUF import
    if choice == "onnxruntime":
        if only_native:
            raise ValueError(f"{model_dir.name} has only {NATIVE_GRAPH}: it runs on tokenwire's native kernels")
        return "onnxruntime", "asked for onnxruntime's kernels"
    if device != "cpu":
        why = f"the native kernels are CPU kernels (device {device})"
    elif not (model_dir / NATIVE_GRAPH).is_file():
        why = f"{model_dir.name} has no {NATIVE_GRAPH} (pull it again to build one)"
    else:
        lib = native_kernels.library()
        why = lib.reason if lib.path is None else ""
    if not why:
        return "native", ""
    if choice == "native" or only_native:
        raise ValueError(f"native kernels unavailable: {why}")
    return "onnxruntime", why


def native_kv_layout(model_dir: Path) -> str:
    """How a fast model's NATIVE_GRAPH keeps its cache: "paged" (a pool of pages and a page table
    per row, build 7 on) or "dense" (a row of the longest sequence's capacity each, older builds)."""
    try:
        manifest = json.loads((model_dir / "tokenwire.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "dense"
    native = manifest.get("kernels", {}).get("native", {})
    return native.get("kv_layout", "dense") if isinstance(native, dict) else "dense"


def is_fast_graph(model_dir: Path) -> bool:
    try:
        manifest = json.loads((model_dir / "tokenwire.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return manifest.get("graph") == "gqa"


def open_engine(model_dir: Path, device: str = "cpu", threads: int = 0, context_length: int = 0,
                kernels: str | None = None, model_id: str = "") -> tuple[BatchEngine, str]:
    """The engine for a model folder, and a line saying what it computes on (also logged).

    Fast graphs get FastEngine on the kernels `choose_kernels` picks (a PagedEngine when the
    native graph is paged); any other graph is an optimum export, run by OptimumEngine."""
    from .fast_engine import FastEngine
    from .optimum_engine import OptimumEngine

    model_dir = Path(model_dir)
    if not is_fast_graph(model_dir):
        engine: BatchEngine = OptimumEngine(model_dir / GRAPH, device=device, threads=threads)
        note = "optimum export on onnxruntime's kernels (the compatible path)"
    else:
        engine = FastEngine(model_dir, device=device, threads=threads, context_length=context_length,
                            kernels=kernels)
        if engine.kernels == "native":
            note = f"linears and attention on tokenwire's native kernels ({native_kernels.library().isa})"
            if native_kv_layout(model_dir) == "paged":
                note += ", KV in pages"
        else:
            note = f"linears and attention on onnxruntime's kernels ({engine.kernels_note})"
    log.info("%s: %s", model_id or model_dir.name, note)
    return engine, note
