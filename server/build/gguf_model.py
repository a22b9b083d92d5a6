"""What a GGUF file holds, read from its metadata and tensor table (never from its file name).

`read_model(path)` opens the file with `gguf.GGUFReader` (memory-mapped: no tensor is read
here) and returns a `GGUFModel`: the architecture, sizes, norms, rope, attention variant
(sliding window, softcapping), and per layer the llama.cpp tensor names the graph needs
(llama.cpp's src/llama-arch.cpp / gguf-py constants.MODEL_TENSORS). What each architecture
computes follows llama.cpp's src/models/*.cpp:

* llama (also mistral, which GGUF calls llama): RMSNorm pre-norm blocks, SiLU-gated MLP,
  rope in llama.cpp's "norm" mode (pairs of adjacent dims: convert_hf_to_gguf.py permuted the Q/K
  rows for it), optional biases, llama3 `rope_freqs` factors;
* qwen2: llama with q/k/v biases, NEOX rope (halves);
* qwen3: per-head RMSNorm of q and k before rope (attn_q_norm / attn_k_norm), NEOX;
* phi3: fused attn_qkv, ffn_up holding gate then up, NEOX, longrope factors; its sliding
  window is ignored, as llama.cpp ignores it;
* gemma2: embedding x sqrt(hidden), GELU(tanh) gate, norms after attention and MLP, sliding
  window on even layers, attention and final logit softcapping;
* gemma3: gemma2 without attention softcapping, with q/k norms, 5 local layers (sliding window,
  rope base 10000) to 1 global (the file's rope base and scaling).

An unreadable or truncated file raises GGUFCorrupt (gguf_file.py parses it); a file this reader
does not understand (architecture, shapes, tensors it would ignore) raises GGUFUnsupported. Both say
why.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .gguf_file import GGUFCorrupt, GGUFFile, SkippedArray

__all__ = ["ARCHITECTURES", "GGUFCorrupt", "GGUFModel", "GGUFUnsupported", "LayerTensors", "Rope", "read_model"]

ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")
# The most positions a graph serves (its rope tables cover them: 0.5 GB of fp32 at head size 128);
# a file claiming more (Qwen2.5-1M's 1,010,000 fit) is served this many.
MAX_CONTEXT = 1 << 20


class GGUFUnsupported(ValueError):
    """A readable GGUF of something the native graph does not build (the message says what)."""


@dataclass(frozen=True)
class ArchTraits:
    rope_interleaved: bool = False  # llama.cpp's "norm" rope: the file's Q/K rows are permuted for it
    activation: str = "silu"  # the MLP gate: "silu" or "gelu_tanh"
    embedding_scale: bool = False  # token embeddings x sqrt(hidden) (gemma)
    post_norms: bool = False  # RMSNorm after attention and after the MLP, before the residual (gemma2/3)
    swa_period: int = 0  # every layer i with i % period < period - 1 slides (llama.cpp set_swa_pattern)
    default_window: int = 0
    attn_softcap: float = 0.0  # llama.cpp's defaults where the file names none
    final_softcap: float = 0.0
    local_rope_base: float = 0.0  # the sliding layers' rope base (gemma3: 10000, unscaled)
    ignore_window: bool = False  # phi3: llama.cpp disables the file's sliding window


TRAITS: dict[str, ArchTraits] = {
    "llama": ArchTraits(rope_interleaved=True),
    "qwen2": ArchTraits(),
    "qwen3": ArchTraits(),
    "phi3": ArchTraits(ignore_window=True),
    "gemma2": ArchTraits(activation="gelu_tanh", embedding_scale=True, post_norms=True, swa_period=2,
                         default_window=4096, attn_softcap=50.0, final_softcap=30.0),
    "gemma3": ArchTraits(activation="gelu_tanh", embedding_scale=True, post_norms=True, swa_period=6,
                         local_rope_base=10000.0),
}


@dataclass(frozen=True)
class Rope:
    """How positions rotate q and k (ggml_rope_ext's parameters, per layer)."""

    base: float
    dims: int  # rotated dims of a head (rope.dimension_count; the rest pass through)
    interleaved: bool  # pairs (2i, 2i+1) as stored (llama), else (i, i + dims/2) (NEOX)
    scaling: str = "none"  # "none", "linear", "yarn", "longrope"
    factor: float = 1.0  # linear/yarn: positions are divided by it
    original_context: int = 0  # yarn's n_ctx_orig
    attn_factor: float = 1.0  # cos/sin multiplied by it (yarn's and longrope's magnitude scale)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    factors: str = ""  # tensor of per-frequency divisors: rope_freqs (llama3), rope_factors_long/short (phi3)


@dataclass(frozen=True)
class LayerTensors:
    """One block's tensor names ("" when the block has none of that kind)."""

    attn_norm: str
    q: str = ""
    k: str = ""
    v: str = ""
    qkv: str = ""  # fused (phi3)
    q_bias: str = ""
    k_bias: str = ""
    v_bias: str = ""
    qkv_bias: str = ""
    q_norm: str = ""
    k_norm: str = ""
    o: str = ""
    o_bias: str = ""
    post_attn_norm: str = ""
    ffn_norm: str = ""
    gate: str = ""
    up: str = ""
    gate_up: str = ""  # fused: gate rows, then up rows (phi3's ffn_up)
    down: str = ""
    gate_bias: str = ""
    up_bias: str = ""
    down_bias: str = ""
    post_ffn_norm: str = ""
    sliding_window: int = 0  # 0: attends to the whole context
    rope: Rope | None = None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: int  # gguf.GGMLQuantizationType value
    type_name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the contiguous dim (K of a weight)
    n_bytes: int
    index: int  # in GGUFFile.tensors


@dataclass
class GGUFModel:
    path: Path
    architecture: str
    name: str
    file_type: str  # "Q4_K_M", "Q8_0", ... (general.file_type), else the commonest weight type
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context_length: int
    rms_eps: float
    attention_scale: float  # applied to q·k (1/sqrt(head_dim) unless the architecture says otherwise)
    attn_softcap: float
    final_softcap: float
    embedding_scale: float  # 1.0, or sqrt(hidden) for gemma
    activation: str
    embedding: str  # token_embd.weight
    output: str  # the lm_head tensor: output.weight, or token_embd.weight when tied
    output_norm: str
    output_bias: str
    blocks: list[LayerTensors]
    tensors: dict[str, TensorInfo] = field(repr=False)
    metadata: dict[str, Any] = field(repr=False)
    parameter_count: int = 0

    @property
    def tied(self) -> bool:
        return self.output == self.embedding

    def tensor(self, name: str) -> TensorInfo:
        return self.tensors[name]


def _field(f: GGUFFile, key: str) -> Any:
    return f.field(key)


def _count(value: Any, key: str, minimum: int = 1) -> int:
    """A size the file gives (a count, a dimension): a whole number >= minimum, else GGUFCorrupt."""
    whole = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value == int(value))
    if isinstance(value, bool) or not whole or int(value) < minimum:
        raise GGUFCorrupt(f"{key} is {value!r}, not a whole number of at least {minimum}")
    return int(value)


