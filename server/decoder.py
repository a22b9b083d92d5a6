"""An onnxruntime session over a decoder-only graph, with the KV cache kept by the caller.

Works on any graph exported by `optimum-cli export onnx --task text-generation-with-past`:
inputs `input_ids`, `attention_mask`, optionally `position_ids`, and `past_key_values.N.key/value`;
outputs `logits` and `present.N.key/value`. Names, layer count, KV dtype and which axis of
the cache is the sequence axis are read from the graph, never assumed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


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


@dataclass
class KVSpec:
    """Where one past tensor goes and what shape its empty version has."""

    input_name: str
    output_name: str
    dtype: type
    shape: list[int | str]  # symbolic dims as strings
    seq_axis: int
    batch_axis: int


# One sequence's cache: the present tensors of the last step, in KVSpec order.
KVCache = list[np.ndarray]


class OnnxDecoder:
    """Runs prefill and decode steps; holds no per-sequence state of its own."""

    def __init__(self, model_path: Path, device: str = "cpu", threads: int = 0) -> None:
        self.session = make_session(model_path, device, threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if "input_ids" not in inputs or "logits" not in outputs:
            raise ValueError("not a decoder graph: it needs an input_ids input and a logits output")
        self.has_position_ids = "position_ids" in inputs
        self.has_attention_mask = "attention_mask" in inputs
        self.kv: list[KVSpec] = []
        for name, meta in inputs.items():
            match = re.fullmatch(r"past_key_values\.(\d+)\.(key|value)", name)
            if not match:
                continue
            out_name = f"present.{match.group(1)}.{match.group(2)}"
            if out_name not in outputs:
                raise ValueError(f"graph has {name} but no {out_name} output")
            shape = [d if isinstance(d, int) else str(d) for d in meta.shape]
            seq_axis = next((i for i, d in enumerate(shape) if isinstance(d, str) and "past" in d), -1)
            if seq_axis < 0:
                raise ValueError(f"cannot tell the sequence axis of {name} from its shape {shape}")
            batch_axis = next((i for i, d in enumerate(shape) if isinstance(d, str) and "batch" in d), 0)
            self.kv.append(KVSpec(name, out_name, _ORT_TO_NUMPY.get(meta.type, np.float32), shape, seq_axis, batch_axis))
        self.kv.sort(key=lambda s: (int(s.input_name.split(".")[1]), s.input_name))
        if not self.kv:
            raise ValueError("graph has no past_key_values inputs: export it with --task text-generation-with-past")
        self.output_names = ["logits"] + [s.output_name for s in self.kv]
        self.vocab_size = int(outputs["logits"].shape[-1]) if isinstance(outputs["logits"].shape[-1], int) else 0

    def empty_cache(self, batch: int = 1) -> KVCache:
        cache = []
        for spec in self.kv:
            shape = []
            for axis, dim in enumerate(spec.shape):
                if axis == spec.seq_axis:
                    shape.append(0)
                elif axis == spec.batch_axis:
                    shape.append(batch)
                else:
                    shape.append(dim if isinstance(dim, int) else 1)
            cache.append(np.zeros(shape, dtype=spec.dtype))
        return cache

    def cache_length(self, cache: KVCache) -> int:
        return int(cache[0].shape[self.kv[0].seq_axis])

    def forward(
        self, input_ids: np.ndarray, cache: KVCache, attention_mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, KVCache]:
        """One step over `input_ids` [batch, new] after `cache`; returns logits [batch, new, vocab]."""
        batch, new = input_ids.shape
        past = self.cache_length(cache)
        if attention_mask is None:
            attention_mask = np.ones((batch, past + new), dtype=np.int64)
        feeds: dict[str, np.ndarray] = {"input_ids": input_ids.astype(np.int64, copy=False)}
        if self.has_attention_mask:
            feeds["attention_mask"] = attention_mask
        if self.has_position_ids:
            positions = np.cumsum(attention_mask, axis=1) - 1
            feeds["position_ids"] = np.maximum(positions[:, past:], 0).astype(np.int64)
        for spec, tensor in zip(self.kv, cache, strict=True):
            feeds[spec.input_name] = tensor
        outputs = self.session.run(self.output_names, feeds)
        return outputs[0], outputs[1:]

    def prefill(self, token_ids: list[int], cache: KVCache | None = None) -> tuple[np.ndarray, KVCache]:
        """Runs the prompt (after an optional cached prefix); returns the last position's logits [vocab]."""
        ids = np.asarray([token_ids], dtype=np.int64)
        logits, present = self.forward(ids, cache if cache is not None else self.empty_cache())
        return logits[0, -1], present

    def decode_one_token(self, token_id: int, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """Feeds one token; returns the next-token logits [vocab] and the grown cache."""
        logits, present = self.forward(np.asarray([[token_id]], dtype=np.int64), cache)
        return logits[0, -1], present

    def full_logits(self, token_ids: list[int]) -> np.ndarray:
        """Logits [len, vocab] of every position, computed without any cache (the reference)."""
        logits, _ = self.forward(np.asarray([token_ids], dtype=np.int64), self.empty_cache())
        return logits[0]
