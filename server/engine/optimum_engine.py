"""The compatible path: any decoder graph that optimum exports, batched by left padding.

Works on any graph exported by `optimum-cli export onnx --task text-generation-with-past`:
inputs `input_ids`, `attention_mask`, optionally `position_ids`, and `past_key_values.N.key/value`;
outputs `logits` and `present.N.key/value`. Names, layer count, KV dtype and which axis of
the cache is the sequence axis are read from the graph, never assumed.

The KV cache of the running batch is one left-padded tensor per past input: [batch, kv_heads,
P, head_dim] where P is the longest sequence; row b holds its L_b cached positions at the
right end, [P - L_b, P), and zeros on the left. The attention mask [batch, P + 1] has ones on
each row's own positions plus the new token, so padding takes no part in attention, and the
graph derives each row's position ids from the mask. Rows are copied only when sequences
join or leave. The graph concatenates past and new keys, so every step copies the cache: the
fast graph (FastEngine) is the path for speed; this one is the path for any model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .batch_engine import BatchEngine, KVCache, PrefillState
from .session import make_session

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


@dataclass
class KVSpec:
    """Where one past tensor goes and what shape its empty version has."""

    input_name: str
    output_name: str
    dtype: type
    shape: list[int | str]  # symbolic dims as strings
    seq_axis: int
    batch_axis: int


class OptimumEngine(BatchEngine):
    def __init__(self, model_path: Path, device: str = "cpu", threads: int = 0) -> None:
        self.session = make_session(Path(model_path), device, threads)
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
        self.seq_axis = self.kv[0].seq_axis
        self.reset()

    # ---- one forward pass ------------------------------------------------------------------

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
        return int(cache[0].shape[self.seq_axis])

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

    def full_logits(self, token_ids: list[int]) -> np.ndarray:
        """Logits [len, vocab] of every position, computed without any cache (the reference)."""
        logits, _ = self.forward(np.asarray([token_ids], dtype=np.int64), self.empty_cache())
        return logits[0]

    # ---- BatchEngine ---------------------------------------------------------------------------

    @property
    def lengths(self) -> list[int]:
        return self._lengths

    @property
    def kv_bytes(self) -> int:
        return sum(t.nbytes for t in self._cache)

    def kv_bytes_for(self, tokens: int) -> int:
        per_token = 0
        for spec in self.kv:
            dims = [d for axis, d in enumerate(spec.shape) if axis not in (spec.seq_axis, spec.batch_axis)]
            per_token += int(np.prod([d if isinstance(d, int) else 1 for d in dims])) * np.dtype(spec.dtype).itemsize
        return tokens * per_token

    @property
    def _width(self) -> int:
        return self.cache_length(self._cache)

    def new_prefill(self, prefix: KVCache | None = None, prefix_length: int = 0) -> PrefillState:
        state = PrefillState()
        state.cache = prefix if prefix is not None else self.empty_cache()
        state.length = prefix_length
        return state

    def prefill(self, state: PrefillState, tokens: list[int]) -> np.ndarray:
        logits, state.cache = self.forward(np.asarray([tokens], dtype=np.int64), state.cache)
        state.length += len(tokens)
        return logits[0, -1]

    def join(self, state: PrefillState) -> None:
        width, length = self._width, state.length
        new_width = max(width, length)
        merged = []
        for spec, batch_t, row_t in zip(self.kv, self._cache, state.cache, strict=True):
            a = _pad_left(batch_t, spec.seq_axis, new_width - width)
            b = _pad_left(row_t, spec.seq_axis, new_width - length)
            merged.append(np.concatenate([a, b], axis=spec.batch_axis))
        self._cache = merged
        self._lengths.append(length)
        state.cache = None

    def step(self, tokens: list[int]) -> np.ndarray:
        batch, width = len(self._lengths), self._width
        mask = np.zeros((batch, width + 1), dtype=np.int64)
        for b, length in enumerate(self._lengths):
            mask[b, width - length :] = 1
        ids = np.asarray(tokens, dtype=np.int64).reshape(batch, 1)
        logits, self._cache = self.forward(ids, self._cache, attention_mask=mask)
        self._lengths = [n + 1 for n in self._lengths]
        return logits[:, -1, :]

    def row_cache(self, row: int) -> KVCache:
        length, width = self._lengths[row], self._width
        out = []
        for spec, t in zip(self.kv, self._cache, strict=True):
            t = np.take(t, [row], axis=spec.batch_axis)
            out.append(np.ascontiguousarray(np.take(t, np.arange(width - length, width), axis=spec.seq_axis)))
        return out

    def remove(self, rows: list[int]) -> None:
        if not rows:
            return
        gone = set(rows)
        keep = [i for i in range(len(self._lengths)) if i not in gone]
        self._lengths = [self._lengths[i] for i in keep]
        trim = self._width - max(self._lengths, default=0)
        cache = []
        for spec, t in zip(self.kv, self._cache, strict=True):
            t = np.take(t, keep, axis=spec.batch_axis)
            if trim:
                t = np.take(t, np.arange(trim, t.shape[spec.seq_axis]), axis=spec.seq_axis)
            cache.append(t)
        self._cache = cache

    def reset(self) -> None:
        self._cache: KVCache = self.empty_cache(batch=0)
        self._lengths: list[int] = []


def _pad_left(tensor: np.ndarray, axis: int, amount: int) -> np.ndarray:
    if amount == 0:
        return tensor
    widths = [(0, 0)] * tensor.ndim
    widths[axis] = (amount, 0)
    return np.pad(tensor, widths)