def _real(value: Any, key: str, positive: bool = False) -> float:
    """A float the file gives: finite (and > 0 when `positive`), else GGUFCorrupt."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            positive and value <= 0):
        raise GGUFCorrupt(f"{key} is {value!r}, not a finite{' positive' if positive else ''} number")
    return float(value)


def _file_type(reader, tensors: dict[str, TensorInfo]) -> str:
    from gguf import LlamaFileType

    value = _field(reader, "general.file_type")
    if value is not None:
        try:
            name = LlamaFileType(int(value)).name
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    counts: dict[str, int] = {}
    for t in tensors.values():
        if len(t.shape) == 2:
            counts[t.type_name] = counts.get(t.type_name, 0) + t.n_bytes
    return max(counts, key=counts.get) if counts else "unknown"


def _swa_layers(reader, arch: str, traits: ArchTraits, layers: int) -> list[bool]:
    """Which layers slide (llama.cpp's set_swa_pattern, or the file's per-layer pattern)."""
    pattern = _field(reader, f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) == layers:
        return [bool(p) for p in pattern]
    period = int(pattern) if isinstance(pattern, (int, float)) and pattern else traits.swa_period
    if period <= 0:
        return [False] * layers
    return [i % period < period - 1 for i in range(layers)]


def _rope(reader, arch: str, traits: ArchTraits, head_dim: int, tensors: dict[str, TensorInfo],
          context_length: int) -> Rope:
    def key(name: str, default: Any) -> Any:
        return _field(reader, f"{arch}.rope.{name}") or default

    base = _real(key("freq_base", 10000.0), f"{arch}.rope.freq_base", positive=True)
    dims = _count(key("dimension_count", head_dim), f"{arch}.rope.dimension_count")
    scaling = str(key("scaling.type", "none")).lower()
    factor = _real(key("scaling.factor", 0.0), f"{arch}.rope.scaling.factor")
    if factor < 0:
        raise GGUFCorrupt(f"{arch}.rope.scaling.factor is {factor}, not a positive number")
    if scaling == "none" and factor and factor != 1.0:  # older files name only the factor (linear)
        scaling = "linear"
    original = _count(key("scaling.original_context_length", context_length),
                      f"{arch}.rope.scaling.original_context_length")
    attn_factor = _real(key("scaling.attn_factor", 1.0), f"{arch}.rope.scaling.attn_factor", positive=True)
    factors = ""
    if "rope_freqs.weight" in tensors:
        factors = "rope_freqs.weight"
    elif "rope_factors_long.weight" in tensors or "rope_factors_short.weight" in tensors:
        # llama.cpp picks the long factors when the context served exceeds the original one; we
        # serve the file's whole context, so: long, when the file has them and the context is longer.
        long = "rope_factors_long.weight" in tensors and context_length > original
        factors = "rope_factors_long.weight" if long else "rope_factors_short.weight"
        scaling = "longrope"
        if factors not in tensors:
            factors = "rope_factors_long.weight"
    if scaling not in ("none", "linear", "yarn", "longrope"):
        raise GGUFUnsupported(f"rope scaling {scaling!r} is not supported (none, linear, yarn, longrope are)")
    if dims > head_dim or dims % 2:
        raise GGUFUnsupported(f"rope.dimension_count {dims} does not fit head size {head_dim}")
    return Rope(base=base, dims=dims, interleaved=traits.rope_interleaved, scaling=scaling,
                factor=factor or 1.0, original_context=original, attn_factor=attn_factor,
                beta_fast=_real(key("scaling.yarn_beta_fast", 32.0), f"{arch}.rope.scaling.yarn_beta_fast", True),
                beta_slow=_real(key("scaling.yarn_beta_slow", 1.0), f"{arch}.rope.scaling.yarn_beta_slow", True),
                factors=factors)


def _blocks(arch: str, layers: int, names: set[str]) -> list[LayerTensors]:
    def have(name: str) -> str:
        return name if name in names else ""

    blocks = []
    for i in range(layers):
        p = f"blk.{i}."
        b = {role: have(p + suffix) for role, suffix in (
            ("attn_norm", "attn_norm.weight"), ("q", "attn_q.weight"), ("k", "attn_k.weight"),
            ("v", "attn_v.weight"), ("qkv", "attn_qkv.weight"), ("q_bias", "attn_q.bias"),
            ("k_bias", "attn_k.bias"), ("v_bias", "attn_v.bias"), ("qkv_bias", "attn_qkv.bias"),
            ("q_norm", "attn_q_norm.weight"), ("k_norm", "attn_k_norm.weight"), ("o", "attn_output.weight"),
            ("o_bias", "attn_output.bias"), ("post_attn_norm", "post_attention_norm.weight"),
            ("ffn_norm", "ffn_norm.weight"), ("gate", "ffn_gate.weight"), ("up", "ffn_up.weight"),
            ("down", "ffn_down.weight"), ("gate_bias", "ffn_gate.bias"), ("up_bias", "ffn_up.bias"),
            ("down_bias", "ffn_down.bias"), ("post_ffn_norm", "post_ffw_norm.weight"))}
        b["gate_up"] = ""
        if arch == "phi3" and not b["gate"] and b["up"]:  # phi3's ffn_up holds gate and up
            b["gate_up"], b["up"] = b["up"], ""
        missing = [role for role in ("attn_norm", "o", "ffn_norm", "down") if not b[role]]
        if not (b["qkv"] or (b["q"] and b["k"] and b["v"])):
            missing.append("q/k/v (attn_q, attn_k, attn_v or attn_qkv)")
        if not (b["gate_up"] or (b["gate"] and b["up"])):
            missing.append("ffn_gate and ffn_up")
        if missing:
            raise GGUFUnsupported(f"block {i} of this {arch} file has no {', '.join(missing)}")
        blocks.append(LayerTensors(**b))
    return blocks


# Tensors a file may carry that the graph needs no weights from.
_IGNORED = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def _used(model: GGUFModel) -> set[str]:
    used = {model.embedding, model.output, model.output_norm, model.output_bias, *_IGNORED}
    for b in model.blocks:
        used.update(v for k, v in vars(b).items() if isinstance(v, str))
    return used - {""}


def _per_layer_constant(value: Any, what: str, key: str) -> int:
    """A count the file may give per layer (a list): fine when every layer has the same."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise GGUFUnsupported(f"layers with different {what} are not supported")
        value = value[0]
    return _count(value, key)


