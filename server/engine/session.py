"""onnxruntime sessions: the execution providers of a device, and one way to open a graph."""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort


class DeviceUnavailable(RuntimeError):
    """The requested execution provider is not installed or has no device."""


def providers_for(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise DeviceUnavailable(
                "--device cuda needs onnxruntime-gpu and an NVIDIA GPU; this onnxruntime offers "
                + ", ".join(available)
                + " (install the 'gpu' extra: pip install 'tokenwire[gpu]')"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise DeviceUnavailable(f"unknown device {device!r}: use cpu or cuda")


def make_session(model_path: Path, device: str = "cpu", threads: int = 0,
                 custom_ops: Path | None = None) -> ort.InferenceSession:
    """`custom_ops`: a custom-op library to register (tokenwire's native kernels)."""
    opts = ort.SessionOptions()
    if custom_ops is not None:
        opts.register_custom_ops_library(str(custom_ops))
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    else:
        opts.intra_op_num_threads = int(os.environ.get("TOKENWIRE_THREADS", "0") or 0)
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model_path), sess_options=opts, providers=providers_for(device))
