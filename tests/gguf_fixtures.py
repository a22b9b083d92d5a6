"""Tiny random GGUF files in llama.cpp's conventions, for the GGUF import path's tests.

Two ways to make one:

- `gguf_fixture(arch, ...)`: random weights written straight in the GGUF's layout (no torch), cached
  for the test session. `write_gguf(path, arch, ...)` is the uncached writer behind it.
- `from_transformers(model, path, ...)`: a transformers model (e.g. `random_hf_model(arch)`, random
  init from a config) written as `convert_hf_to_gguf.py` would: HF names mapped by gguf's own
  `TensorNameMap`, llama's Q/K rows permuted for interleaved rope, gemma's norms stored as 1 + w, an
  untied lm_head kept as `output.weight`. With `match_model` (default) the model's parameters are then
  overwritten with what the file holds (dequantized, the conventions undone), so transformers' logits on
  the model are the truth for the file even when a tensor is quantized.

Architectures: llama, qwen2 (q/k/v biases), qwen3 (q/k norms), phi3 (fused attn_qkv; ffn_up = gate
then up), gemma2 (post norms, softcapping, sliding window on even layers), gemma3 (q/k norms, sliding
window on 5 of every 6 layers, a second rope base for those). Sizes are small (hidden 256 so K-quant
blocks of 256 fit every matrix) and the vocabulary is a byte-level BPE of ~384 tokens trained on the
evaluation text, written as `tokenizer.ggml.*` (model gpt2, tokens, token types, merges, bos/eos,
chat template) so an import can build a tokenizer from the file alone.

Quantization per tensor role (`qtypes`): F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 through
`gguf.quants.quantize`; Q4_K, Q5_K and Q6_K through the simple (not llama.cpp's search-based, but
valid and faithful) quantizers below; Q2_K and Q3_K as random valid blocks. Roles: "token_embd",
"output", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
and "linear" as the default for every 2-D weight not named (norms and biases are always F32, as
llama.cpp keeps them).
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

ARCHS = ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID = 1, 2  # <|im_start|>, <|im_end|> (the chat stop token), as SmolLM2 numbers them
VOCAB_SIZE = 384
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QK_K = 256


# --- the tokenizer -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocab:
    """A byte-level BPE vocabulary as GGUF stores it (tokens in GPT-2's byte-to-unicode spelling)."""
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]  # gguf.TokenType: NORMAL, or CONTROL for the special tokens
    merges: tuple[str, ...]       # "left right"

    def tokenizer_json(self) -> str:
        """The same vocabulary as a `tokenizers` tokenizer.json (GPT-2 style byte-level BPE)."""
        specials = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                     "normalized": False, "special": True}
                    for i, (t, kind) in enumerate(zip(self.tokens, self.token_types, strict=True)) if kind == gguf.TokenType.CONTROL]
        return json.dumps({
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": specials,
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {t: i for i, t in enumerate(self.tokens)},
                      "merges": [m.split(" ") for m in self.merges]},
        })


@functools.cache
def vocab(size: int = VOCAB_SIZE) -> Vocab:
    """A byte-level BPE of `size` tokens trained on the evaluation text (deterministic): the special
    tokens first (ids 0-2), then the 256 byte tokens, then merged pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = (Path(__file__).resolve().parents[1] / "server/build/data/eval_text.txt").read_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    assert [i for _, i in by_id] == list(range(len(by_id)))
    tokens = tuple(t for t, _ in by_id)
    types = tuple(int(gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL) for t in tokens)
    merges = tuple(m if isinstance(m, str) else " ".join(m) for m in model["merges"])
    return Vocab(tokens, types, merges)


def add_tokenizer(writer: gguf.GGUFWriter, v: Vocab, pre: str = "gpt-2") -> None:
    """`tokenizer.ggml.*` as convert_hf_to_gguf.py's `_set_vocab_gpt2` writes them."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(list(v.tokens))
    writer.add_token_types(list(v.token_types))
    writer.add_token_merges(list(v.merges))
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


