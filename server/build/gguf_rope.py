"""Rotary embeddings of a GGUF model as the native Attention op takes them.

The op rotates every head in halves, pairing dim i with dim i + head_dim/2 by cos/sin tables
[positions, head_dim/2] given as inputs. GGUF models rotate pairs in one of two ways:
llama.cpp's "norm" mode (adjacent dims 2i, 2i+1: llama, whose Q/K rows convert_hf_to_gguf.py
permuted for it) and NEOX (i, i + n_rot/2: qwen2, qwen3, phi3, gemma), on the first n_rot dims
of a head only (the rest pass through). `head_order` gives the order of a head's Q/K rows that
turns either into the op's pairing (rows move whole, so the weights stay exact; q·k is the
same under any order both share, and V is not reordered); the tables then hold cos 1 and
sin 0 for the pass-through dims.

The angles follow ggml's rope (ggml-cpu ops.cpp rope_yarn, ggml_rope_yarn_corr_dims):
theta_i(p) = p * base^(-2i/n_rot) / factor_i, scaled by 1/factor (linear), blended with
YaRN's ramp (yarn), and cos/sin multiplied by the magnitude scale (attn_factor; YaRN's
1 + 0.1 ln(factor)).
"""

from __future__ import annotations

import math

import numpy as np

from .gguf_model import GGUFUnsupported, Rope


def head_order(rope: Rope, head_dim: int) -> np.ndarray | None:
    """order[p] = the stored row that goes to position p of a head; None when it is the identity."""
    half_rot = rope.dims // 2
    passing = head_dim - rope.dims
    if passing % 2:
        raise GGUFUnsupported(f"{passing} unrotated dims of a head: the halves would not match")
    if rope.interleaved:
        first, second = np.arange(0, rope.dims, 2), np.arange(1, rope.dims, 2)
    else:
        first, second = np.arange(half_rot), np.arange(half_rot, rope.dims)
    rest = np.arange(rope.dims, head_dim)
    order = np.concatenate([first, rest[: passing // 2], second, rest[passing // 2:]])
    return None if np.array_equal(order, np.arange(head_dim)) else order


def rows_order(rope: Rope, head_dim: int, heads: int) -> np.ndarray | None:
    """head_order applied to each of `heads` heads of a Q or K weight's rows (or a bias)."""
    order = head_order(rope, head_dim)
    if order is None:
        return None
    return (np.arange(heads)[:, None] * head_dim + order[None, :]).reshape(-1)


def _yarn_ramp(rope: Rope) -> np.ndarray:
    """ggml's rope_yarn_ramp over i = 0 .. n_rot/2 - 1 (1 = extrapolate, 0 = interpolate)."""
    def corr_dim(rotations: float) -> float:
        return rope.dims * math.log(rope.original_context / (rotations * 2 * math.pi)) / (2 * math.log(rope.base))

    low = max(0.0, math.floor(corr_dim(rope.beta_fast)))
    high = min(rope.dims - 1.0, math.ceil(corr_dim(rope.beta_slow)))
    y = (np.arange(rope.dims // 2, dtype=np.float64) - low) / max(0.001, high - low)
    return 1.0 - np.clip(y, 0.0, 1.0)


def frequencies(rope: Rope, factors: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """(angle per position of each rotated pair [n_rot/2] float64, cos/sin magnitude scale)."""
    i = np.arange(rope.dims // 2, dtype=np.float64)
    freq = rope.base ** (-2.0 * i / rope.dims)
    if factors is not None:
        freq = freq / np.asarray(factors, dtype=np.float64).reshape(-1)
    mscale = rope.attn_factor
    if rope.scaling == "linear":
        freq = freq / rope.factor
    elif rope.scaling == "yarn":
        scale = 1.0 / rope.factor
        mix = _yarn_ramp(rope)  # ext_factor 1: llama.cpp's default for YaRN files
        freq = freq * (scale * (1.0 - mix) + mix)
        mscale *= 1.0 + 0.1 * math.log(rope.factor)
    return freq, mscale


def rope_tables(rope: Rope, head_dim: int, positions: int,
                factors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [positions, head_dim/2] float32 for the op, in head_order's layout."""
    freq, mscale = frequencies(rope, factors)
    angles = np.outer(np.arange(positions, dtype=np.float64), freq)
    half = head_dim // 2
    cos = np.ones((positions, half), dtype=np.float64)
    sin = np.zeros((positions, half), dtype=np.float64)
    cos[:, : freq.size] = np.cos(angles) * mscale
    sin[:, : freq.size] = np.sin(angles) * mscale
    return cos.astype(np.float32), sin.astype(np.float32)