def read_model(source: GGUFFile | str | os.PathLike) -> GGUFModel:
    """The model a GGUF describes; `source` is a path or an open GGUFFile."""
    from gguf import GGMLQuantizationType

    reader = source if isinstance(source, GGUFFile) else GGUFFile(source)
    path = reader.path
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str):
        raise GGUFCorrupt(f"{path} has no general.architecture")
    if arch not in TRAITS:
        raise GGUFUnsupported(f"architecture {arch!r} is not supported by the native graph "
                              f"(it builds {', '.join(ARCHITECTURES)})")
    traits = TRAITS[arch]
    tensors: dict[str, TensorInfo] = {}
    for t in reader.tensors:
        tensors[t.name] = TensorInfo(t.name, t.qtype, GGMLQuantizationType(t.qtype).name, t.shape, t.n_bytes,
                                     t.index)

    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise GGUFCorrupt(f"{path} has no {arch}.{key}")
        return value

    if "token_embd.weight" not in tensors:
        raise GGUFUnsupported(f"{path} has no token_embd.weight")
    layers = _count(need("block_count"), f"{arch}.block_count")
    hidden = _count(need("embedding_length"), f"{arch}.embedding_length")
    heads = _per_layer_constant(need("attention.head_count"), "query head counts", f"{arch}.attention.head_count")
    kv_heads = _per_layer_constant(_field(reader, f"{arch}.attention.head_count_kv") or heads, "KV head counts",
                                   f"{arch}.attention.head_count_kv")
    head_dim = _count(_field(reader, f"{arch}.attention.key_length") or hidden // heads,
                      f"{arch}.attention.key_length (or embedding_length / head_count)")
    value_dim = _count(_field(reader, f"{arch}.attention.value_length") or head_dim, f"{arch}.attention.value_length")
    if value_dim != head_dim:
        raise GGUFUnsupported(f"key length {head_dim} differs from value length {value_dim}")
    embd = tensors["token_embd.weight"]
    if len(embd.shape) != 2 or embd.shape[0] != hidden:
        raise GGUFCorrupt(f"token_embd.weight is {list(embd.shape)}, not [{hidden}, vocab]")
    vocab = embd.shape[1]
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_tokens = tokens.count if isinstance(tokens, SkippedArray) else len(tokens) if isinstance(tokens, list) else None
    if n_tokens is not None and n_tokens != vocab:  # llama.cpp refuses such a file too
        raise GGUFCorrupt(f"the file has {n_tokens:,} tokens but token_embd.weight has {vocab:,} rows")
    context = _count(_field(reader, f"{arch}.context_length") or 2048, f"{arch}.context_length")
    eps = _real(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon") or 1e-5,
                f"{arch}.attention.layer_norm_rms_epsilon", positive=True)
    blocks = _blocks(arch, layers, set(tensors))
    ffl = _field(reader, f"{arch}.feed_forward_length")
    intermediate = _per_layer_constant(ffl, "feed-forward sizes", f"{arch}.feed_forward_length") if ffl else 0
    b0 = blocks[0]
    ffn_rows = tensors[b0.down].shape[0]
    if intermediate and intermediate != ffn_rows:
        raise GGUFCorrupt(f"feed_forward_length {intermediate} but ffn_down takes {ffn_rows} inputs")
    intermediate = ffn_rows

    scale = _field(reader, f"{arch}.attention.scale")
    if scale:
        attention_scale = _real(scale, f"{arch}.attention.scale", positive=True)
    elif arch in ("gemma2", "gemma3") and layers in ((46,) if arch == "gemma2" else (62,)):
        attention_scale = 1.0 / math.sqrt(hidden / heads)  # 27B: query_pre_attn_scalar = hidden / heads
    else:
        attention_scale = 1.0 / math.sqrt(head_dim)
    attn_softcap = traits.attn_softcap
    if attn_softcap:
        attn_softcap = _real(_field(reader, f"{arch}.attn_logit_softcapping") or attn_softcap,
                             f"{arch}.attn_logit_softcapping", positive=True)
    final = _field(reader, f"{arch}.final_logit_softcapping")
    final_softcap = _real(final, f"{arch}.final_logit_softcapping") if final is not None else traits.final_softcap
    if final_softcap < 0:
        raise GGUFCorrupt(f"{arch}.final_logit_softcapping is {final_softcap}, not a positive number")

    rope = _rope(reader, arch, traits, head_dim, tensors, context)
    window = _count(_field(reader, f"{arch}.attention.sliding_window") or traits.default_window,
                    f"{arch}.attention.sliding_window", minimum=0)
    sliding = _swa_layers(reader, arch, traits, layers) if window and not traits.ignore_window else [False] * layers
    if arch == "gemma3" and not _field(reader, f"{arch}.attention.sliding_window"):
        sliding = [False] * layers  # llama.cpp: no window in the file, no sliding layers
    local_base = _field(reader, f"{arch}.rope.freq_base_swa")
    local_rope = rope
    if local_base or traits.local_rope_base:
        local_rope = Rope(base=_real(local_base or traits.local_rope_base, f"{arch}.rope.freq_base_swa", True),
                          dims=rope.dims,
                          interleaved=rope.interleaved)  # unscaled (llama.cpp's freq_scale_swa = 1)
    blocks = [LayerTensors(**{**vars(b), "sliding_window": window if sliding[i] else 0,
                              "rope": local_rope if sliding[i] else rope}) for i, b in enumerate(blocks)]

    output = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    if "output_norm.weight" not in tensors:
        raise GGUFUnsupported(f"{path} has no output_norm.weight")
    model = GGUFModel(
        path=path, architecture=arch, name=str(_field(reader, "general.name") or path.stem),
        file_type=_file_type(reader, tensors), layers=layers, hidden=hidden, intermediate=intermediate,
        heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=vocab, context_length=min(context, MAX_CONTEXT),
        rms_eps=eps,
        attention_scale=attention_scale, attn_softcap=attn_softcap, final_softcap=final_softcap,
        embedding_scale=math.sqrt(hidden) if traits.embedding_scale else 1.0, activation=traits.activation,
        embedding="token_embd.weight", output=output, output_norm="output_norm.weight",
        output_bias="output.bias" if "output.bias" in tensors else "", blocks=blocks, tensors=tensors,
        metadata={k: v for k, v in reader.fields.items() if k.startswith((f"{arch}.", "general."))},
        parameter_count=sum(int(np.prod(t.shape)) for n, t in tensors.items() if n not in _IGNORED),
    )
    _check_shapes(model)
    extra = sorted(n for n in set(tensors) - _used(model) if not n.endswith(".attn_rot_embd"))  # old rope tables
    if extra:
        raise GGUFUnsupported(f"this {arch} file has tensors the native graph would ignore: {', '.join(extra[:5])}"
                              + (f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""))
    return model


