"""KV state of finished turns, kept in a memory-bounded LRU keyed by their token prefix.

A new request whose prompt starts with a cached sequence's tokens reuses that KV and
prefills only the rest, so a chat's next turn does not recompute its history.

Entries belong to a scope (the caller's identity when the server has API keys, "" when it has
none): a lookup sees only its own scope's entries. Otherwise one user's time to first token, or
the reuse counters, would tell whether another user's prompt started the same way (a stored PIN
was recovered digit by digit so; vLLM's cache_salt answers the same attack).
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
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], KVCache] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = PrefixCacheStats()

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def lookup(self, prompt: list[int], scope: str = "") -> tuple[int, KVCache | None]:
        """The longest prefix of `prompt` cached in `scope` (leaving >= 1 token to prefill):
        (length, its KV)."""
        if not self.enabled:
            return 0, None
        best_key, best = None, 0
        limit = len(prompt) - 1
        with self._lock:
            for key in self._entries:
                if key[0] != scope:
                    continue
                n = _common_prefix(key[1], prompt, limit)
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

    def store(self, tokens: list[int], kv: KVCache, scope: str = "") -> None:
        if not self.enabled or len(tokens) < self.min_match:
            return
        size = sum(t.nbytes for t in kv)
        if size > self.budget_bytes:
            return
        key = (scope, tuple(tokens))
        with self._lock:
            # A sequence of the same scope that is a prefix of this one is now redundant.
            for other in [k for k in self._entries
                          if k[0] == scope and len(k[1]) <= len(key[1]) and key[1][: len(k[1])] == k[1]]:
                self._drop(other)
            self._entries[key] = kv
            self.stats.bytes += size
            while self.stats.bytes > self.budget_bytes and self._entries:
                self._drop(next(iter(self._entries)))
                self.stats.evictions += 1
            self.stats.entries = len(self._entries)

    def store_prefix(self, tokens: list[int], kv: KVCache, length: int, scope: str) -> None:
        """Stores the first `length` tokens of a sequence and their KV (a shared system prompt's),
        unless that entry is cached already (then it only counts as recently used)."""
        key = (scope, tuple(tokens[:length]))
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
        head = [np.ascontiguousarray(np.take(t, np.arange(length), axis=self.seq_axis)) for t in kv]
        self.store(list(key[1]), head, scope)

    def shrink_to(self, nbytes: int) -> None:
        """Drops the least recently used entries until the cache holds at most `nbytes`."""
        with self._lock:
            while self.stats.bytes > nbytes and self._entries:
                self._drop(next(iter(self._entries)))
                self.stats.evictions += 1

    def _drop(self, key: tuple[str, tuple[int, ...]]) -> None:
        kv = self._entries.pop(key)
        self.stats.bytes -= sum(t.nbytes for t in kv)
        self.stats.entries = len(self._entries)


def _common_prefix(a: tuple[int, ...], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
