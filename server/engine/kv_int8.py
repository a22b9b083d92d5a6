"""The native graph's int8 KV cache format (kv_format "int8", server/native/tw_kv8.c), in numpy.

A cache buffer holds one row of `row_bytes(head_dim)` = head_dim + head_dim / 4 bytes per position
and KV head; codes are uint8, x = minimum + scale * code. A value row: codes, then its fp16 scale
and fp16 minimum. Keys come in blocks of BLOCK positions: codes per row, and the block's
per-channel fp16 scales, then minimums, spread over its 16 row tails.

Cached prefixes (the prefix cache, the KV disk tier) cut entries at any position along axis 2,
so an entry cannot hold a key block's scales in only some of its rows: an entry's key rows carry
their block's scales and minimums in full (codes, then 2 head_dim fp16: 5 head_dim bytes), and value rows
are the cache's own. `keys_to_entry` / `entry_to_keys` convert between the two exactly.
"""

from __future__ import annotations

import numpy as np

BLOCK = 16  # positions sharing a key's per-channel scales (the native op's TW_KV_BLOCK)


def row_bytes(head_dim: int) -> int:
    return head_dim + head_dim // 4


def entry_width(head_dim: int, key: bool) -> int:
    """Bytes per position of a cached entry's key (codes + scales) or value (the cache row) array."""
    return 5 * head_dim if key else row_bytes(head_dim)


def _block_tails(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """[..., n * BLOCK, row_bytes] key rows -> [..., n, 2 head_dim] fp16: each block's scales, then minimums."""
    tails = np.ascontiguousarray(rows[..., head_dim:])
    lead = rows.shape[:-2]
    return tails.reshape(*lead, -1, BLOCK * (head_dim // 4)).view(np.float16)


def keys_to_entry(rows: np.ndarray, length: int, head_dim: int) -> np.ndarray:
    """Key rows of whole blocks ([..., >= length rounded up to BLOCK, row_bytes] uint8) -> an
    entry's [..., length, 5 head_dim] uint8 (each position: its codes, then its block's tails)."""
    blocks = -(-length // BLOCK)
    scales = _block_tails(rows[..., : blocks * BLOCK, :], head_dim).view(np.uint8)  # [..., blocks, 4 d]
    per_position = np.repeat(scales, BLOCK, axis=-2)[..., :length, :]
    return np.concatenate([rows[..., :length, :head_dim], per_position], axis=-1)


def entry_to_keys(entry: np.ndarray, head_dim: int) -> np.ndarray:
    """An entry's key array ([..., length, 5 head_dim]) -> key rows of whole blocks (positions
    past `length` in the last block: zero codes, which the op overwrites before reading)."""
    length = entry.shape[-2]
    blocks = -(-length // BLOCK)
    lead = entry.shape[:-2]
    rows = np.zeros((*lead, blocks * BLOCK, row_bytes(head_dim)), dtype=np.uint8)
    rows[..., :length, :head_dim] = entry[..., :head_dim]
    scales = np.ascontiguousarray(entry[..., ::BLOCK, head_dim:])  # each block's first position
    rows[..., head_dim:] = scales.reshape(*lead, blocks * BLOCK, head_dim // 4)
    return rows


def dequantize_keys(rows: np.ndarray, length: int, head_dim: int) -> np.ndarray:
    """Key rows -> [..., length, head_dim] float64 (what attention computes with)."""
    blocks = -(-length // BLOCK)
    codes = rows[..., : blocks * BLOCK, :head_dim].astype(np.float64)
    tails = np.repeat(_block_tails(rows[..., : blocks * BLOCK, :], head_dim).astype(np.float64), BLOCK, axis=-2)
    return (tails[..., head_dim:] + codes * tails[..., :head_dim])[..., :length, :]


def dequantize_values(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """Value rows -> [..., positions, head_dim] float64."""
    codes = rows[..., :head_dim].astype(np.float64)
    pair = np.ascontiguousarray(rows[..., head_dim: head_dim + 4]).view(np.float16).astype(np.float64)
    return pair[..., 1:2] + codes * pair[..., 0:1]