def _check_shapes(m: GGUFModel) -> None:
    """Every weight's [K, N] as the graph will use it; GGUFCorrupt naming the first that differs."""
    q_width, kv_width = m.heads * m.head_dim, m.kv_heads * m.head_dim
    want: dict[str, tuple[int, ...]] = {m.output: (m.hidden, m.vocab), m.output_norm: (m.hidden,)}
    if m.output_bias:
        want[m.output_bias] = (m.vocab,)
    for b in m.blocks:
        want.update({b.attn_norm: (m.hidden,), b.o: (q_width, m.hidden), b.ffn_norm: (m.hidden,),
                     b.down: (m.intermediate, m.hidden)})
        if b.qkv:
            want[b.qkv] = (m.hidden, q_width + 2 * kv_width)
        else:
            want.update({b.q: (m.hidden, q_width), b.k: (m.hidden, kv_width), b.v: (m.hidden, kv_width)})
        for name, n in ((b.q_bias, q_width), (b.k_bias, kv_width), (b.v_bias, kv_width),
                        (b.qkv_bias, q_width + 2 * kv_width), (b.o_bias, m.hidden), (b.q_norm, m.head_dim),
                        (b.k_norm, m.head_dim), (b.post_attn_norm, m.hidden), (b.post_ffn_norm, m.hidden),
                        (b.gate_bias, m.intermediate), (b.up_bias, m.intermediate), (b.down_bias, m.hidden)):
            if name:
                want[name] = (n,)
        if b.gate_up:
            want[b.gate_up] = (m.hidden, 2 * m.intermediate)
        else:
            want.update({b.gate: (m.hidden, m.intermediate), b.up: (m.hidden, m.intermediate)})
    for name, shape in want.items():
        have = m.tensors[name].shape
        if tuple(have) != shape:
            raise GGUFCorrupt(f"{name} is {list(have)} but this {m.architecture} model needs {list(shape)}")
    r = m.blocks[0].rope
    if r is not None and r.factors and m.tensors[r.factors].shape != (r.dims // 2,):
        raise GGUFCorrupt(f"{r.factors} is {list(m.tensors[r.factors].shape)}, not [{r.dims // 2}]")
