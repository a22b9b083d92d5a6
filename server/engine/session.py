"""onnxruntime sessions: the execution providers of a device, and one way to open a graph."""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort


class DeviceUnavailable(RuntimeError):
    """The requested execution provider is not installed or has no device."""


def providers_for(device: str) -> list:
    """onnxruntime's providers for `cpu`, `cuda` or `cuda:N` (device N)."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    kind, colon, index = device.partition(":")
    if kind == "cuda" and (index.isdigit() or not colon):
        if "CUDAExecutionProvider" not in available:
            raise DeviceUnavailable(
                "--device cuda needs onnxruntime-gpu and an NVIDIA GPU; this onnxruntime offers "
                + ", ".join(available)
                + " (install the 'gpu' extra: pip install 'tokenwire[gpu]')"
            )
        # TF32 off: onnxruntime's default rounds fp32 GEMMs (prefill, the many-row MatMulNBits,
        # the Q4_1 corrections) to a 10-bit mantissa while one-row GEMVs stay fp32, so a
        # sequence's logits would depend on the batch it decodes in. Decode is bound by memory,
        # not by these GEMMs: full fp32 costs ~nothing there.
        return [("CUDAExecutionProvider", {"device_id": index or "0", "use_tf32": "0"}), "CPUExecutionProvider"]
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
    session = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers_for(device))
    if device != "cpu" and "CUDAExecutionProvider" not in session.get_providers():
        # onnxruntime falls back to CPU, with a line in its log, when the CUDA provider's library
        # cannot load (a CUDA or cuDNN library missing or of another major version).
        raise DeviceUnavailable(
            f"onnxruntime offers CUDAExecutionProvider but could not start it for {model_path.name} "
            f"(it runs on {', '.join(session.get_providers())}): check that its CUDA and cuDNN "
            "libraries are installed and match the onnxruntime-gpu build")
    return session
