"""A float reference forward of a GGUF model, in numpy, straight from the file.

What the served native graph is checked against (`tokenwire check`): every tensor is dequantized with
`gguf.quants.dequantize` when its layer is reached and dropped after it, so only one layer's weights
are in memory at a time besides the activations [T, hidden]; attention runs over the whole sequence
(causal, per KV head, queries in chunks so the scores stay small). float32 by default, float64 on
request. No torch.

The architectures follow llama.cpp's own reading of the file (src/llama-model.cpp), not the file name:

- llama: interleaved ("norm") rope on Q/K as stored (convert_hf_to_gguf.py permuted the rows for it);
  optional `rope_freqs.weight` frequency factors (Llama 3.x).
- rope scaling as ggml's rope_yarn: linear, YaRN (ext_factor 1, magnitude 1 + 0.1 ln(factor)), phi3's
  longrope (`rope_factors_long` when the file's context exceeds the original one, else `_short`, as
  llama.cpp picks them for a context that long), cos/sin times the file's `rope.scaling.attn_factor`.
- qwen2 (q/k/v biases), qwen3 (per-head q/k RMS norms), phi3 (fused attn_qkv; ffn_up holds gate then
  up; llama.cpp ignores phi3's sliding window, and so do we): half-split ("NEOX") rope.
- gemma2, gemma3: embeddings scaled by sqrt(hidden), GELU (tanh) gating, norms stored as 1 + w (used
  as stored), post-attention and post-FFN norms, attention scale 1/sqrt(head_dim) (1/sqrt(hidden /
  heads) for the 27B shapes), sliding window on layers i % 2 < 1 (gemma2) or i % 6 < 5 (gemma3, whose
  local layers use rope base 10000 unscaled), gemma2's attention and final logit softcapping.

    reference_logits(path, tokens) -> np.ndarray [T, V]
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")
NEOX_ROPE = frozenset({"qwen2", "qwen3", "phi3", "gemma2", "gemma3"})
GEMMA = frozenset({"gemma2", "gemma3"})
QUERY_CHUNK = 512
SCORES = 8 << 20  # attention scores held at once, at most (floats)
OUTPUT_KEEP_BYTES = 2 << 30  # the dequantized output matrix is kept while computing logits up to this size


@dataclass(frozen=True)
class Hparams:
    """What the forward needs from the file's metadata."""
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    head_dim_v: int
    n_rot: int
    n_vocab: int
    rms_eps: float
    rope_base: float
    rope_freq_scale: float     # positions are multiplied by this (1 / linear scaling factor)
    rope_base_swa: float
    rope_freq_scale_swa: float
    rope_factors: str          # the frequency divisors' tensor ("" for none)
    rope_mscale: float         # cos/sin multiplied by it (the file's rope.scaling.attn_factor)
    yarn: tuple[float, float] | None  # YaRN's ramp (low, high) over the rotated pairs; None when not YaRN
    sliding_window: int        # 0: none
    swa_layers: tuple[bool, ...]
    attn_softcap: float        # 0: none
    final_softcap: float
    attn_scale: float
    tied: bool