# --- quantization --------------------------------------------------------------------------------


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _pack_kquant_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """The 12 bytes of Q4_K/Q5_K's eight 6-bit scales and minimums (inverse of Q4_K.get_scale_min)."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    d_ = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    m_ = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    md = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([d_, m_, md], axis=1)


def _affine_kquant(blocks: np.ndarray, bits: int) -> tuple[np.ndarray, ...]:
    """Q4_K/Q5_K: x ~ d*sc*q - dmin*m over 8 sub-blocks of 32, q in [0, 2^bits)."""
    n = blocks.shape[0]
    sub = blocks.reshape(n, 8, 32)
    lo = np.minimum(sub.min(-1), 0.0)
    hi = sub.max(-1)
    qmax = (1 << bits) - 1
    scale = (hi - lo) / qmax
    d = scale.max(-1) / 63
    dmin = (-lo).max(-1) / 63
    d16, dmin16 = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(np.divide(scale, d16[:, None], out=np.zeros_like(scale), where=d16[:, None] > 0)), 0, 63)
    mn = np.clip(np.rint(np.divide(-lo, dmin16[:, None], out=np.zeros_like(lo), where=dmin16[:, None] > 0)), 0, 63)
    step = d16[:, None] * sc
    q = np.divide(sub + (dmin16[:, None] * mn)[..., None], step[..., None],
                  out=np.zeros_like(sub), where=step[..., None] > 0)
    q = np.clip(np.rint(q), 0, qmax).astype(np.uint8)
    return d16, dmin16, sc, mn, q


def _quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, mn, q = _affine_kquant(blocks, 4)
    n = blocks.shape[0]
    q = q.reshape(n, 4, 2, 32)  # sub-block 2g+s sits in nibble s of qs[32g:32g+32]
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_kquant_scales(sc, mn), qs], axis=1)


def _quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, mn, q = _affine_kquant(blocks, 5)
    n = blocks.shape[0]
    low = (q & 0x0F).reshape(n, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    high = (q >> 4).reshape(n, 8, 32)  # sub-block j's fifth bits are bit j of qh[0:32]
    qh = np.zeros((n, 32), np.uint8)
    for j in range(8):
        qh |= high[:, j] << j
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_kquant_scales(sc, mn), qh, qs], axis=1)


def _quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """x ~ d*scale*(q-32) over 16 sub-blocks of 16, int8 scales."""
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    scale = np.abs(sub).max(-1) / 31
    d = (scale.max(-1) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(np.divide(scale, d[:, None], out=np.zeros_like(scale), where=d[:, None] > 0)), 0, 127)
    step = d[:, None] * sc
    q = np.divide(sub, step[..., None], out=np.zeros_like(sub), where=step[..., None] > 0)
    q = (np.clip(np.rint(q), -32, 31) + 32).astype(np.uint8).reshape(n, 256)
    ql = np.zeros((n, 128), np.uint8)
    qh = np.zeros((n, 64), np.uint8)
    for h in range(2):  # element h*128 + t*32 + i: low nibble in ql, two high bits in qh[h*32 + i] at 2t
        part = q[:, h * 128:(h + 1) * 128].reshape(n, 4, 32)
        low = part & 0x0F
        ql[:, h * 64:h * 64 + 32] = low[:, 0] | (low[:, 2] << 4)
        ql[:, h * 64 + 32:h * 64 + 64] = low[:, 1] | (low[:, 3] << 4)
        for t in range(4):
            qh[:, h * 32:(h + 1) * 32] |= (part[:, t] >> 4) << (2 * t)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=1)


def _random_blocks(qtype: QT, n_blocks: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Random valid blocks for a K-quant we do not quantize: random codes and sub-scales with the
    fp16 super-block scales set so values come out about `scale` (the weights' std) in size."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    if qtype == QT.Q2_K:  # scales[16] qs[64] d dmin: mean sub-scale 7.5 times mean code 1.5, centred by the min
        blocks[:, 80:82] = _f16_bytes(np.full(n_blocks, scale / 11))
        blocks[:, 82:84] = _f16_bytes(np.full(n_blocks, scale / 7.5))
    elif qtype == QT.Q3_K:  # hmask[32] qs[64] scales[12] d: |scale - 32| about 16, |code| about 2
        blocks[:, 108:110] = _f16_bytes(np.full(n_blocks, scale / 32))
    else:
        raise ValueError(f"no random blocks for {qtype.name}")
    return blocks


_OWN_QUANTIZERS = {QT.Q4_K: _quantize_q4_k, QT.Q5_K: _quantize_q5_k, QT.Q6_K: _quantize_q6_k}


def quantize(w: np.ndarray, qtype: QT | str | int, rng: np.random.Generator | None = None) -> np.ndarray:
    """`w` (float [rows, k], k along the GGUF's contiguous dim) in `qtype`: float arrays for F32/F16,
    else uint8 [rows, row_bytes] as gguf.GGUFReader gives them back."""
    qtype = as_qtype(qtype)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if qtype in _OWN_QUANTIZERS:
        rows, k = w.shape
        return _OWN_QUANTIZERS[qtype](w.reshape(-1, QK_K)).reshape(rows, -1)
    if qtype in (QT.Q2_K, QT.Q3_K):
        rows, k = w.shape
        scale = float(w.std()) or 1.0
        return _random_blocks(qtype, rows * k // QK_K, scale, rng or np.random.default_rng(0)).reshape(rows, -1)
    return gguf.quants.quantize(w, qtype)


def as_qtype(qtype: QT | str | int) -> QT:
    return QT[qtype] if isinstance(qtype, str) else QT(qtype)


def dequantize(data: np.ndarray, qtype: QT | str | int) -> np.ndarray:
    """float32 back from what `quantize` gave (or a GGUFReader tensor's data)."""
    qtype = as_qtype(qtype)
    if qtype == QT.BF16:
        return gguf.quants.dequantize(np.asarray(data).view(np.uint8), qtype)
    return gguf.quants.dequantize(np.asarray(data), qtype).astype(np.float32)


def role_of(name: str) -> str:
    """`blk.3.ffn_down.weight` -> "ffn_down"; `token_embd.weight` -> "token_embd"."""
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


def qtype_for(name: str, shape: tuple[int, ...], qtypes: Mapping[str, str]) -> QT:
    if len(shape) < 2 or not name.endswith(".weight"):
        return QT.F32
    role = role_of(name)
    return as_qtype(qtypes.get(role, qtypes.get("linear", "F32")))


# --- architectures -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One fixture's shape. Defaults: hidden 256, 2 layers, 4 query heads of 64, 2 kv heads."""
    arch: str = "llama"
    hidden: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    ffn: int = 512
    context: int = 4096
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    sliding_window: int = 0      # gemma2/gemma3 (and phi3's, which llama.cpp ignores)
    attn_softcap: float = 0.0    # gemma2
    final_softcap: float = 0.0   # gemma2 (gemma3 when its config has one)
    rope_base_swa: float = 0.0   # gemma3's local layers (llama.cpp: 10000 when the file says nothing)
    rope_scale: float = 1.0      # linear rope scaling factor (gemma3 4B+ global layers)
    rope_dims: int = 0           # rotated dims per head (0: all; phi3 with a partial rotary factor)
    rope_factors: tuple[float, ...] = ()  # llama's rope_freqs.weight (Llama 3.x scaling), see llama3_rope_factors
    tied: bool = False
    qtypes: tuple[tuple[str, str], ...] = ()
    seed: int = 0
    vocab_size: int = VOCAB_SIZE

    @property
    def qtype_map(self) -> dict[str, str]:
        return dict(self.qtypes)


ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {"rope_base": 1_000_000.0, "rms_eps": 1e-6, "tied": True},
    "qwen3": {"rope_base": 1_000_000.0, "rms_eps": 1e-6, "tied": True},
    "phi3": {"heads": 4, "kv_heads": 4},
    "gemma2": {"rms_eps": 1e-6, "sliding_window": 16, "attn_softcap": 50.0, "final_softcap": 30.0, "tied": True},
    "gemma3": {"rms_eps": 1e-6, "sliding_window": 16, "rope_base": 1_000_000.0, "layers": 6, "tied": True},
}


def spec(arch: str, **overrides: Any) -> Spec:
    """The fixture shape of `arch` (ARCH_DEFAULTS) with overrides; `qtypes` may be a dict or a type
    name for every linear."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; one of {ARCHS}")
    fields = {**ARCH_DEFAULTS[arch], **overrides}
    qtypes = fields.pop("qtypes", ())
    if isinstance(qtypes, str):
        qtypes = {"linear": qtypes}
    if isinstance(qtypes, Mapping):
        qtypes = tuple(sorted(qtypes.items()))
    return Spec(arch=arch, qtypes=tuple(qtypes), **fields)


def write_metadata(writer: gguf.GGUFWriter, s: Spec) -> None:
    """The `{arch}.*` keys convert_hf_to_gguf.py writes for this architecture."""
    writer.add_name(f"tiny-{s.arch}")
    writer.add_context_length(s.context)
    writer.add_embedding_length(s.hidden)
    writer.add_block_count(s.layers)
    writer.add_feed_forward_length(s.ffn)
    writer.add_head_count(s.heads)
    writer.add_head_count_kv(s.kv_heads)
    writer.add_layer_norm_rms_eps(s.rms_eps)
    writer.add_vocab_size(s.vocab_size)
    if s.arch not in ("gemma2",):
        writer.add_rope_freq_base(s.rope_base)
    if s.arch in ("llama", "phi3", "qwen2"):
        writer.add_rope_dimension_count(s.rope_dims or s.head_dim)
    if s.arch in ("qwen3", "gemma2", "gemma3") or s.head_dim * s.heads != s.hidden:
        writer.add_key_length(s.head_dim)
        writer.add_value_length(s.head_dim)
    if s.arch == "phi3":
        writer.add_rope_scaling_orig_ctx_len(s.context)
        writer.add_sliding_window(s.sliding_window)
    if s.arch == "gemma2":
        writer.add_attn_logit_softcapping(s.attn_softcap)
        writer.add_final_logit_softcapping(s.final_softcap)
        writer.add_sliding_window(s.sliding_window)
    if s.arch == "gemma3":
        if s.final_softcap:
            writer.add_final_logit_softcapping(s.final_softcap)
        writer.add_sliding_window(s.sliding_window)
        if s.rope_base_swa:
            writer.add_rope_freq_base_swa(s.rope_base_swa)
    if s.rope_scale != 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(s.rope_scale)
    writer.add_file_type(_file_type(s))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _file_type(s: Spec) -> int:
    """general.file_type from the linears' type (what a mostly-QX file calls itself)."""
    main = as_qtype(s.qtype_map.get("linear", "F32"))
    names = {QT.F32: "ALL_F32", QT.F16: "MOSTLY_F16", QT.BF16: "MOSTLY_BF16", QT.Q8_0: "MOSTLY_Q8_0",
             QT.Q4_0: "MOSTLY_Q4_0", QT.Q4_1: "MOSTLY_Q4_1", QT.Q5_0: "MOSTLY_Q5_0", QT.Q5_1: "MOSTLY_Q5_1",
             QT.Q4_K: "MOSTLY_Q4_K_M", QT.Q5_K: "MOSTLY_Q5_K_M", QT.Q6_K: "MOSTLY_Q6_K",
             QT.Q2_K: "MOSTLY_Q2_K", QT.Q3_K: "MOSTLY_Q3_K_M"}
    return int(gguf.LlamaFileType[names[main]])


def random_tensors(s: Spec) -> dict[str, np.ndarray]:
    """Random weights under their GGUF names, as the file stores them (float32, [rows, k]): gemma's
    norms already 1 + w, llama's Q/K rows already in the interleaved-rope order. Linears have std
    1/sqrt(k) and the embedding 0.3, so activations stay near 1 and logits are not flat."""
    rng = np.random.default_rng(s.seed)

    def linear(n: int, k: int) -> np.ndarray:
        return (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def bias(n: int) -> np.ndarray:
        return (0.1 * rng.standard_normal(n)).astype(np.float32)

    q_out, kv_out = s.heads * s.head_dim, s.kv_heads * s.head_dim
    t: dict[str, np.ndarray] = {"token_embd.weight": (0.3 * rng.standard_normal((s.vocab_size, s.hidden))).astype(np.float32)}
    for i in range(s.layers):
        b = f"blk.{i}."
        t[b + "attn_norm.weight"] = norm(s.hidden)
        if s.arch == "phi3":
            t[b + "attn_qkv.weight"] = linear(q_out + 2 * kv_out, s.hidden)
        else:
            t[b + "attn_q.weight"] = linear(q_out, s.hidden)
            t[b + "attn_k.weight"] = linear(kv_out, s.hidden)
            t[b + "attn_v.weight"] = linear(kv_out, s.hidden)
        if s.arch == "qwen2":
            t[b + "attn_q.bias"], t[b + "attn_k.bias"], t[b + "attn_v.bias"] = bias(q_out), bias(kv_out), bias(kv_out)
        if s.arch in ("qwen3", "gemma3"):
            t[b + "attn_q_norm.weight"], t[b + "attn_k_norm.weight"] = norm(s.head_dim), norm(s.head_dim)
        t[b + "attn_output.weight"] = linear(s.hidden, q_out)
        if s.arch in ("gemma2", "gemma3"):
            t[b + "post_attention_norm.weight"] = norm(s.hidden)
        t[b + "ffn_norm.weight"] = norm(s.hidden)
        if s.arch == "phi3":
            t[b + "ffn_up.weight"] = linear(2 * s.ffn, s.hidden)
        else:
            t[b + "ffn_gate.weight"] = linear(s.ffn, s.hidden)
            t[b + "ffn_up.weight"] = linear(s.ffn, s.hidden)
        t[b + "ffn_down.weight"] = linear(s.hidden, s.ffn)
        if s.arch in ("gemma2", "gemma3"):
            t[b + "post_ffw_norm.weight"] = norm(s.hidden)
    t["output_norm.weight"] = norm(s.hidden)
    if s.rope_factors:
        t["rope_freqs.weight"] = np.asarray(s.rope_factors, np.float32)
    if not s.tied:
        t["output.weight"] = (0.3 * rng.standard_normal((s.vocab_size, s.hidden))).astype(np.float32)
    return t


def write_file(path: Path, s: Spec, tensors: Mapping[str, np.ndarray], v: Vocab | None = None) -> dict[str, np.ndarray]:
    """Writes `tensors` (float, GGUF names, [rows, k]) quantized per `s.qtypes`; returns each tensor
    as the file holds it, dequantized (float32), so callers can compare against the exact weights."""
    v = v or vocab(s.vocab_size)
    if len(v.tokens) != s.vocab_size:
        raise ValueError(f"the vocabulary has {len(v.tokens)} tokens, the model {s.vocab_size}")
    rng = np.random.default_rng(s.seed + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), s.arch)
    write_metadata(writer, s)
    add_tokenizer(writer, v)
    stored: dict[str, np.ndarray] = {}
    for name, w in tensors.items():
        qtype = qtype_for(name, w.shape, s.qtype_map)
        data = quantize(w, qtype, rng) if w.ndim == 2 else np.asarray(w, np.float32)
        if qtype in (QT.F32, QT.F16):
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=qtype)
        stored[name] = dequantize(data, qtype).reshape(w.shape) if w.ndim == 2 else data
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def write_gguf(path: Path, arch: str = "llama", **overrides: Any) -> Path:
    """A random-weight GGUF of `arch` at `path` (see `spec` for the options)."""
    s = spec(arch, **overrides)
    write_file(Path(path), s, random_tensors(s))
    return Path(path)


