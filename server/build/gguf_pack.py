"""Repacks a GGUF tensor's blocks, exactly, for the native `BlockLinear` / `BlockGather` ops.

The ops (server/native/tw_blocks*.c, registered in tw_ops.c, domain `ai.tokenwire`) compute
y = x @ W with W[k, n] = the GGUF tensor's row n, element k, from the file's own codes, scales and
minimums: nothing is requantized, only moved. Output columns (GGUF rows) are grouped in tiles of 16
so that a tile's scales are one 512-bit vector, and a tile's codes for 32 consecutive k are laid
out in the int16 pair order vpdpwssd / vpmaddwd wants (native_pack.pack_codes4 / pack_codes8):

- `codes`, per (tile, 32 along K), tile-major (a tile's whole K is contiguous):
  Q8_0: 512 bytes (pack_codes8). Q4_0 / Q4_1 / Q4_K: 256 bytes of nibbles (pack_codes4).
  Q5_0 / Q5_1 / Q5_K: the nibbles + 64 bytes of fifth bits; Q6_K: the low nibbles + 128 bytes of
  bits 4-5 (_high_plane: each byte of high bits lines up with the nibble bytes it completes, so
  the kernel forms whole codes with byte-wide shifts, masks and ors, then widens them once).
  F32 / F16 / BF16: per tile, [K][16] values as stored.
- `meta`, per (tile, file block), at the file's precision:
  Q8_0 / Q4_0 / Q5_0: d[16] fp16. Q4_1 / Q5_1: d[16], m[16] fp16. Q4_K / Q5_K (blocks of 256):
  d[16], dmin[16] fp16, then the 6-bit scales sc[8][16] and minimums m[8][16] as bytes.
  Q6_K: d[16] fp16, then the int8 scales sc[16][16] (one per 16 along K). Float types: none.

The codes are stored as in the file, unsigned; the kernel takes the symmetric types' offsets (8,
16, 32) off its integer dot products (offset times the int16 activations' exact sum) and forms
d·sc, dmin·m in fp32 (exact: an fp16 times a byte fits fp32's mantissa). Packed sizes are the file's
(Q4_K / Q5_K: +4 bytes per 256 weights, the scales unpacked from 6 bits to bytes), plus the padding
of N to a multiple of 16. Tensors are packed a slice of columns at a time, so a large tensor needs
only a few MB of temporaries beyond its output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

from .native_pack import TILE

DOMAIN = "ai.tokenwire"
SPAN = 32  # weights along K per tile-block of codes (one activation block of the kernel)
_SLICE_WEIGHTS = 1 << 22  # weights packed at a time (bounds the temporaries to a few tens of MB)


@dataclass(frozen=True)
class _Format:
    block: int  # weights per file block along K (1 for float types)
    code_bytes: int  # per (tile, 32 along K); float types: per (tile, 1 along K)
    meta_bytes: int  # per (tile, file block)


# Must match tw_block_format in server/native/tw_blocks_gather.c.
_FORMATS: dict[int, _Format] = {
    T.F32: _Format(1, 64, 0),
    T.F16: _Format(1, 32, 0),
    T.BF16: _Format(1, 32, 0),
    T.Q8_0: _Format(32, 512, 32),
    T.Q4_0: _Format(32, 256, 32),
    T.Q4_1: _Format(32, 256, 64),
    T.Q5_0: _Format(32, 320, 32),
    T.Q5_1: _Format(32, 320, 64),
    T.Q4_K: _Format(256, 256, 320),
    T.Q5_K: _Format(256, 320, 320),
    T.Q6_K: _Format(256, 384, 288),
}
SUPPORTED: frozenset[int] = frozenset(int(t) for t in _FORMATS)
_FLOAT = frozenset({int(T.F32), int(T.F16), int(T.BF16)})


@dataclass
class PackedBlocks:
    qtype: int  # gguf.GGMLQuantizationType value
    k: int  # input features (GGUF ne[0], the contiguous dim)
    n: int  # output features (GGUF ne[1])
    codes: np.ndarray  # uint8 1-D
    meta: np.ndarray  # uint8 1-D (scales / minimums at the file's precision)


def type_name(qtype: int) -> str:
    try:
        return T(qtype).name
    except ValueError:
        return f"GGML type {qtype}"


def unsupported_message(qtype: int, tensor: str = "") -> str:
    """Why a tensor of this type cannot be packed, naming the type (and the tensor when given)."""
    where = f" (tensor {tensor})" if tensor else ""
    names = ", ".join(sorted(type_name(t) for t in SUPPORTED))
    return f"{type_name(qtype)} is not supported{where}; supported: {names}"


def _format(qtype: int, k: int, n: int) -> _Format:
    fmt = _FORMATS.get(int(qtype))
    if fmt is None:
        raise ValueError(unsupported_message(qtype))
    if k <= 0 or n <= 0:
        raise ValueError(f"{type_name(qtype)} tensor of K={k}, N={n}: both must be positive")
    if k % max(fmt.block, 1):
        raise ValueError(f"{type_name(qtype)} needs K a multiple of {fmt.block} (its block); K={k}")
    return fmt


def sizes(qtype: int, k: int, n: int) -> tuple[int, int]:
    """(codes bytes, meta bytes) of a packed tensor."""
    fmt = _format(qtype, k, n)
    tiles = -(-n // TILE)
    span = 1 if int(qtype) in _FLOAT else SPAN
    return tiles * (k // span) * fmt.code_bytes, tiles * (k // fmt.block) * fmt.meta_bytes


def file_nbytes(qtype: int, k: int, n: int) -> int:
    """The tensor's bytes in the GGUF file."""
    block, type_size = GGML_QUANT_SIZES[T(qtype)]
    return n * (k // block) * type_size


def packed_nbytes(p: PackedBlocks) -> int:
    return int(p.codes.nbytes + p.meta.nbytes)


# ---- packing -------------------------------------------------------------------------------


def _tiled(per_col: np.ndarray, tiles: int) -> np.ndarray:
    """[cols, *rest] -> [tiles, *rest, 16], columns zero-padded to whole tiles (one strided copy)."""
    cols, rest = per_col.shape[0], per_col.shape[1:]
    out = np.zeros((tiles, *rest, TILE), dtype=per_col.dtype)
    full, part = divmod(cols, TILE)
    if full:
        out[:full] = np.moveaxis(per_col[:full * TILE].reshape(full, TILE, *rest), 1, -1)
    if part:
        out[full, ..., :part] = np.moveaxis(per_col[full * TILE:], 0, -1)
    return out


def _byte_pairs(pairs: np.ndarray, tiles: int) -> np.ndarray:
    """[cols, nb, m] uint16 (column c's byte pairs; uint8 [cols, nb, 2m] is viewed so) -> uint8
    [tiles, nb, 32m] whose group i of 32 bytes holds every column's pair i at bytes 2c, 2c + 1."""
    pairs = np.ascontiguousarray(pairs).view(np.uint16)
    return _tiled(pairs, tiles).view(np.uint8).reshape(tiles, pairs.shape[1], 32 * pairs.shape[2])


def _nibbles(runs: np.ndarray) -> np.ndarray:
    """runs: uint8 [..., 32 r] of nibble bytes whose every 32 bytes C hold two runs of 32 codes, C's
    low nibbles and C's high nibbles (Q4_0's 16 bytes: one run, low then high, when r = 1/2) ->
    uint16 [..., 2r (runs), 8]: pair j of a run = bytes e = 0, 1 holding codes k = 4j + e (low
    nibble) and 4j + 2 + e (high), native_pack.pack_codes4's order (widened to int16 they pair with
    consecutive activation pairs in vpdpwssd). Computed on uint16 pairs of bytes, two at once."""
    w = np.ascontiguousarray(runs).view(np.uint32)  # bytes 4j..4j+3: (4j + e, 4j + 2 + e) as two uint16
    j = min(8, runs.shape[-1] // 4)  # pairs per run in one chunk
    out = np.empty((*runs.shape[:-1], runs.shape[-1] // (4 * j), 2, j), dtype=np.uint16)
    out[..., 0, :] = ((w & np.uint32(0x0F0F)) | ((w >> np.uint32(12)) & np.uint32(0xF0F0))).reshape(out[..., 0, :].shape)
    out[..., 1, :] = (((w >> np.uint32(4)) & np.uint32(0x0F0F)) | ((w >> np.uint32(16)) & np.uint32(0xF0F0))).reshape(
        out[..., 1, :].shape)
    return out.reshape(*runs.shape[:-1], -1, 8)


def _high_plane(high: np.ndarray, width: int, tiles: int) -> np.ndarray:
    """high: uint8 [cols, nb, 32] of the bits above the nibble (width 1 for Q5, 2 for Q6_K) ->
    [tiles, nb, 64 * width]. Byte 2c + e of nibble group j holds two codes, a slot each: u = 2j (low
    nibble, k = 4j + e) and 2j + 1 (high, k = 4j + 2 + e), so k = 2u + e. Their high bits sit at
    byte 2c + e of high group u // (8 / width), bit (u % (8 / width)) * width: shifted into place
    and or-ed onto the nibbles with byte-wide shifts and masks before the codes are widened."""
    cols, nb, _ = high.shape
    per = 8 // width
    h = np.ascontiguousarray(high).view(np.uint16).reshape(-1, per)  # [(c, b, group), slot]: e in the bytes
    acc = h[:, 0].copy()
    for slot in range(1, per):
        acc |= h[:, slot] << np.uint16(slot * width)
    return _byte_pairs(acc.reshape(cols, nb, -1), tiles)


def _fp16(raw: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte `at` of each block: [cols, blocks] float16."""
    return np.ascontiguousarray(raw[..., at:at + 2]).view(np.float16)[..., 0]


def scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 12 bytes -> 8 six-bit scales and 8 minimums (llama.cpp's get_scale_min_k4)."""
    q = scales.astype(np.uint8)
    lo, mid, top = q[..., 0:4], q[..., 4:8], q[..., 8:12]
    sc = np.concatenate([lo & 63, (top & 0x0F) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([mid & 63, (top >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc, mn


def _shifted(a: np.ndarray, shifts: list[int], mask: int, axis: int) -> np.ndarray:
    """(a >> s) & mask for each s (bytes, the last axis a multiple of 8), stacked along a new axis;
    computed eight bytes at a time."""
    v = np.ascontiguousarray(a).view(np.uint64)
    m = np.uint64(int.from_bytes(bytes([mask]) * 8, "little"))
    return np.stack([((v >> np.uint64(s)) & m).view(np.uint8) for s in shifts], axis=axis)


def _pack_slice(qtype: int, blocks: np.ndarray, k: int, tiles: int) -> tuple[np.ndarray, np.ndarray]:
    """blocks: uint8 [cols, K/block, type_size] of whole tiles' columns (the last slice may be
    short) -> (codes [tiles, ...], meta [tiles, ...]) as uint8."""
    cols = blocks.shape[0]
    kb = k // SPAN
    empty = np.zeros((tiles, 0), dtype=np.uint8)
    if qtype in _FLOAT:
        dtype = {T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16}[T(qtype)]
        w = np.ascontiguousarray(blocks).view(dtype).reshape(cols, k)
        return _tiled(w, tiles).view(np.uint8).reshape(tiles, -1), empty

    def fp16_meta(*fields: np.ndarray) -> np.ndarray:  # [cols, nb] fp16 each -> [tiles, nb * bytes]
        per = np.stack(fields, axis=-1)  # [cols, nb, fields]
        return _tiled(per, tiles).view(np.uint8).reshape(tiles, -1)

    if qtype == T.Q8_0:
        return _byte_pairs(blocks[..., 2:], tiles).reshape(tiles, -1), fp16_meta(_fp16(blocks, 0))
    if qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
        with_min = qtype in (T.Q4_1, T.Q5_1)
        five = qtype in (T.Q5_0, T.Q5_1)
        at = 4 if with_min else 2
        codes = _byte_pairs(_nibbles(blocks[..., at + 4 * five:]).reshape(cols, kb, 8), tiles)
        if five:  # qh: 4 bytes, little-endian, bit i = element i
            high = np.unpackbits(blocks[..., at:at + 4], axis=-1, bitorder="little")
            codes = np.concatenate([codes, _high_plane(high, 1, tiles)], -1)
        meta = fp16_meta(_fp16(blocks, 0), _fp16(blocks, 2)) if with_min else fp16_meta(_fp16(blocks, 0))
        return codes.reshape(tiles, -1), meta
    nsb = k // 256
    if qtype in (T.Q4_K, T.Q5_K):
        sc, mn = scale_min_k4(blocks[..., 4:16])  # [cols, nsb, 8]
        # sub-block 2m: the low nibbles of qs's chunk m of 32 bytes, 2m + 1: its high nibbles
        codes = _byte_pairs(_nibbles(blocks[..., -128:]).reshape(cols, kb, 8), tiles)
        if qtype == T.Q5_K:  # sub-block s's fifth bits: bit s of qh[l]
            high = _shifted(blocks[..., 16:48], list(range(8)), 1, 2).reshape(cols, kb, 32)
            codes = np.concatenate([codes, _high_plane(high, 1, tiles)], -1)
        dd = _tiled(np.stack([_fp16(blocks, 0), _fp16(blocks, 2)], axis=2), tiles)  # [t, nsb, 2, 16]
        scm = _tiled(np.stack([sc, mn], axis=2), tiles)  # [t, nsb, 2, 8, 16]
        meta = np.concatenate([dd.view(np.uint8).reshape(tiles, nsb, 64), scm.reshape(tiles, nsb, 256)], -1)
        return codes.reshape(tiles, -1), meta.reshape(tiles, -1)
    if qtype == T.Q6_K:  # element h*128 + s*32 + l: ql[h*64 + (s%2)*32 + l] >> 4*(s//2), qh[h*32 + l] >> 2s
        low = _nibbles(blocks[..., 0:128].reshape(cols, nsb, 2, 2, 32))  # [h, s % 2, s // 2 (low, high), 8]
        low = np.ascontiguousarray(low.transpose(0, 1, 2, 4, 3, 5))  # [h, s // 2, s % 2, 8]: s in order
        high = _shifted(blocks[..., 128:192].reshape(cols, nsb, 2, 32), [0, 2, 4, 6], 3, 3)  # [h, s, l]
        codes = np.concatenate([_byte_pairs(low.reshape(cols, kb, 8), tiles),
                                _high_plane(high.reshape(cols, kb, 32), 2, tiles)], -1)
        d = _tiled(_fp16(blocks, 208), tiles)  # [t, nsb, 16]
        sc = _tiled(np.ascontiguousarray(blocks[..., 192:208]), tiles)  # [t, nsb, 16 sub-blocks, 16]
        meta = np.concatenate([d.view(np.uint8).reshape(tiles, nsb, 32), sc.reshape(tiles, nsb, 256)], -1)
        return codes.reshape(tiles, -1), meta.reshape(tiles, -1)
    raise ValueError(unsupported_message(qtype))  # pragma: no cover (every _FORMATS type is handled)


def pack(qtype: int, raw: np.ndarray, k: int, n: int) -> PackedBlocks:
    """Packs a GGUF tensor exactly. raw: its data as gguf.GGUFReader gives it (uint8 [n, row_bytes],
    or float32 / float16 [n, k] for F32 / F16; any array of those bytes works)."""
    qtype = int(qtype)
    _format(qtype, k, n)
    block, type_size = GGML_QUANT_SIZES[T(qtype)]
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    row_bytes = k // block * type_size
    if data.size != n * row_bytes:
        raise ValueError(f"{type_name(qtype)} tensor of K={k}, N={n} needs {n * row_bytes} bytes, got {data.size}")
    rows = data.reshape(n, k // block, type_size)
    code_size, meta_size = sizes(qtype, k, n)
    codes = np.empty(code_size, dtype=np.uint8)
    meta = np.empty(meta_size, dtype=np.uint8)
    tiles = -(-n // TILE)
    code_tile, meta_tile = code_size // tiles, meta_size // tiles
    per_slice = max(1, _SLICE_WEIGHTS // (k * TILE))  # tiles
    for t0 in range(0, tiles, per_slice):
        t1 = min(t0 + per_slice, tiles)
        c, m = _pack_slice(qtype, rows[t0 * TILE:t1 * TILE], k, t1 - t0)
        codes[t0 * code_tile:t1 * code_tile] = c.reshape(-1)
        meta[t0 * meta_tile:t1 * meta_tile] = m.reshape(-1)
    return PackedBlocks(qtype, k, n, codes, meta)


# ---- the exact weights back (for tests) -------------------------------------------------------


def _unnibble(codes: np.ndarray, tiles: int, k: int) -> np.ndarray:
    """[tiles, K/32, 256] pack_codes4 bytes -> uint8 [tiles*16, K]."""
    g = codes.reshape(tiles, k // SPAN, 8, TILE, 2)  # [t, b, j, c, p]
    q = np.concatenate([g & 0x0F, g >> 4], axis=-1)  # [..., (low p=0,1 | high p=0,1)] -> k = 4j + idx
    return q.transpose(0, 3, 1, 2, 4).reshape(tiles * TILE, k)


def _unhigh(plane: np.ndarray, width: int, tiles: int, k: int) -> np.ndarray:
    """_high_plane's inverse: [tiles, K/32, 64 * width] -> uint8 [tiles*16, K]."""
    per = 8 // width
    g = plane.reshape(tiles, k // SPAN, 16 // per, 1, 32)
    shifts = (np.arange(per, dtype=np.uint8) * width).reshape(1, 1, 1, per, 1)
    vals = (g >> shifts) & ((1 << width) - 1)  # [t, b, group, slot, 32]
    vals = vals.reshape(tiles, k // SPAN, 8, 2, TILE, 2)  # [t, b, j, h, c, p]
    return vals.transpose(0, 4, 1, 2, 3, 5).reshape(tiles * TILE, k)


def _untile(a: np.ndarray) -> np.ndarray:
    """[tiles, *rest, 16] -> [tiles*16, *rest]."""
    return np.moveaxis(a, -1, 1).reshape(a.shape[0] * TILE, *a.shape[1:-1])


def dequantize_packed(p: PackedBlocks) -> np.ndarray:
    """The float64 [K, N] weight a packed tensor holds, computed in float32 with the operations of
    gguf.quants.dequantize in its order (so the two agree bit for bit)."""
    qt, k, n = p.qtype, p.k, p.n
    fmt = _format(qt, k, n)
    tiles = -(-n // TILE)
    f32 = np.float32
    if qt in _FLOAT:
        dtype = {T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16}[T(qt)]
        w = _untile(p.codes.view(dtype).reshape(tiles, k, TILE))
        w = (w.astype(np.uint32) << 16).view(f32) if qt == T.BF16 else w.astype(f32)
        return w[:n].T.astype(np.float64)
    nb = k // fmt.block
    codes = p.codes.reshape(tiles, k // SPAN, fmt.code_bytes)
    meta = p.meta.reshape(tiles, nb, fmt.meta_bytes)

    def half(at: int, count: int = TILE) -> np.ndarray:  # fp16 fields of meta -> [tiles*16, nb] float32
        return _untile(np.ascontiguousarray(meta[..., at:at + 2 * count]).view(np.float16)).astype(f32)

    if qt == T.Q8_0:
        q = codes.view(np.int8).reshape(tiles, k // SPAN, 16, TILE, 2).transpose(0, 3, 1, 2, 4)
        w = q.reshape(tiles * TILE, nb, 32).astype(f32) * half(0)[..., None]
        return w.reshape(-1, k)[:n].T.astype(np.float64)
    q = _unnibble(codes[..., :256], tiles, k)
    if qt in (T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K):
        q = q | (_unhigh(codes[..., 256:], 2 if qt == T.Q6_K else 1, tiles, k) << 4)
    if qt in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
        qb = q.reshape(-1, nb, 32)
        d = half(0)[..., None]
        if qt in (T.Q4_1, T.Q5_1):
            w = d * qb.astype(f32) + half(32)[..., None]
        else:
            w = d * (qb.astype(np.int8) - np.int8(8 if qt == T.Q4_0 else 16)).astype(f32)
        return w.reshape(-1, k)[:n].T.astype(np.float64)
    if qt in (T.Q4_K, T.Q5_K):
        scm = _untile(meta[..., 64:].reshape(tiles, nb, 2, 8, TILE))  # [cols, nsb, 2, 8]
        d = (half(0)[..., None] * scm[:, :, 0].astype(f32))[..., None]
        dm = (half(32)[..., None] * scm[:, :, 1].astype(f32))[..., None]
        w = d * q.reshape(-1, nb, 8, 32).astype(f32) - dm
        return w.reshape(-1, k)[:n].T.astype(np.float64)
    if qt == T.Q6_K:
        sc = _untile(meta[..., 32:].reshape(tiles, nb, 16, TILE)).view(np.int8)  # [cols, nsb, 16]
        d = (half(0)[..., None] * sc.astype(f32))[..., None]
        w = d * (q.reshape(-1, nb, 16, 16).astype(np.int8) - np.int8(32)).astype(f32)
        return w.reshape(-1, k)[:n].T.astype(np.float64)
    raise ValueError(unsupported_message(qt))  # pragma: no cover