class GGUFFile:
    """The file's metadata and tensors (memory-mapped by gguf.GGUFReader)."""

    def __init__(self, path: Path | str):
        import gguf

        self.path = Path(path)
        self.reader = gguf.GGUFReader(str(path))
        self.tensors = {t.name: t for t in self.reader.tensors}

    def value(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        """numpy order: [rows, k] for a matrix (the GGUF's ne reversed)."""
        return tuple(int(n) for n in reversed(self.tensors[name].shape))

    def tensor(self, name: str, dtype: np.dtype = np.float32) -> np.ndarray:
        """The whole tensor, dequantized, numpy order."""
        return self.rows(name, None, dtype)

    def rows(self, name: str, index: np.ndarray | slice | None, dtype: np.dtype = np.float32) -> np.ndarray:
        """Some rows of a matrix, dequantized (a row's blocks are contiguous, so only those are read)."""
        import gguf

        t = self.tensors[name]
        shape = self.shape(name)
        data = t.data if index is None else t.data[index]
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            out = np.asarray(data, dtype=np.float32)
        elif t.tensor_type == gguf.GGMLQuantizationType.F16:
            out = np.asarray(data).view(np.float16).astype(np.float32)
        else:
            out = gguf.quants.dequantize(np.asarray(data).view(np.uint8), t.tensor_type)
        out = out.astype(dtype, copy=False)
        return out.reshape(shape) if index is None else out.reshape(-1, *shape[1:])


class ReferenceUnsupported(ValueError):
    """A file of an architecture or rope variant the reference forward does not compute."""


def read_hparams(f: GGUFFile) -> Hparams:
    arch = f.value("general.architecture")
    if arch not in ARCHITECTURES:
        raise ReferenceUnsupported(f"the reference forward does not know architecture {arch!r}; it knows {ARCHITECTURES}")

    def key(name: str, default: Any = None) -> Any:
        value = f.value(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"{f.path}: metadata {arch}.{name} is missing")
        return value

    n_embd, n_head = int(key("embedding_length")), int(key("attention.head_count"))
    n_head_kv = int(key("attention.head_count_kv", n_head))
    head_dim = int(key("attention.key_length", n_embd // n_head))
    head_dim_v = int(key("attention.value_length", head_dim))
    n_layer = int(key("block_count"))
    scaling = f.value(f"{arch}.rope.scaling.type", "none")
    factor = float(f.value(f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    if scaling not in ("none", "linear", "yarn", "longrope") and factor != 1.0:
        raise ReferenceUnsupported(f"rope scaling {scaling!r} is not supported by the reference forward")
    freq_scale = 1.0 / factor if scaling in ("linear", "yarn") else 1.0
    rope_base = float(key("rope.freq_base", 10000.0))
    n_rot = int(key("rope.dimension_count", head_dim))
    context = int(f.value(f"{arch}.context_length", 0) or 0)
    original = int(f.value(f"{arch}.rope.scaling.original_context_length", 0) or context)
    yarn = None
    if scaling == "yarn" and factor != 1.0:  # ggml_rope_yarn_corr_dims
        def corr_dim(rotations: float) -> float:
            return n_rot * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope_base))
        yarn = (max(0.0, math.floor(corr_dim(float(f.value(f"{arch}.rope.scaling.yarn_beta_fast", 32.0) or 32.0)))),
                min(n_rot - 1.0, math.ceil(corr_dim(float(f.value(f"{arch}.rope.scaling.yarn_beta_slow", 1.0) or 1.0)))))
    factors = ""
    if f.has("rope_freqs.weight"):
        factors = "rope_freqs.weight"
    elif f.has("rope_factors_long.weight") or f.has("rope_factors_short.weight"):  # llama.cpp's get_rope_factors
        factors = "rope_factors_long.weight" if context > original or not f.has("rope_factors_short.weight") \
            else "rope_factors_short.weight"

    window = int(f.value(f"{arch}.attention.sliding_window", 0) or 0)
    pattern = {"gemma2": 2, "gemma3": 6}.get(arch, 0)
    swa = tuple(bool(window) and pattern > 0 and i % pattern < pattern - 1 for i in range(n_layer))
    stored_pattern = f.value(f"{arch}.attention.sliding_window_pattern")
    if isinstance(stored_pattern, list) and window:
        swa = tuple(bool(x) for x in stored_pattern)
    if arch not in GEMMA:
        window, swa = 0, (False,) * n_layer  # llama.cpp: phi3's sliding window is disabled

    attn_scale = 1.0 / math.sqrt(head_dim)
    if (arch, n_layer) in (("gemma2", 46), ("gemma3", 62)):  # the 27B shapes (llama.cpp, after gemma_pytorch)
        attn_scale = 1.0 / math.sqrt(n_embd / n_head)
    n_vocab = f.shape("token_embd.weight")[0]
    return Hparams(
        arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
        head_dim_v=head_dim_v, n_rot=n_rot, n_vocab=n_vocab,
        rms_eps=float(key("attention.layer_norm_rms_epsilon")), rope_base=rope_base, rope_freq_scale=freq_scale,
        rope_base_swa=float(f.value(f"{arch}.rope.freq_base_swa", 10000.0 if arch == "gemma3" else rope_base)),
        rope_freq_scale_swa=1.0 if arch == "gemma3" else freq_scale,
        rope_factors=factors, rope_mscale=float(f.value(f"{arch}.rope.scaling.attn_factor", 1.0) or 1.0), yarn=yarn,
        sliding_window=window, swa_layers=swa,
        attn_softcap=float(f.value(f"{arch}.attn_logit_softcapping", 0.0) or 0.0),
        final_softcap=float(f.value(f"{arch}.final_logit_softcapping", 0.0) or 0.0),
        attn_scale=attn_scale, tied=not f.has("output.weight"),
    )


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def rope(x: np.ndarray, positions: np.ndarray, n_rot: int, base: float, freq_scale: float, neox: bool,
         freq_factors: np.ndarray | None = None, mscale: float = 1.0,
         yarn: tuple[float, float] | None = None) -> np.ndarray:
    """ggml_rope_ext on x [T, heads, head_dim]: the first n_rot dims rotated, pairs (2i, 2i+1) in
    "norm" mode or (i, i + n_rot/2) in NEOX mode, theta = pos * freq_scale * base^(-2i/n_rot) / ff[i]
    (ggml's rope_yarn: with `yarn` = (low, high), blended with the unscaled angle by its ramp, and the
    magnitude times 1 + 0.1 ln(1 / freq_scale)); cos and sin times `mscale`."""
    half = n_rot // 2
    inv = base ** (-np.arange(half, dtype=np.float64) * 2.0 / n_rot)
    if freq_factors is not None:
        inv = inv / freq_factors.astype(np.float64)
    extrapolated = positions.astype(np.float64)[:, None] * inv[None, :]
    theta = extrapolated * freq_scale
    if yarn is not None:
        low, high = yarn
        ramp = 1.0 - np.clip((np.arange(half) - low) / max(0.001, high - low), 0.0, 1.0)
        theta = theta * (1.0 - ramp) + extrapolated * ramp
        mscale *= 1.0 + 0.1 * math.log(1.0 / freq_scale)
    cos = (np.cos(theta) * mscale).astype(x.dtype)[:, None, :]
    sin = (np.sin(theta) * mscale).astype(x.dtype)[:, None, :]
    out = x.copy()
    if neox:
        a, b = x[..., :half], x[..., half:n_rot]
        out[..., :half] = a * cos - b * sin
        out[..., half:n_rot] = a * sin + b * cos
    else:
        a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = a * cos - b * sin
        out[..., 1:n_rot:2] = a * sin + b * cos
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, window: int, softcap: float) -> np.ndarray:
    """Causal attention over the whole sequence: q [T, H, D], k [T, Hkv, D], v [T, Hkv, Dv] -> [T, H, Dv].
    A query at position p sees keys p-window+1..p when window > 0. The query heads sharing a KV head
    go together, queries in chunks, so the scores held are [group, chunk, keys] (at most ~8M floats)."""
    t_len, n_head, dim = q.shape
    n_kv = k.shape[1]
    group = n_head // n_kv
    out = np.empty((t_len, n_head, v.shape[2]), dtype=q.dtype)
    chunk = int(max(16, min(QUERY_CHUNK, SCORES // max(1, group * t_len))))
    for start in range(0, t_len, chunk):
        stop = min(start + chunk, t_len)
        lo = max(0, start - window + 1) if window > 0 else 0
        keys = np.arange(lo, stop)[None, :]
        pos = np.arange(start, stop)[:, None]
        allowed = keys <= pos
        if window > 0:
            allowed &= keys > pos - window
        bias = np.where(allowed, 0.0, -np.inf).astype(q.dtype)
        rows = stop - start
        for g in range(n_kv):
            qg = q[start:stop, g * group:(g + 1) * group].transpose(1, 0, 2).reshape(group * rows, dim)
            s = qg @ k[lo:stop, g].T
            s *= scale
            if softcap > 0:
                s /= softcap
                np.tanh(s, out=s)
                s *= softcap
            s = s.reshape(group, rows, -1)
            s += bias
            s -= s.max(-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(-1, keepdims=True)
            o = s.reshape(group * rows, -1) @ v[lo:stop, g]
            out[start:stop, g * group:(g + 1) * group] = o.reshape(group, rows, -1).transpose(1, 0, 2)
    return out


class ReferenceModel:
    """One GGUF's reference forward. `hidden_states` runs the layers; `logits` the head."""

    def __init__(self, path: Path | str, dtype: np.dtype | type = np.float32):
        self.file = GGUFFile(path)
        self.hp = read_hparams(self.file)
        self.dtype = np.dtype(dtype)

    def _w(self, name: str) -> np.ndarray:
        return self.file.tensor(name, self.dtype)

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        y = x @ self._w(f"{name}.weight").T
        if self.file.has(f"{name}.bias"):
            y += self._w(f"{name}.bias")
        return y

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        x = self.file.rows("token_embd.weight", tokens, self.dtype)
        if self.hp.arch in GEMMA:
            x = x * self.dtype.type(math.sqrt(self.hp.n_embd))
        return x

    def layer(self, il: int, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        hp, b = self.hp, f"blk.{il}."
        t_len = x.shape[0]
        h = rms_norm(x, self._w(b + "attn_norm.weight"), hp.rms_eps)
        q_out, kv_out = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
        if self.file.has(b + "attn_qkv.weight"):
            qkv = self._linear(h, b + "attn_qkv")
            q, k, v = qkv[:, :q_out], qkv[:, q_out:q_out + kv_out], qkv[:, q_out + kv_out:]
        else:
            q, k, v = self._linear(h, b + "attn_q"), self._linear(h, b + "attn_k"), self._linear(h, b + "attn_v")
        q = q.reshape(t_len, hp.n_head, hp.head_dim)
        k = k.reshape(t_len, hp.n_head_kv, hp.head_dim)
        v = v.reshape(t_len, hp.n_head_kv, hp.head_dim_v)
        if self.file.has(b + "attn_q_norm.weight"):
            q = rms_norm(q, self._w(b + "attn_q_norm.weight"), hp.rms_eps)
            k = rms_norm(k, self._w(b + "attn_k_norm.weight"), hp.rms_eps)
        swa = hp.swa_layers[il]
        base, scale = (hp.rope_base_swa, hp.rope_freq_scale_swa) if swa else (hp.rope_base, hp.rope_freq_scale)
        # gemma3's local layers: their own base, unscaled (llama.cpp's freq_scale_swa = 1)
        local = swa and hp.arch == "gemma3"
        factors = self._w(hp.rope_factors) if hp.rope_factors and not local else None
        neox = hp.arch in NEOX_ROPE
        mscale, yarn = (1.0, None) if local else (hp.rope_mscale, hp.yarn)
        q = rope(q, positions, hp.n_rot, base, scale, neox, factors, mscale, yarn)
        k = rope(k, positions, hp.n_rot, base, scale, neox, factors, mscale, yarn)
        o = attention(q, k, v, hp.attn_scale, hp.sliding_window if swa else 0, hp.attn_softcap)
        out = self._linear(o.reshape(t_len, hp.n_head * hp.head_dim_v), b + "attn_output")
        if self.file.has(b + "post_attention_norm.weight"):
            out = rms_norm(out, self._w(b + "post_attention_norm.weight"), hp.rms_eps)
        x = x + out
        h = rms_norm(x, self._w(b + "ffn_norm.weight"), hp.rms_eps)
        if self.file.has(b + "ffn_gate.weight"):
            gate, up = self._linear(h, b + "ffn_gate"), self._linear(h, b + "ffn_up")
        else:  # phi3: ffn_up is [gate; up]
            gate, up = np.split(self._linear(h, b + "ffn_up"), 2, axis=-1)
        act = gelu_tanh(gate) if hp.arch in GEMMA else silu(gate)
        out = self._linear(act * up, b + "ffn_down")
        if self.file.has(b + "post_ffw_norm.weight"):
            out = rms_norm(out, self._w(b + "post_ffw_norm.weight"), hp.rms_eps)
        return x + out

    def hidden_states(self, tokens: list[int] | np.ndarray) -> np.ndarray:
        """The final hidden states [T, n_embd], after the output norm."""
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.hp.n_vocab):
            raise ValueError(f"token ids must be in [0, {self.hp.n_vocab})")
        positions = np.arange(len(ids))
        x = self.embed(ids)
        for il in range(self.hp.n_layer):
            x = self.layer(il, x, positions)
        return rms_norm(x, self._w("output_norm.weight"), self.hp.rms_eps)

    def logit_chunks(self, hidden: np.ndarray, rows: int = 256) -> Iterator[np.ndarray]:
        """The logits of `hidden` [T, n_embd], `rows` positions at a time ([rows, V] each, float32):
        the output matrix (the embedding when tied) is dequantized once when it is small enough,
        else slab by slab for each chunk."""
        name = "token_embd.weight" if self.hp.tied else "output.weight"
        n_vocab, n_embd = self.file.shape(name)
        keep = n_vocab * n_embd * self.dtype.itemsize <= OUTPUT_KEEP_BYTES
        whole = self._w(name) if keep else None
        slab = max(1, OUTPUT_KEEP_BYTES // 8 // (n_embd * self.dtype.itemsize))
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows].astype(self.dtype, copy=False)
            if whole is not None:
                logits = h @ whole.T
            else:
                logits = np.concatenate([h @ self.file.rows(name, slice(v, v + slab), self.dtype).T
                                         for v in range(0, n_vocab, slab)], axis=1)
            if self.hp.final_softcap > 0:
                logits = self.hp.final_softcap * np.tanh(logits / self.hp.final_softcap)
            yield logits.astype(np.float32, copy=False) if self.dtype == np.float32 else logits

    def logits(self, tokens: list[int] | np.ndarray) -> np.ndarray:
        hidden = self.hidden_states(tokens)
        return np.concatenate(list(self.logit_chunks(hidden)), axis=0)


def reference_logits(path: Path | str, tokens: list[int] | np.ndarray, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Every position's next-token logits [T, V] of the GGUF at `path` on `tokens` (float32, or float64)."""
    return ReferenceModel(path, dtype).logits(tokens)


def parameter_count(path: Path | str) -> int:
    """Weights in the file (elements), for sizing the reference's work."""
    return int(sum(int(t.n_elements) for t in GGUFFile(path).reader.tensors))