@functools.cache
def _cache_dir() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="tw-gguf-fixtures-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


@functools.cache
def _cached(s: Spec) -> Path:
    digest = abs(hash(s)) % 10**12
    path = _cache_dir() / f"{s.arch}-{digest}.gguf"
    write_file(path, s, random_tensors(s))
    return path


def gguf_fixture(arch: str = "llama", **overrides: Any) -> Path:
    """A cached (per test session) random GGUF of `arch`: e.g. `gguf_fixture("qwen2", tied=False,
    qtypes={"linear": "Q4_K", "ffn_down": "Q6_K", "token_embd": "Q8_0"})`. Do not modify it."""
    return _cached(spec(arch, **overrides))


# --- from a transformers model -------------------------------------------------------------------

HF_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
                  "gemma2": "gemma2", "gemma3": "gemma3_text"}


def hf_config(arch: str, **overrides: Any):
    """A transformers config with the fixture's shape (`spec(arch)`); overrides are config fields."""
    from transformers import AutoConfig

    s = spec(arch)
    fields: dict[str, Any] = dict(
        vocab_size=s.vocab_size, hidden_size=s.hidden, intermediate_size=s.ffn, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
        max_position_embeddings=s.context, rms_norm_eps=s.rms_eps, rope_theta=s.rope_base,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=0, tie_word_embeddings=s.tied,
    )
    if arch in ("gemma2", "gemma3"):
        fields.update(sliding_window=s.sliding_window, query_pre_attn_scalar=s.head_dim,
                      hidden_activation="gelu_pytorch_tanh")
    if arch == "gemma2":
        fields.update(attn_logit_softcapping=s.attn_softcap, final_logit_softcapping=s.final_softcap)
    if arch == "gemma3":
        fields.update(rope_local_base_freq=10000.0, rope_scaling=None, final_logit_softcapping=None,
                      attn_logit_softcapping=None)
    if arch == "phi3":
        fields.update(sliding_window=None, original_max_position_embeddings=s.context, rope_scaling=None)
    fields.update(overrides)
    config = AutoConfig.for_model(HF_MODEL_TYPES[arch], **fields)
    config._attn_implementation = "eager"
    return config


