"""Packs block-quantized weights for tokenwire's native `Linear` op (server/native/tw_ops.c).

Every route of `quantize.QuantizedWeight` is one of two exact forms the kernel computes:
4-bit `w = d·q + m` (Q4_1; an asymmetric block is m = -d·zp) and 8-bit `w = d·q (+ m)` with
signed codes (Q8_0; an asymmetric block is codes - 128 with m = d·(128 - zp)). Output columns
are grouped in tiles of 16 so one 512-bit register holds a tile's scales, minimums or sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .quantize import BLOCK, QuantizedWeight

TILE = 16
DOMAIN = "ai.tokenwire"


@dataclass
class PackedWeight:
    bits: int
    k: int
    n: int
    codes: np.ndarray  # uint8, 1-D
    scales: np.ndarray  # float32 [tiles, K/32, 16]
    mins: np.ndarray  # float32 [tiles, K/32, 16], or [0] when there are none


def _unpack4(packed: np.ndarray, last: int) -> np.ndarray:
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out[..., :last]


def _tiled(per_col: np.ndarray, tiles: int) -> np.ndarray:
    """[N, K/32] -> [tiles, K/32, 16], zero-padded columns."""
    n, kb = per_col.shape
    padded = np.zeros((tiles * TILE, kb), dtype=np.float32)
    padded[:n] = per_col
    return np.ascontiguousarray(padded.reshape(tiles, TILE, kb).transpose(0, 2, 1))


def pack_codes4(q: np.ndarray) -> np.ndarray:
    """q: uint8 [N, K] codes < 16. Byte 2c+p of 32-byte group (tile, block, j) holds column c's
    codes k = 4j+p (low nibble) and 4j+2+p (high nibble): widened to int16 they pair with
    consecutive activation pairs in vpdpwssd."""
    n, k = q.shape
    tiles, kb = -(-n // TILE), k // BLOCK
    padded = np.zeros((tiles * TILE, k), dtype=np.uint8)
    padded[:n] = q
    q5 = padded.reshape(tiles, TILE, kb, 8, 4)
    byts = (q5[..., 0:2] | (q5[..., 2:4] << 4)).transpose(0, 2, 3, 1, 4)
    return np.ascontiguousarray(byts).reshape(-1)


def pack_codes8(q: np.ndarray) -> np.ndarray:
    """q: int8 [N, K]. 32-byte group (tile, block, pair p) holds columns' codes k = 2p, 2p+1."""
    n, k = q.shape
    tiles, kb = -(-n // TILE), k // BLOCK
    padded = np.zeros((tiles * TILE, k), dtype=np.int8)
    padded[:n] = q
    grouped = padded.reshape(tiles, TILE, kb, 16, 2).transpose(0, 2, 3, 1, 4)
    return np.ascontiguousarray(grouped).view(np.uint8).reshape(-1)


def pack(qw: QuantizedWeight, k: int, n: int) -> PackedWeight:
    """Converts a MatMulNBits-layout weight (see quantize.py) into the native layout, exactly."""
    if k % BLOCK:
        raise ValueError(f"K={k} is not a multiple of {BLOCK}")
    kb = k // BLOCK
    tiles = -(-n // TILE)
    d = qw.scales.reshape(n, kb).astype(np.float32)
    if qw.bits == 4:
        q = _unpack4(qw.codes.reshape(n, kb, BLOCK // 2), BLOCK).reshape(n, k)
        zp = _unpack4(qw.zero_points.reshape(n, -1), kb).astype(np.float32)  # [N, kb]
        mins = -d * zp
        if qw.mins is not None:
            mins = mins + qw.mins.T
        return PackedWeight(4, k, n, pack_codes4(q), _tiled(d, tiles), _tiled(mins.astype(np.float32), tiles))
    if qw.bits == 8:
        codes = qw.codes.reshape(n, k).astype(np.int16) - 128
        zp = qw.zero_points.reshape(n, kb).astype(np.float32)
        mins = d * (128.0 - zp)
        packed_mins = _tiled(mins, tiles) if np.any(mins) else np.zeros((0,), dtype=np.float32)
        return PackedWeight(8, k, n, pack_codes8(codes.astype(np.int8)), _tiled(d, tiles), packed_mins)
    raise ValueError(f"no native layout for {qw.bits}-bit weights")


def dequantize(p: PackedWeight) -> np.ndarray:
    """The exact fp64 [K, N] weight a packed one holds (for tests)."""
    tiles, kb = -(-p.n // TILE), p.k // BLOCK
    if p.bits == 4:
        g = p.codes.reshape(tiles, kb, 8, TILE, 2)
        lo, hi = g & 0x0F, g >> 4
        q = np.concatenate([lo, hi], axis=-1)  # [..., j, c, (p=0,1 low | p=0,1 high)] -> k = 4j + idx
        q = q.transpose(0, 3, 1, 2, 4).reshape(tiles * TILE, p.k)
    else:
        g = p.codes.view(np.int8).reshape(tiles, kb, 16, TILE, 2)
        q = g.transpose(0, 3, 1, 2, 4).reshape(tiles * TILE, p.k)
    d = p.scales.transpose(0, 2, 1).reshape(tiles * TILE, kb)
    w = q.reshape(-1, kb, BLOCK).astype(np.float64) * d[..., None]
    if p.mins.size:
        w += p.mins.transpose(0, 2, 1).reshape(tiles * TILE, kb)[..., None]
    return w.reshape(tiles * TILE, p.k)[: p.n].T


class NativeEmitter:
    """Emits `y = x @ W` as one `ai.tokenwire.Linear` node per weight: same interface as
    quantize.NBitsEmitter, no correction ops (the kernel adds Q4_1's minimum itself)."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: list = []
        self.routes: dict[str, int] = {}

    def linear(self, x: str, w: np.ndarray, out: str, base: str, bits: int, level: int, lm_head: bool = False) -> str:
        from onnx import helper, numpy_helper

        from .quantize import quantize_weight

        k, n = w.shape
        qw = quantize_weight(w, bits, lm_head=lm_head)
        self.routes[qw.route] = self.routes.get(qw.route, 0) + 1
        p = pack(qw, k, n)
        self.inits += [numpy_helper.from_array(p.codes, base + "_codes"),
                       numpy_helper.from_array(p.scales, base + "_scales"),
                       numpy_helper.from_array(p.mins, base + "_mins")]
        self.nodes.append(helper.make_node(
            "Linear", [x, base + "_codes", base + "_scales", base + "_mins"], [out], name=base + "_linear",
            domain=DOMAIN, bits=p.bits, K=k, N=n))
        return out
