"""PagedEngine: the native graph's KV cache as one pool of fixed-size pages per layer.

Each sequence holds only the pages its own length needs (PAGE positions each), listed in its
row of a page table the graph reads (`kv_pages`, [rows, pages per row]); the native attention
op finds position p of row b in page `kv_pages[b, p // PAGE]`. So 15 short chats and one long
one cost their own lengths, not 16 times the longest, and a sequence that joins the batch or
leaves it moves no KV at all: its page list changes hands.

The pool ([pages, kv_heads, PAGE, head_dim] fp16, or [.., row bytes] uint8 in the int8 format of
kv_int8.py; one array per past input, bound zero-copy as both past and present) grows by an eighth (at least GROW_MIN pages) when the free pages run out,
and is compacted into a smaller array when a quarter or less of it is in use. Both copy the pool
once; neither happens per step.
"""

from __future__ import annotations

import heapq
from pathlib import Path

import numpy as np

from . import kv_int8
from .batch_engine import KVCache, PrefillState
from .fast_engine import FastEngine

PAGE = 16  # positions per page: the attention op's key tile, so a tile never straddles pages
GROW_MIN = 64  # pages added at least when the pool grows (1,024 positions)


class PagedPrefill(PrefillState):
    """A sequence being prefilled: the pages it writes into (they become its row's when it joins)."""

    def __init__(self) -> None:
        super().__init__()
        self.pages: list[int] = []
        self.stale = False  # the engine was reset under it: its KV is gone