def random_hf_model(arch: str, seed: int = 0, **overrides: Any):
    """A random-init transformers causal LM of the fixture's shape, in fp32 eval mode, its weights
    widened as `random_tensors` draws them (HF's init std 0.02 gives near-flat logits), norms and
    biases perturbed so a mix-up between them shows."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch, **overrides), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 0.3 if "embed" in name or "lm_head" in name else p.shape[1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif "norm" in name:
                base = 0.0 if arch in ("gemma2", "gemma3") else 1.0  # gemma's norms scale by 1 + w
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: HF's half-split rope rows -> interleaved-rope rows, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute_qk`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(head_dim: int, base: float, factor: float = 8.0, low_freq_factor: float = 1.0,
                        high_freq_factor: float = 4.0, original_context: int = 8192) -> tuple[float, ...]:
    """rope_freqs.weight as convert_hf_to_gguf.py's LlamaModel computes it for rope_type "llama3":
    each frequency's divisor (1 for short wavelengths, `factor` for long ones, smoothed between)."""
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen, high_wavelen = original_context / low_freq_factor, original_context / high_freq_factor
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(float(1 / ((1 - smooth) / factor + smooth)))
    return tuple(out)


def spec_of_config(config, arch: str, qtypes: Mapping[str, str] | str | None = None) -> Spec:
    """The `Spec` a transformers config corresponds to (what metadata the file gets)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    tied = bool(getattr(config, "tie_word_embeddings", False)) or arch == "gemma2"
    rope_scaling = getattr(config, "rope_scaling", None) or {}
    rope_factors: tuple[float, ...] = ()
    if arch == "llama" and rope_scaling.get("rope_type") == "llama3":
        rope_factors = llama3_rope_factors(
            head_dim, float(config.rope_theta), rope_scaling.get("factor", 8.0), rope_scaling.get("low_freq_factor", 1.0),
            rope_scaling.get("high_freq_factor", 4.0), rope_scaling.get("original_max_position_embeddings", 8192))
    return spec(
        arch, hidden=config.hidden_size, layers=config.num_hidden_layers, heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads, head_dim=head_dim, ffn=config.intermediate_size,
        context=config.max_position_embeddings, rope_base=float(config.rope_theta), rms_eps=config.rms_norm_eps,
        sliding_window=int(getattr(config, "sliding_window", None) or 0),
        attn_softcap=float(getattr(config, "attn_logit_softcapping", None) or 0.0),
        final_softcap=float(getattr(config, "final_logit_softcapping", None) or 0.0),
        rope_base_swa=0.0 if arch != "gemma3" or config.rope_local_base_freq == 10000.0 else config.rope_local_base_freq,
        rope_scale=float(rope_scaling.get("factor", 1.0)) if rope_scaling.get("rope_type") == "linear" else 1.0,
        rope_dims=int(head_dim * getattr(config, "partial_rotary_factor", 1.0)) if arch == "phi3" else 0,
        rope_factors=rope_factors,
        tied=tied, vocab_size=config.vocab_size, qtypes=qtypes or (),
    )


def _gemma_shift(arch: str, hf_name: str) -> float:
    return 1.0 if arch in ("gemma2", "gemma3") and hf_name.endswith("norm.weight") else 0.0


def from_transformers(model, path: Path, arch: str, qtypes: Mapping[str, str] | str | None = None,
                      match_model: bool = True, v: Vocab | None = None) -> Path:
    """Writes a transformers causal LM as convert_hf_to_gguf.py would (see the module docstring).

    With `match_model`, the model's parameters become exactly what the file holds (quantization
    rounding included), so `model(ids).logits` is the reference's truth for this file."""
    import torch

    config = model.config
    s = spec_of_config(config, arch, qtypes)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], s.layers)
    state = {k: val.detach().to(torch.float32).numpy() for k, val in model.state_dict().items()}
    tensors: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for hf_name, w in state.items():
        if hf_name == "lm_head.weight" and s.tied:
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        w = w + _gemma_shift(arch, hf_name)
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            w = permute_qk(w, s.heads)
        if arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            w = permute_qk(w, s.kv_heads)
        tensors[name] = np.ascontiguousarray(w, np.float32)
        origin[name] = hf_name
    if s.rope_factors:
        tensors["rope_freqs.weight"] = np.asarray(s.rope_factors, np.float32)
    stored = write_file(Path(path), s, tensors, v)
    if match_model:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, w in stored.items():
                if name not in origin:
                    continue
                hf_name = origin[name]
                if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                    w = unpermute_qk(w, s.heads)
                if arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                    w = unpermute_qk(w, s.kv_heads)
                w = w - _gemma_shift(arch, hf_name)
                params[hf_name].copy_(torch.from_numpy(np.ascontiguousarray(w, np.float32)))
    return Path(path)


