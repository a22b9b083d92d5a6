"""PrefixCache on its own: scopes, redundant entries, eviction by bytes, the one-token-to-prefill
rule, min_match, and exact stats."""

from __future__ import annotations

import numpy as np

from tokenwire.server.engine.prefix_cache import PrefixCache


def kv(n: int, tag: float = 0.0) -> list[np.ndarray]:
    """One layer [1, 1, n, 1] of float32 (4 bytes per token), values tag + position."""
    return [(np.arange(n, dtype=np.float32) + tag).reshape(1, 1, n, 1)]


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_interleaved_scopes_find_their_best_entry() -> None:
    cache = PrefixCache(1 << 20, min_match=2)
    b_long = [1, 2, 3, 4, 5, 6]
    a_long = [1, 2, 3, 4, 9, 9]
    cache.store([7, 7, 7], kv(3, 100), scope="alice")
    cache.store(b_long, kv(6, 200), scope="bob")
    cache.store(a_long, kv(6, 300), scope="alice")
    n, got = cache.lookup([1, 2, 3, 4, 9, 9, 5], scope="alice")
    assert n == 6
    assert got[0].ravel().tolist() == [300, 301, 302, 303, 304, 305]
    n, got = cache.lookup([1, 2, 3, 4, 5, 6, 7], scope="bob")
    assert n == 6 and got[0].ravel().tolist() == [200, 201, 202, 203, 204, 205]
    assert cache.lookup([7, 7, 7, 1], scope="alice")[0] == 3
    assert cache.lookup([7, 7, 7, 1], scope="bob") == (0, None)


def test_best_entry_after_other_scope_entries() -> None:
    cache = PrefixCache(1 << 20, min_match=2)
    cache.store([1, 2, 9], kv(3), scope="alice")
    cache.store([1, 2, 3, 4], kv(4), scope="bob")
    cache.store([1, 2, 3, 8], kv(4, 50), scope="alice")
    n, got = cache.lookup([1, 2, 3, 8, 0], scope="alice")
    assert n == 4 and got[0].ravel().tolist() == [50, 51, 52, 53]
    assert cache.stats.entries == 3


def test_storing_drops_a_shorter_prefix_of_the_same_scope_only() -> None:
    cache = PrefixCache(1 << 20, min_match=2)
    cache.store([1, 2, 3], kv(3), scope="alice")
    cache.store([1, 2, 3], kv(3), scope="bob")
    cache.store([1, 2, 4], kv(3), scope="alice")  # not an extension: stays
    assert (cache.stats.entries, cache.stats.bytes) == (3, 36)
    cache.store([1, 2, 3, 4, 5], kv(5), scope="alice")
    assert (cache.stats.entries, cache.stats.bytes) == (3, 3 * 4 + 3 * 4 + 5 * 4)
    assert cache.stats.evictions == 0
    assert cache.lookup([1, 2, 3, 0], scope="bob")[0] == 3
    assert cache.lookup([1, 2, 4, 0], scope="alice")[0] == 3
    # The same tokens again replace the entry (counted once).
    cache.store([1, 2, 3, 4, 5], kv(5), scope="alice")
    assert (cache.stats.entries, cache.stats.bytes) == (3, 44)


def test_eviction_by_bytes_is_lru_with_exact_stats() -> None:
    cache = PrefixCache(40, min_match=2)  # room for 10 tokens
    cache.store(toks(10, 4), kv(4))  # A: 16 bytes
    cache.store(toks(20, 4), kv(4))  # B: 16 bytes
    assert (cache.stats.bytes, cache.stats.entries, cache.stats.evictions) == (32, 2, 0)
    assert cache.lookup(toks(10, 4) + [0])[0] == 4  # A is now the most recent
    cache.store(toks(30, 3), kv(3))  # C: 12 bytes -> 44 > 40: B (least recent) goes
    assert (cache.stats.bytes, cache.stats.entries, cache.stats.evictions) == (28, 2, 1)
    assert cache.lookup(toks(20, 4) + [0]) == (0, None)
    assert cache.lookup(toks(10, 4) + [0])[0] == 4
    cache.store(toks(40, 10), kv(10))  # 40 bytes: everything else goes
    assert (cache.stats.bytes, cache.stats.entries, cache.stats.evictions) == (40, 1, 3)
    cache.store(toks(50, 11), kv(11))  # bigger than the budget: not stored, nothing evicted
    assert (cache.stats.bytes, cache.stats.entries, cache.stats.evictions) == (40, 1, 3)


def test_a_prompt_equal_to_an_entry_leaves_one_token_to_prefill() -> None:
    cache = PrefixCache(1 << 20, min_match=2)
    cache.store(toks(1, 6), kv(6, 10))
    n, got = cache.lookup(toks(1, 6))
    assert n == 5
    assert got[0].shape == (1, 1, 5, 1) and got[0].ravel().tolist() == [10, 11, 12, 13, 14]
    assert cache.lookup(toks(1, 4))[0] == 3  # a shorter prompt: its length - 1
    assert (cache.stats.hits, cache.stats.misses, cache.stats.reused_tokens) == (2, 0, 8)


def test_min_match_boundary_and_exact_stats() -> None:
    cache = PrefixCache(1 << 20, min_match=4)
    cache.store([5, 6, 7, 8, 9, 10], kv(6))
    assert cache.lookup([5, 6, 7, 8, 0])[0] == 4  # exactly min_match: a hit
    assert cache.lookup([5, 6, 7, 0, 0]) == (0, None)  # min_match - 1: a miss
    assert cache.lookup([0, 6, 7, 8, 9, 10, 11]) == (0, None)  # differs at token 0 only
    assert cache.lookup([5, 6, 7, 8, 9, 10, 11])[0] == 6
    assert (cache.stats.hits, cache.stats.misses, cache.stats.reused_tokens) == (2, 2, 10)


def test_short_sequences_and_disabled_cache_are_not_stored() -> None:
    cache = PrefixCache(1 << 20, min_match=4)
    cache.store([1, 2, 3], kv(3))
    assert cache.stats.entries == 0
    cache.store([1, 2, 3, 4], kv(4))
    assert cache.stats.entries == 1
    off = PrefixCache(0, min_match=1)
    assert not off.enabled
    off.store([1, 2, 3], kv(3))
    assert off.lookup([1, 2, 3, 4]) == (0, None)
    assert (off.stats.entries, off.stats.misses, off.stats.hits) == (0, 0, 0)


def test_lookup_returns_a_copy() -> None:
    cache = PrefixCache(1 << 20, min_match=2)
    cache.store([1, 2, 3, 4], kv(4))
    _, got = cache.lookup([1, 2, 3, 4, 5])
    got[0][...] = -1
    assert cache.lookup([1, 2, 3, 4, 5])[1][0].ravel().tolist() == [0, 1, 2, 3]