class PagedEngine(FastEngine):
    """FastEngine's interface over a paged pool (the native graph built with a `kv_pages` input).

    Opened by FastEngine itself when the model's native graph is paged (see FastEngine.__new__).
    """

    def __init__(self, model_dir: Path, device: str = "cpu", threads: int = 0, context_length: int = 0,
                 device_buffers: bool | None = None, kernels: str | None = None) -> None:
        if device_buffers:
            raise ValueError("the paged KV pool lives in host memory (the native kernels are CPU kernels)")
        self._pool: list[np.ndarray] = []
        self._free: list[int] = []  # a heap: the lowest free pages are taken first, so compaction moves less
        self._row_pages: list[list[int]] = []
        self._prefills: list[PagedPrefill] = []  # started, not joined or ended
        super().__init__(model_dir, device, threads, context_length, device_buffers=False, kernels=kernels)
        self.page_bytes = PAGE * self.kv_heads * self.row_width * np.dtype(self.dtype).itemsize * len(self.names)

    @property
    def int8(self) -> bool:
        """The cache in the int8 format (kv_int8.py), else fp16."""
        return self.dtype == np.uint8

    @property
    def row_width(self) -> int:
        """A position's elements per KV head in the pool: head_dim halves, or an int8 row's bytes."""
        return kv_int8.row_bytes(self.head_dim) if self.int8 else self.head_dim

    # ---- the pool ------------------------------------------------------------------------------

    def _ensure(self, rows: int, cap: int) -> None:  # FastEngine's dense buffers: none here
        self._logits = np.zeros((max(rows, 1), 1, self.vocab), dtype=np.float32)
        if not self._pool:
            self._resize(GROW_MIN)

    @property
    def pages_total(self) -> int:
        return self._pool[0].shape[0] if self._pool else 0

    @property
    def pages_used(self) -> int:
        return self.pages_total - len(self._free)

    @property
    def kv_bytes(self) -> int:
        """The pool as allocated (free pages included): what the process holds."""
        return sum(b.nbytes for b in self._pool)

    @property
    def kv_bytes_used(self) -> int:
        """The pages that sequences hold."""
        return self.pages_used * self.page_bytes

    def kv_bytes_for(self, tokens: int) -> int:
        return -(-tokens // PAGE) * self.page_bytes

    def _resize(self, total: int, mapping: dict[int, int] | None = None) -> None:
        """A pool of `total` pages; `mapping` (old page -> new page) says which pages move where
        (None: all of them stay where they are, the pool only grows)."""
        old = self._pool
        fresh = [np.zeros((total, self.kv_heads, PAGE, self.row_width), dtype=self.dtype) for _ in self.names]
        if old and mapping is None:
            n = old[0].shape[0]
            for src, dst in zip(old, fresh, strict=True):
                dst[:n] = src
            used = {p for p in range(n)} - set(self._free)
            self._free = sorted(set(range(total)) - used)
        elif old:
            src_ids = np.fromiter(mapping.keys(), dtype=np.int64)
            dst_ids = np.fromiter(mapping.values(), dtype=np.int64)
            for src, dst in zip(old, fresh, strict=True):
                dst[dst_ids] = src[src_ids]
            self._free = sorted(set(range(total)) - set(mapping.values()))
            for pages in [*self._row_pages, *(s.pages for s in self._prefills)]:
                pages[:] = [mapping[p] for p in pages]
        else:
            self._free = list(range(total))
        heapq.heapify(self._free)
        self._pool = fresh
        self._bindings.clear()

    def _take(self, pages: list[int], positions: int) -> None:
        """Extends a page list to cover `positions` positions."""
        need = -(-positions // PAGE) - len(pages)
        if need <= 0:
            return
        if need > len(self._free):
            total = self.pages_total
            self._resize(total + max(need - len(self._free), total // 8, GROW_MIN))
        pages.extend(heapq.heappop(self._free) for _ in range(need))

    def _give_back(self, pages: list[int]) -> None:
        for p in pages:
            heapq.heappush(self._free, p)
        pages.clear()

    def trim(self) -> None:
        """Compacts the pool to the pages in use (an eighth spare, at least GROW_MIN)."""
        used = self.pages_used
        if self.pages_total > max(GROW_MIN, used + used // 8):
            self._compact_to(max(GROW_MIN, used + used // 8))

    def _compact_to(self, total: int) -> None:
        """A pool of `total` pages holding the live pages first, in order (page lists renumbered)."""
        live = [p for pages in [*self._row_pages, *(s.pages for s in self._prefills)] for p in pages]
        self._resize(total, {p: i for i, p in enumerate(live)})

    def _compact_if_sparse(self) -> None:
        """Gives memory back once a quarter or less of the pool is in use."""
        total, used = self.pages_total, self.pages_used
        if total <= GROW_MIN or used > total // 4:
            return
        self._compact_to(max(GROW_MIN, 2 * used))

    @staticmethod
    def _table(page_lists: list[list[int]]) -> np.ndarray:
        width = max((len(p) for p in page_lists), default=1) or 1
        table = np.zeros((len(page_lists), width), dtype=np.int32)
        for row, pages in enumerate(page_lists):
            table[row, : len(pages)] = pages
        return table

    def _is_key(self, index: int) -> bool:
        return self.names[index].endswith(".key")

    def _scatter(self, pages: list[int], kv: KVCache, length: int) -> None:
        """Writes a [1, kv_heads, length, head_dim] cache (int8: kv_int8's entry arrays) into the
        first pages of a list."""
        for i, (buf, src) in enumerate(zip(self._pool, kv, strict=True)):
            s, n = src[0], length
            if self.int8 and self._is_key(i):  # whole blocks, each with its scales
                s = kv_int8.entry_to_keys(s[:, :length], self.head_dim)
                n = s.shape[1]
            full, rest = divmod(n, PAGE)
            if full:
                blocks = s[:, : full * PAGE].reshape(self.kv_heads, full, PAGE, self.row_width)
                buf[pages[:full]] = blocks.transpose(1, 0, 2, 3)
            if rest:
                buf[pages[full], :, :rest] = s[:, full * PAGE : n]

    def _gather(self, pages: list[int], length: int) -> KVCache:
        n = -(-length // PAGE)
        out = []
        for i, buf in enumerate(self._pool):
            blocks = buf[pages[:n]]  # [n, kv_heads, PAGE, row_width] (a copy)
            rows = blocks.transpose(1, 0, 2, 3).reshape(1, self.kv_heads, n * PAGE, self.row_width)
            if self.int8 and self._is_key(i):
                out.append(kv_int8.keys_to_entry(rows, length, self.head_dim))
            else:
                out.append(rows[:, :, :length].copy())
        return out

    # ---- BatchEngine ---------------------------------------------------------------------------

    def new_prefill(self, prefix: KVCache | None = None, prefix_length: int = 0) -> PrefillState:
        state = PagedPrefill()
        self._prefills.append(state)
        if prefix is not None:
            try:
                self._take(state.pages, prefix_length + 1)
                self._scatter(state.pages, prefix, prefix_length)
            except BaseException:  # the caller never gets the state to end: give its pages back here
                self.end_prefill(state)
                raise
            state.length = prefix_length
        return state

    def prefill(self, state: PrefillState, tokens: list[int]) -> np.ndarray:
        assert isinstance(state, PagedPrefill)
        if state.stale:
            raise RuntimeError("this prefill began before the engine was reset: start it again")
        total = state.length + len(tokens)
        self._take(state.pages, total)
        ids = np.asarray([tokens], dtype=np.int64)
        mask = np.ones((1, total), dtype=np.int64)
        out = np.empty((1, 1, self.vocab), dtype=np.float32)
        self._run("pool", ids, mask, self._pool, out, self._table([state.pages]))
        state.length = total
        return out[0, -1]

    def join(self, state: PrefillState) -> None:
        assert isinstance(state, PagedPrefill)
        self._row_pages.append(state.pages)
        self._lengths.append(state.length)
        state.pages = []
        self.end_prefill(state)

    def end_prefill(self, state: PrefillState) -> None:
        if isinstance(state, PagedPrefill):
            self._give_back(state.pages)
            if state in self._prefills:
                self._prefills.remove(state)
        self._compact_if_sparse()

    def step(self, tokens: list[int]) -> np.ndarray:
        rows = len(self._lengths)
        for pages, length in zip(self._row_pages, self._lengths, strict=True):
            self._take(pages, length + 1)
        if self._logits.shape[0] < rows:
            self._logits = np.zeros((max(rows, 2 * self._logits.shape[0]), 1, self.vocab), dtype=np.float32)
        longest = max(self._lengths) + 1
        mask = np.zeros((rows, longest), dtype=np.int64)
        for b, length in enumerate(self._lengths):
            mask[b, : length + 1] = 1
        ids = np.asarray(tokens, dtype=np.int64).reshape(rows, 1)
        logits = self._run("pool", ids, mask, self._pool, self._logits[:rows], self._table(self._row_pages))
        self._lengths = [n + 1 for n in self._lengths]
        return logits[:, 0, :]

    def row_cache(self, row: int) -> KVCache:
        return self._gather(self._row_pages[row], self._lengths[row])

    def remove(self, rows: list[int]) -> None:
        gone = set(rows)
        for i in sorted(gone):
            self._give_back(self._row_pages[i])
        self._row_pages = [p for i, p in enumerate(self._row_pages) if i not in gone]
        self._lengths = [n for i, n in enumerate(self._lengths) if i not in gone]
        self._compact_if_sparse()

    def reset(self) -> None:
        for state in self._prefills:  # a state kept past the reset holds no page of the new pool
            state.pages, state.stale = [], True
        self._lengths, self._row_pages, self._prefills = [], [], []
        self._bindings.clear()
        self._pool = []
        self._resize(GROW_MIN)