@dataclass
class HFFixture:
    """A transformers model and the GGUF written from it."""
    model: Any
    path: Path
    arch: str
    extra: dict[str, Any] = field(default_factory=dict)

    def logits(self, tokens: list[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.model(torch.tensor([tokens]), use_cache=False)
        return out.logits[0].to(torch.float32).numpy()


@functools.cache
def _cached_hf(key: str) -> HFFixture:
    args = json.loads(key)
    model = random_hf_model(args["arch"], seed=args["seed"], **args["overrides"])
    path = _cache_dir() / f"hf-{args['arch']}-{abs(hash(key)) % 10**12}.gguf"
    from_transformers(model, path, args["arch"], args["qtypes"])
    return HFFixture(model, path, args["arch"])


def hf_fixture(arch: str, qtypes: Mapping[str, str] | str | None = None, seed: int = 0, **overrides: Any) -> HFFixture:
    """A cached random transformers model of `arch` and its GGUF (needs torch: the export extra).
    `overrides` are config fields (JSON values). Do not modify the model or the file."""
    if isinstance(qtypes, str):
        qtypes = {"linear": qtypes}
    key = {"arch": arch, "qtypes": dict(qtypes or {}), "seed": seed, "overrides": overrides}
    return _cached_hf(json.dumps(key, sort_keys=True))


__all__ = ["ARCHS", "BOS_ID", "EOS_ID", "HFFixture", "Spec", "Vocab", "dequantize", "from_transformers",
           "gguf_fixture", "hf_config", "hf_fixture", "llama3_rope_factors", "permute_qk", "quantize", "random_hf_model",
           "random_tensors", "spec", "unpermute_qk", "vocab", "write_gguf"]
