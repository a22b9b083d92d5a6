"""FastEngine: a fast graph (build/fast_graph.py) over preallocated, in-place KV buffers.

One KV buffer per layer, shared by past and present through IO binding, written in place by
the graph's attention. Rows are kept dense ([0, B) of a buffer with spare rows), right-padded,
and grow by doubling: no allocation and no KV copy per step, only when sequences join or
leave. On a GPU (`device="cuda"`) the buffers live in device memory: a step moves only the
token ids and mask in and the last position's logits out; the host copy is refreshed only
when rows join or leave (see `FastEngine._sync_to_host`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from .batch_engine import BatchEngine, KVCache, PrefillState
from .graph import choose_kernels, kv_numpy_dtype, native_kv_layout, open_graph
from .model_config import ModelConfig


class FastEngine(BatchEngine):
    """Drives a fast_graph.py graph with IO binding over preallocated, in-place KV buffers.

    The numpy arrays in `_kv` / `_scratch` are the KV buffers themselves on CPU (bound
    zero-copy). With device buffers (the default off CPU; `device_buffers=True` forces them,
    which is how the CPU tests cover that path) they are host staging copies: the binding
    owns OrtValues in device memory that the graph updates in place step after step, and
    the host copies are synced only around row bookkeeping (join, remove, grow, export).
    """

    def __new__(cls, model_dir: Path, device: str = "cpu", threads: int = 0, context_length: int = 0,
                device_buffers: bool | None = None, kernels: str | None = None):
        """A PagedEngine when the native kernels run a paged native graph (the default model's
        layout since build 7), else this dense-row engine."""
        if (cls is FastEngine and not device_buffers and native_kv_layout(Path(model_dir)) == "paged"
                and choose_kernels(Path(model_dir), device, kernels)[0] == "native"):
            from .paged_engine import PagedEngine

            return super().__new__(PagedEngine)
        return super().__new__(cls)

    def __init__(self, model_dir: Path, device: str = "cpu", threads: int = 0, context_length: int = 0,
                 device_buffers: bool | None = None, kernels: str | None = None) -> None:
        self.kernels, self.kernels_note = choose_kernels(model_dir, device, kernels)
        if self.kernels == "native" and type(self) is FastEngine and native_kv_layout(Path(model_dir)) == "paged":
            # Dense rows asked for (device buffers) over a paged native graph: onnxruntime's graph has them.
            self.kernels, self.kernels_note = "onnxruntime", "dense KV rows asked for; the native graph is paged"
            if kernels == "native":
                raise ValueError("the native graph keeps its KV in pages: it cannot run with device buffers")
        self.session = open_graph(model_dir, self.kernels == "native", device, threads)
        self.device = "cuda" if device.startswith("cuda") else "cpu"
        self.device_id = int(device.split(":", 1)[1]) if ":" in device else 0
        self.device_buffers = (self.device != "cpu") if device_buffers is None else device_buffers
        self.dtype = kv_numpy_dtype(self.session)
        if self.device == "cuda" and self.dtype != np.float16:
            raise ValueError(
                f"{model_dir.name} keeps its KV cache in fp32 (the CPU layout); onnxruntime's CUDA "
                "attention needs fp16: build the CUDA layout with `tokenwire pull NAME --device cuda`")
        config = ModelConfig.read(model_dir)
        self.layers, self.kv_heads, self.head_dim = config.layers, config.kv_heads, config.head_dim
        self.vocab = config.vocab_size
        self.context_length = context_length or config.context_length
        self.names = [f"past_key_values.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]
        self._lengths: list[int] = []
        self._rows = 0  # allocated rows
        self._cap = 0  # allocated positions per row
        self._kv: list[np.ndarray] = []
        self._logits = np.zeros((0, 1, self.vocab), dtype=np.float32)
        self._scratch: list[np.ndarray] = []
        self._scratch_cap = 0
        self._prefill_active = False  # the scratch holds a sequence being prefilled
        # The last IO binding per buffer set (batch rows / prefill scratch): rebinding 60 KV
        # buffers costs ~250 us a step, so a binding is kept until its buffers change.
        self._bindings: dict[str, tuple[tuple, list[np.ndarray], ort.IOBinding, list[ort.OrtValue]]] = {}
        self._ensure(rows=1, cap=256)

    # ---- buffers ---------------------------------------------------------------------------

    def _alloc(self, rows: int, cap: int) -> list[np.ndarray]:
        return [np.zeros((rows, self.kv_heads, cap, self.head_dim), dtype=self.dtype) for _ in self.names]

    def _grow_cap(self, needed: int, current: int) -> int:
        """Positions to allocate: doubling from the current size (min 256), capped by the context."""
        cap = max(current, 256)
        while cap < needed:
            cap *= 2
        return min(cap, max(self.context_length, needed))

    def _realloc(self, rows: int, cap: int) -> None:
        """New row buffers of rows x cap, keeping the live rows' positions."""
        self._sync_to_host("decode")
        fresh = self._alloc(rows, cap)
        n = min(len(self._lengths), rows)
        keep = min(cap, self._cap)
        for old, new in zip(self._kv, fresh, strict=False):
            new[:n, :, :keep] = old[:n, :, :keep]
        self._kv, self._rows, self._cap = fresh, rows, cap
        self._logits = np.zeros((rows, 1, self.vocab), dtype=np.float32)

    def _ensure(self, rows: int, cap: int) -> None:
        if rows <= self._rows and cap <= self._cap:
            return
        new_rows = max(rows, self._rows * 2 if rows > self._rows else self._rows, 1)
        new_cap = self._grow_cap(cap, self._cap) if cap > self._cap else self._cap
        self._realloc(new_rows, new_cap)

    def _shrink_if_sparse(self) -> None:
        """Gives memory back once the batch uses a quarter or less of its rows or positions."""
        n = len(self._lengths)
        need = max(self._lengths, default=0) + 1
        if (self._rows > 1 and n <= self._rows // 4) or (self._cap > 256 and need <= self._cap // 4):
            self._realloc(max(1, n), self._grow_cap(need, 256))
        self._release_scratch_if_large()

    def _ensure_scratch(self, cap: int) -> None:
        if cap <= self._scratch_cap:
            return
        new_cap = self._grow_cap(cap, self._scratch_cap)
        self._sync_to_host("prefill")
        fresh = [np.zeros((1, self.kv_heads, new_cap, self.head_dim), dtype=self.dtype) for _ in self.names]
        for old, new in zip(self._scratch, fresh, strict=False):
            new[:, :, : self._scratch_cap] = old
        self._scratch, self._scratch_cap = fresh, new_cap

    def _binding(self, purpose: str, buffers: list[np.ndarray], rows: int) -> ort.IOBinding:
        """An IO binding with the first `rows` rows of `buffers` bound as past and present.

        Reused while the buffer objects and row count are the same; the cache holds the
        buffers themselves, so their ids cannot be recycled while a binding refers to them.
        """
        key = (rows, *map(id, buffers))
        cached = self._bindings.get(purpose)
        if cached is not None and cached[0] == key:
            return cached[2]
        self._sync_to_host(purpose)
        io = self.session.io_binding()
        values = []
        for name, buf in zip(self.names, buffers, strict=True):
            if self.device_buffers:  # device memory owned by onnxruntime, filled from the host copy once
                value = ort.OrtValue.ortvalue_from_shape_and_type(buf[:rows].shape, self.dtype, self.device,
                                                                  self.device_id)
                value.update_inplace(np.ascontiguousarray(buf[:rows]))
            else:
                value = ort.OrtValue.ortvalue_from_numpy(buf[:rows])
            io.bind_ortvalue_input(name, value)
            io.bind_ortvalue_output(name.replace("past_key_values", "present"), value)
            values.append(value)
        self._bindings[purpose] = (key, buffers, io, values)
        return io

    def _sync_to_host(self, purpose: str) -> None:
        """Before the host copies are read or rearranged: bring the device buffers' contents
        back and drop their binding (the next step binds fresh device buffers from the host).
        A no-op on CPU, where the host arrays are the buffers."""
        cached = self._bindings.pop(purpose, None)
        if cached is None or not self.device_buffers:
            return
        rows = cached[0][0]
        for buf, value in zip(cached[1], cached[3], strict=True):
            buf[:rows] = value.numpy()

    def _run(self, purpose: str, ids: np.ndarray, mask: np.ndarray, buffers: list[np.ndarray],
             logits: np.ndarray, pages: np.ndarray | None = None) -> np.ndarray:
        """One run over `buffers` (their first rows for the batch; all of a paged pool, whose
        page table is `pages`)."""
        io = self._binding(purpose, buffers, ids.shape[0] if pages is None else buffers[0].shape[0])
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        if pages is not None:
            io.bind_cpu_input("kv_pages", pages)
        io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(io)
        return logits

    # ---- BatchEngine -------------------------------------------------------------------------

    @property
    def lengths(self) -> list[int]:
        return self._lengths

    @property
    def kv_bytes(self) -> int:
        return sum(b.nbytes for b in self._kv) + sum(b.nbytes for b in self._scratch)

    def kv_bytes_for(self, tokens: int) -> int:
        return tokens * len(self.names) * self.kv_heads * self.head_dim * np.dtype(self.dtype).itemsize

    def new_prefill(self, prefix: KVCache | None = None, prefix_length: int = 0) -> PrefillState:
        state = PrefillState()
        self._prefill_active = True
        self._sync_to_host("prefill")
        if prefix is not None:
            self._ensure_scratch(prefix_length + 1)
            for buf, kv in zip(self._scratch, prefix, strict=True):
                buf[:, :, :prefix_length] = kv
            state.length = prefix_length
        return state

    def prefill(self, state: PrefillState, tokens: list[int]) -> np.ndarray:
        total = state.length + len(tokens)
        self._ensure_scratch(total)
        ids = np.asarray([tokens], dtype=np.int64)
        mask = np.ones((1, total), dtype=np.int64)
        out = np.empty((1, 1, self.vocab), dtype=np.float32)
        self._run("prefill", ids, mask, self._scratch, out)
        state.length = total
        return out[0, -1]

    def join(self, state: PrefillState) -> None:
        self._sync_to_host("prefill")
        self._sync_to_host("decode")
        row = len(self._lengths)
        self._ensure(rows=row + 1, cap=state.length + 1)
        for buf, scratch in zip(self._kv, self._scratch, strict=True):
            buf[row, :, : state.length] = scratch[0, :, : state.length]
        self._lengths.append(state.length)
        self.end_prefill(state)

    def end_prefill(self, state: PrefillState) -> None:
        self._prefill_active = False
        self._release_scratch_if_large()

    def _release_scratch_if_large(self) -> None:
        """A long prompt grew the prefill scratch; once no prefill uses it, let it go."""
        need = max(self._lengths, default=0) + 1
        if not self._prefill_active and self._scratch_cap > max(1024, 4 * need):
            self._scratch, self._scratch_cap = [], 0
            self._bindings.pop("prefill", None)

    def step(self, tokens: list[int]) -> np.ndarray:
        rows = len(self._lengths)
        longest = max(self._lengths) + 1
        self._ensure(rows=rows, cap=longest)
        mask = np.zeros((rows, longest), dtype=np.int64)
        for b, length in enumerate(self._lengths):
            mask[b, : length + 1] = 1
        ids = np.asarray(tokens, dtype=np.int64).reshape(rows, 1)
        logits = self._run("decode", ids, mask, self._kv, self._logits[:rows])
        self._lengths = [n + 1 for n in self._lengths]
        return logits[:, 0, :]

    def row_cache(self, row: int) -> KVCache:
        self._sync_to_host("decode")
        length = self._lengths[row]
        return [buf[row : row + 1, :, :length].copy() for buf in self._kv]

    def remove(self, rows: list[int]) -> None:
        """Drops rows, moving later rows up so [0, B) stays dense."""
        self._sync_to_host("decode")
        gone = set(rows)
        keep = [i for i in range(len(self._lengths)) if i not in gone]
        for dst, src in enumerate(keep):
            if dst != src:
                length = self._lengths[src]
                for buf in self._kv:
                    buf[dst, :, :length] = buf[src, :, :length]
        self._lengths = [self._lengths[i] for i in keep]
        self._shrink_if_sparse()

    def reset(self) -> None:
        self._lengths = []
        self._prefill_active = False
        self._scratch, self._scratch_cap = [], 0
        # Dropped unread: after a failed step the device buffers hold nothing worth a copy back,
        # and reading them could fail again (a device in an error state) inside the recovery.
        self._bindings.clear()
        self._realloc(1, 256)


