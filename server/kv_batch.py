"""The KV cache of every running sequence of one model, as one left-padded batch.

Layout (optimum graphs): per layer, key/value [batch, kv_heads, P, head_dim], where P is the
longest sequence; row b holds its L_b cached positions at the right end, [P - L_b, P), and
zeros on the left. The attention mask [batch, P + 1] has ones on each row's own positions
plus the new token, so padding takes no part in attention, and the graph derives each
row's position ids from the mask. Rows are copied only when sequences join or leave.
"""

from __future__ import annotations

import numpy as np

from .decoder import KVCache, OnnxDecoder


class KVBatch:
    def __init__(self, decoder: OnnxDecoder) -> None:
        self.decoder = decoder
        self.cache: KVCache = decoder.empty_cache(batch=0)
        self.lengths: list[int] = []

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return self.decoder.cache_length(self.cache)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.cache)

    def _pad_left(self, tensor: np.ndarray, axis: int, amount: int) -> np.ndarray:
        if amount == 0:
            return tensor
        widths = [(0, 0)] * tensor.ndim
        widths[axis] = (amount, 0)
        return np.pad(tensor, widths)

    def add(self, cache: KVCache, length: int) -> int:
        """Appends one sequence's cache (batch 1, `length` positions); returns its row."""
        width = self.width
        new_width = max(width, length)
        merged = []
        for spec, batch_t, row_t in zip(self.decoder.kv, self.cache, cache, strict=True):
            a = self._pad_left(batch_t, spec.seq_axis, new_width - width)
            b = self._pad_left(row_t, spec.seq_axis, new_width - length)
            merged.append(np.concatenate([a, b], axis=spec.batch_axis))
        self.cache = merged
        self.lengths.append(length)
        return len(self.lengths) - 1

    def remove(self, rows: list[int]) -> None:
        if not rows:
            return
        keep = [i for i in range(len(self.lengths)) if i not in set(rows)]
        self.lengths = [self.lengths[i] for i in keep]
        new_width = max(self.lengths, default=0)
        trim = self.width - new_width
        cache = []
        for spec, t in zip(self.decoder.kv, self.cache, strict=True):
            t = np.take(t, keep, axis=spec.batch_axis)
            if trim:
                t = np.take(t, np.arange(trim, t.shape[spec.seq_axis]), axis=spec.seq_axis)
            cache.append(t)
        self.cache = cache

    def row_cache(self, row: int) -> KVCache:
        """A copy of one row's cache without its padding (batch 1)."""
        length, width = self.lengths[row], self.width
        out = []
        for spec, t in zip(self.decoder.kv, self.cache, strict=True):
            t = np.take(t, [row], axis=spec.batch_axis)
            out.append(np.ascontiguousarray(np.take(t, np.arange(width - length, width), axis=spec.seq_axis)))
        return out

    def step(self, tokens: list[int]) -> np.ndarray:
        """Feeds one token per row; returns next-token logits [batch, vocab]."""
        batch, width = len(self.lengths), self.width
        mask = np.zeros((batch, width + 1), dtype=np.int64)
        for b, length in enumerate(self.lengths):
            mask[b, width - length :] = 1
        ids = np.asarray(tokens, dtype=np.int64).reshape(batch, 1)
        logits, self.cache = self.decoder.forward(ids, self.cache, attention_mask=mask)
        self.lengths = [n + 1 for n in self.lengths]
        return logits[:, -1, :]
