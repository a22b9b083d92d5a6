"""Batched execution behind the scheduler: one interface, two graph layouts.

The scheduler prefills one sequence at a time (in chunks) and decodes every joined
sequence together. `BatchEngine` is what it needs:

* `OptimumEngine` (optimum_engine.py) — the compatible path, for any optimum export: past
  and present are separate tensors (the graph concatenates), the batch is left-padded.
* `PagedEngine` (paged_engine.py) — the native graph's: one pool of KV pages per layer and a
  page table per row, so each sequence holds only the pages its own length needs.
* `FastEngine` (fast_engine.py) — for graphs from build/fast_graph.py: one KV buffer per layer, shared by past
  and present through IO binding, written in place by GroupQueryAttention. Rows are kept
  dense ([0, B) of a buffer with spare rows), right-padded, and grow by doubling: no
  allocation and no KV copy per step, only when sequences join or leave. On a GPU
  (`device="cuda"`) the buffers live in device memory: a step moves only the token ids and
  mask in and the last position's logits out; the host copy is refreshed only when rows
  join or leave (see `FastEngine._sync_to_host`).

Prefix-cache entries use one format for both: per layer [1, kv_heads, length, head_dim]
(in the KV buffers' own dtype: fp32, or fp16 in the CUDA layout and the native graph).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

# One sequence's cache: per past input, [1, kv_heads, length, head_dim] (or the graph's own
# axis order for optimum exports), in the KV buffers' dtype.
KVCache = list[np.ndarray]


class PrefillState:
    """A sequence being prefilled, before it joins the batch."""

    def __init__(self) -> None:
        self.length = 0
        self.cache: KVCache | None = None  # optimum layout only


class BatchEngine(ABC):
    seq_axis = 2

    @property
    @abstractmethod
    def kv_bytes(self) -> int:
        """Memory held by KV buffers (allocated, for engines that preallocate)."""

    @abstractmethod
    def kv_bytes_for(self, tokens: int) -> int:
        """Memory one sequence of `tokens` positions takes in this engine's cache."""

    @property
    @abstractmethod
    def lengths(self) -> list[int]:
        """Cached positions of each row of the batch."""

    @abstractmethod
    def new_prefill(self, prefix: KVCache | None = None, prefix_length: int = 0) -> PrefillState:
        """Starts a sequence, from a cached prefix when given."""

    @abstractmethod
    def prefill(self, state: PrefillState, tokens: list[int]) -> np.ndarray:
        """Runs `tokens` after what the state holds; returns the last position's logits [vocab]."""

    @abstractmethod
    def join(self, state: PrefillState) -> None:
        """Moves a prefilled sequence into the batch as its last row."""

    def end_prefill(self, state: PrefillState) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """The sequence being prefilled leaves without joining (finished at once, cancelled, failed)."""

    @abstractmethod
    def step(self, tokens: list[int]) -> np.ndarray:
        """One token per row; returns next-token logits [rows, vocab]."""

    @abstractmethod
    def row_cache(self, row: int) -> KVCache:
        """A copy of one row's cache (batch 1, its own length), for the prefix cache."""

    @abstractmethod
    def remove(self, rows: list[int]) -> None:
        """Drops finished rows."""

    def trim(self) -> None:  # noqa: B027 - optional hook: engines that keep spare KV memory give it back
        """Gives back KV memory no sequence holds (the memory budget needs it elsewhere)."""

    @abstractmethod
    def reset(self) -> None:
        """Forgets every row (after a failed step)."""
