"""KV state of finished turns, kept in a memory-bounded LRU keyed by their token prefix.

A new request whose prompt starts with a cached sequence's tokens reuses that KV and
prefills only the rest, so a chat's next turn does not recompute its history.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .batch_engine import KVCache


@dataclass
class PrefixCacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    reused_tokens: int = 0
    bytes: int = 0
    entries: int = 0


class PrefixCache:
    def __init__(self, budget_bytes: int, min_match: int = 8, seq_axis: int = 2) -> None:
        self.budget_bytes = budget_bytes
        self.min_match = min_match
        self.seq_axis = seq_axis
        self._entries: OrderedDict[tuple[int, ...], KVCache] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = PrefixCacheStats()

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def lookup(self, prompt: list[int]) -> tuple[int, KVCache | None]:
        """The longest cached prefix of `prompt` (leaving >= 1 token to prefill): (length, its KV)."""
        if not self.enabled:
            return 0, None
        best_key, best = None, 0
        limit = len(prompt) - 1
        with self._lock:
            for key in self._entries:
                n = _common_prefix(key, prompt, limit)
                if n > best:
                    best_key, best = key, n
            if best_key is None or best < self.min_match:
                self.stats.misses += 1
                return 0, None
            self._entries.move_to_end(best_key)
            kv = self._entries[best_key]
            self.stats.hits += 1
            self.stats.reused_tokens += best
        return best, [np.ascontiguousarray(np.take(t, np.arange(best), axis=self.seq_axis)) for t in kv]

    def store(self, tokens: list[int], kv: KVCache) -> None:
        if not self.enabled or len(tokens) < self.min_match:
            return
        size = sum(t.nbytes for t in kv)
        if size > self.budget_bytes:
            return
        key = tuple(tokens)
        with self._lock:
            # A stored sequence that is a prefix of this one is now redundant.
            for other in [k for k in self._entries if len(k) <= len(key) and key[: len(k)] == k]:
                self._drop(other)
            self._entries[key] = kv
            self.stats.bytes += size
            while self.stats.bytes > self.budget_bytes and self._entries:
                self._drop(next(iter(self._entries)))
                self.stats.evictions += 1
            self.stats.entries = len(self._entries)

    def _drop(self, key: tuple[int, ...]) -> None:
        kv = self._entries.pop(key)
        self.stats.bytes -= sum(t.nbytes for t in kv)
        self.stats.entries = len(self._entries)


def _common_prefix(a: tuple[int, ...], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
