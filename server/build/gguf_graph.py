"""A GGUF model as tokenwire's native graph, written straight from the file's blocks.

`build_gguf_graph(model, reader, out_dir)` writes `model_native.onnx` and its external data
`model_native.onnx.data` with the interface of fast_graph.py's native graph, so PagedEngine runs
it as it runs the default model:

* inputs input_ids [B, S] int64, attention_mask [B, T] int64, kv_pages [B, pages per row] int32,
  past_key_values.N.key/value fp16 pools [pages, kv_heads, 16, head_dim];
* outputs logits [B, 1, V] (the last position; every position with `last_only=False`) and
  present.N.key/value (the same pools).

Every weight is one `ai.tokenwire.BlockLinear` (embedding: `BlockGather`) over the tensor's own
quantized blocks as gguf_pack.pack lays them out (exact: codes, scales and minimums as in the
file). Q/K/V fuse into one BlockLinear when they share a type (else three and a Concat), as do
gate/up; biases are Adds; norms are onnxruntime's (Skip)SimplifiedLayerNormalization; attention is
`ai.tokenwire.Attention` with rope inside it, its cos/sin tables computed here from the metadata
(gguf_rope.py; a llama file's Q/K rows are reordered for the op's half-split rope).

Weights stream: each tensor is read from the memory-mapped file, packed, appended to the data
file and let go (its pages given back to the kernel) before the next; the ONNX proto holds only
references (data_location EXTERNAL), so peak memory is about one tensor's copy beyond the file's
pages being read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tokenwire.server.engine.graph import NATIVE_GRAPH

from .gguf_model import GGUFModel, GGUFUnsupported, LayerTensors, Rope
from .gguf_rope import rope_tables, rows_order

DOMAIN = "ai.tokenwire"
ALIGN = 4096  # external data offsets on page boundaries (onnxruntime maps such tensors in place)
INLINE_BYTES = 16 << 10  # smaller initializers (norm weights, shapes) stay inside the proto
FLOAT_TYPES = ("F32", "F16", "BF16")
MAX_HEAD_DIM = 256
MAX_GROUP = 8  # query heads per KV head the Attention op takes


def native_unsupported(model: GGUFModel) -> str:
    """Why the native graph cannot run this model ("" when it can): types, head sizes."""
    from . import gguf_pack

    if model.head_dim % 16 or model.head_dim > MAX_HEAD_DIM:
        return f"head size {model.head_dim}: the native Attention op takes multiples of 16 up to {MAX_HEAD_DIM}"
    if model.heads % model.kv_heads or model.heads // model.kv_heads > MAX_GROUP:
        return (f"{model.heads} query heads over {model.kv_heads} KV heads: the native Attention op takes "
                f"1 to {MAX_GROUP} query heads per KV head")
    for name in _weight_names(model):
        t = model.tensor(name)
        if t.qtype not in gguf_pack.SUPPORTED:
            return gguf_pack.unsupported_message(t.qtype, name)
    for name in _vector_names(model):
        t = model.tensor(name)
        if t.type_name not in FLOAT_TYPES:
            return f"{name} is {t.type_name}; the graph reads norms and biases in F32, F16 or BF16"
    return ""


def _weight_names(m: GGUFModel) -> list[str]:
    names = [m.embedding, m.output]
    for b in m.blocks:
        names += [n for n in (b.q, b.k, b.v, b.qkv, b.o, b.gate, b.up, b.gate_up, b.down) if n]
    return list(dict.fromkeys(names))


def _vector_names(m: GGUFModel) -> list[str]:
    names = [m.output_norm, m.output_bias]
    for b in m.blocks:
        names += [b.attn_norm, b.ffn_norm, b.post_attn_norm, b.post_ffn_norm, b.q_norm, b.k_norm, b.q_bias,
                  b.k_bias, b.v_bias, b.qkv_bias, b.o_bias, b.gate_bias, b.up_bias, b.down_bias]
    r = m.blocks[0].rope
    names.append(r.factors if r else "")
    return [n for n in dict.fromkeys(names) if n]


# ---- the external data file -------------------------------------------------------------------

class ExternalData:
    """Appends tensors to `<graph>.data` and makes TensorProtos that point into it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "wb")
        self.offset = 0

    def tensor(self, name: str, array: np.ndarray):
        from onnx import helper, numpy_helper

        array = np.ascontiguousarray(array)
        if array.nbytes < INLINE_BYTES:
            return numpy_helper.from_array(array, name)
        pad = -self.offset % ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad
        self.file.write(memoryview(array).cast("B"))
        tensor = _empty_tensor(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)
        for key, value in (("location", self.path.name), ("offset", self.offset), ("length", array.nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self.offset += array.nbytes
        return tensor

    def close(self) -> None:
        self.file.close()


def _empty_tensor(name: str, data_type: int, shape: tuple[int, ...]):
    from onnx import TensorProto

    t = TensorProto()
    t.name = name
    t.data_type = data_type
    t.dims.extend(int(d) for d in shape)
    t.data_location = TensorProto.EXTERNAL
    return t


# ---- the graph --------------------------------------------------------------------------------

@dataclass
class BuildReport:
    tensor_bytes: int = 0  # the file's bytes of the weights packed
    packed_bytes: int = 0  # codes + meta written
    types: dict[str, int] = field(default_factory=dict)  # weight type -> tensors
    linears: int = 0
    fused: dict[str, int] = field(default_factory=dict)  # "qkv" / "gate_up" -> blocks fused


class GraphWriter:
    """Nodes, initializers and the data file of one graph being written."""

    def __init__(self, model: GGUFModel, reader, data: ExternalData, weights: str) -> None:
        self.m, self.reader, self.data, self.weights = model, reader, data, weights
        self.nodes: list = []
        self.inits: list = []
        self.report = BuildReport()
        self._packed: dict[str, tuple[str, str, int, int, int]] = {}
        self._consts: dict[tuple, str] = {}

    # -- helpers --
    def node(self, op: str, inputs: list[str], outputs: list[str] | str, domain: str = "", **attrs) -> str:
        from onnx import helper

        outs = [outputs] if isinstance(outputs, str) else outputs
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"{op}_{len(self.nodes)}", domain=domain, **attrs))
        return outs[0]

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(self.data.tensor(name, array))
        return name

    def const(self, values, dtype=np.int64) -> str:
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"const_{len(self._consts)}", array)
        return self._consts[key]

    def raw(self, name: str) -> np.ndarray:
        """A tensor's data as the file maps it (uint8 [rows, row bytes] for block types)."""
        return self.reader.data(self.reader.tensors[self.m.tensor(name).index])

    def vector(self, name: str, order: np.ndarray | None = None) -> np.ndarray:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self.m.tensor(name)
        values = dequantize(self.raw(name), GGMLQuantizationType(t.qtype)).astype(np.float32).reshape(-1)
        return values[order] if order is not None else values

    # -- weights --
    def packed(self, key: str, names: list[str], orders: list[np.ndarray | None]) -> tuple[str, str, int, int, int]:
        """(codes, meta, qtype, K, N) of the rows of `names` stacked (each reordered by its order)."""
        if key in self._packed:
            return self._packed[key]
        from . import gguf_pack

        tensors = [self.m.tensor(n) for n in names]
        qtype, k = tensors[0].qtype, tensors[0].shape[0]
        parts = []
        for name, order in zip(names, orders, strict=True):
            raw = self.raw(name)
            parts.append(raw[order] if order is not None else raw)
        raw = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        n = sum(t.shape[1] for t in tensors)
        p = gguf_pack.pack(qtype, raw, k, n)
        del raw, parts
        codes = self.init(f"{key}_codes", p.codes)
        meta = self.init(f"{key}_meta", p.meta)
        for t in tensors:
            self.report.tensor_bytes += t.n_bytes
            self.report.types[t.type_name] = self.report.types.get(t.type_name, 0) + 1
            self.reader.release(self.reader.tensors[t.index])
        self.report.packed_bytes += gguf_pack.packed_nbytes(p)
        self._packed[key] = (codes, meta, qtype, k, n)
        return self._packed[key]

    def linear(self, x: str, key: str, names: list[str], out: str,
               orders: list[np.ndarray | None] | None = None) -> str:
        orders = orders or [None] * len(names)
        if self.weights == "float":
            return self._float_linear(x, key, names, orders, out)
        codes, meta, qtype, k, n = self.packed(key, names, orders)
        self.report.linears += 1
        return self.node("BlockLinear", [x, codes, meta], out, domain=DOMAIN, qtype=qtype, K=k, N=n)

    def gather(self, ids: str, name: str, out: str) -> str:
        if self.weights == "float":
            w = self._dequantized(name).T  # [N (rows), K]
            return self.node("Gather", [self.init(f"{name}_rows", w), ids], out, axis=0)
        codes, meta, qtype, k, n = self.packed(name, [name], [None])
        return self.node("BlockGather", [ids, codes, meta], out, domain=DOMAIN, qtype=qtype, K=k, N=n)

    def _dequantized(self, name: str, order: np.ndarray | None = None) -> np.ndarray:
        """[K, N] float32 of a weight (the float twin only: tests and diagnosis)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self.m.tensor(name)
        raw = self.raw(name)
        rows = dequantize(raw[order] if order is not None else raw, GGMLQuantizationType(t.qtype))
        return np.asarray(rows, dtype=np.float32).reshape(t.shape[1], t.shape[0]).T

    def _float_linear(self, x: str, key: str, names: list[str], orders, out: str) -> str:
        w = np.concatenate([self._dequantized(n, o) for n, o in zip(names, orders, strict=True)], axis=1)
        return self.node("MatMul", [x, self.init(f"{key}_w", w)], out)


def _rope_inputs(g: GraphWriter, rope: Rope, positions: int, cache: dict) -> tuple[str, str]:
    key = (rope.base, rope.scaling, rope.factor, rope.factors)
    if key not in cache:
        factors = g.vector(rope.factors) if rope.factors else None
        cos, sin = rope_tables(rope, g.m.head_dim, positions, factors)
        i = len(cache)
        cache[key] = (g.init(f"cos_cache_{i}", cos), g.init(f"sin_cache_{i}", sin))
    return cache[key]


def _qkv(g: GraphWriter, b: LayerTensors, i: int, x: str) -> str:
    """Q, K and V of block i, [B*S, (H + 2G) * D], Q/K rows in the op's rope order, biased and normed."""
    m = g.m
    q_order = rows_order(b.rope, m.head_dim, m.heads)
    k_order = rows_order(b.rope, m.head_dim, m.kv_heads)
    qw, kw = m.heads * m.head_dim, m.kv_heads * m.head_dim
    if b.qkv:
        order = None
        if q_order is not None:
            order = np.concatenate([q_order, qw + k_order, qw + kw + np.arange(kw)])
        qkv = g.linear(x, f"l{i}_qkv", [b.qkv], f"qkv_{i}", [order])
        g.report.fused["qkv"] = g.report.fused.get("qkv", 0) + 1
    elif len({m.tensor(n).qtype for n in (b.q, b.k, b.v)}) == 1:
        qkv = g.linear(x, f"l{i}_qkv", [b.q, b.k, b.v], f"qkv_{i}", [q_order, k_order, None])
        g.report.fused["qkv"] = g.report.fused.get("qkv", 0) + 1
    else:
        parts = [g.linear(x, f"l{i}_{r}", [n], f"{r}proj_{i}", [o])
                 for r, n, o in (("q", b.q, q_order), ("k", b.k, k_order), ("v", b.v, None))]
        qkv = g.node("Concat", parts, f"qkv_{i}", axis=-1)
    if b.qkv_bias or b.q_bias or b.k_bias or b.v_bias:
        if b.qkv_bias:
            bias = g.vector(b.qkv_bias)
            if q_order is not None:
                bias = np.concatenate([bias[:qw][q_order], bias[qw:qw + kw][k_order], bias[qw + kw:]])
        else:
            bias = np.concatenate([g.vector(b.q_bias, q_order) if b.q_bias else np.zeros(qw, np.float32),
                                   g.vector(b.k_bias, k_order) if b.k_bias else np.zeros(kw, np.float32),
                                   g.vector(b.v_bias) if b.v_bias else np.zeros(kw, np.float32)])
        qkv = g.node("Add", [qkv, g.init(f"l{i}_qkv_bias", bias)], f"qkv_b_{i}")
    if b.q_norm or b.k_norm:
        head_order = None if q_order is None else q_order[: m.head_dim]
        q, k, v = (f"q_{i}", f"k_{i}", f"v_{i}")
        g.node("Split", [qkv, g.const([qw, kw, kw])], [q, k, v], axis=-1)
        for norm, name in ((b.q_norm, q), (b.k_norm, k)):
            if not norm:
                continue
            heads = g.node("Reshape", [name, g.const([-1, m.head_dim])], f"{name}_heads")
            normed = g.node("SimplifiedLayerNormalization", [heads, g.init(norm, g.vector(norm, head_order))],
                            f"{name}_normed", axis=-1, epsilon=m.rms_eps)
            g.node("Reshape", [normed, g.const([-1, qw if name == q else kw])], f"{name}_n")
        qkv = g.node("Concat", [f"{q}_n" if b.q_norm else q, f"{k}_n" if b.k_norm else k, v], f"qkv_n_{i}", axis=-1)
    return qkv


def _mlp(g: GraphWriter, b: LayerTensors, i: int, y: str) -> str:
    m = g.m
    if b.gate_up or m.tensor(b.gate).qtype == m.tensor(b.up).qtype:
        names = [b.gate_up] if b.gate_up else [b.gate, b.up]
        gu = g.linear(y, f"l{i}_gate_up", names, f"gu_{i}")
        g.report.fused["gate_up"] = g.report.fused.get("gate_up", 0) + 1
        gate, up = f"g_{i}", f"u_{i}"
        g.node("Split", [gu, g.const([m.intermediate, m.intermediate])], [gate, up], axis=-1)
    else:
        gate = g.linear(y, f"l{i}_gate", [b.gate], f"g_{i}")
        up = g.linear(y, f"l{i}_up", [b.up], f"u_{i}")
    if b.gate_bias:
        gate = g.node("Add", [gate, g.init(b.gate_bias, g.vector(b.gate_bias))], f"gb_{i}")
    if b.up_bias:
        up = g.node("Add", [up, g.init(b.up_bias, g.vector(b.up_bias))], f"ub_{i}")
    if m.activation == "gelu_tanh":
        act = g.node("FastGelu", [gate], f"gelu_{i}", domain="com.microsoft")  # GELU, tanh approximation
    else:
        sig = g.node("Sigmoid", [gate], f"gs_{i}")
        act = g.node("Mul", [gate, sig], f"silu_{i}")
    h = g.node("Mul", [act, up], f"act_{i}")
    down = g.linear(h, f"l{i}_down", [b.down], f"down_{i}")
    if b.down_bias:
        down = g.node("Add", [down, g.init(b.down_bias, g.vector(b.down_bias))], f"downb_{i}")
    return down


def build_gguf_graph(model: GGUFModel, reader, out_dir: Path, last_only: bool = True, weights: str = "native",
                     kv_format: str = "float16", progress: Callable[[str], None] | None = None) -> BuildReport:
    """Writes NATIVE_GRAPH (+ .data) for `model` into out_dir; returns what was packed.

    `weights="float"` writes the float twin instead: every weight dequantized to fp32 MatMul /
    Gather (onnxruntime's kernels) around the same native Attention, for tests and diagnosis only
    (it holds the float weights in memory)."""
    import onnx
    from onnx import TensorProto, helper

    if weights not in ("native", "float"):
        raise ValueError("weights must be 'native' or 'float'")
    if kv_format != "float16":
        raise GGUFUnsupported("GGUF models keep their KV cache in fp16 (kv_format float16)")
    m = model
    out_dir.mkdir(parents=True, exist_ok=True)
    data = ExternalData(out_dir / (NATIVE_GRAPH + ".data"))
    g = GraphWriter(m, reader, data, weights)
    try:
        positions = m.context_length
        # Row lengths of the batch (the op's seqlens_k: total length - 1) and the shapes around it.
        rows = g.node("ReduceSum", ["attention_mask", g.const([1])], "mask_rows", keepdims=0)
        g.node("Sub", [rows, g.const([1])], "seqlens_k_i64")
        g.node("Cast", ["seqlens_k_i64"], "seqlens_k", to=TensorProto.INT32)
        g.node("Shape", ["input_ids"], "ids_shape")
        qkv_width = (m.heads + 2 * m.kv_heads) * m.head_dim
        g.node("Concat", ["ids_shape", g.const([qkv_width])], "qkv_shape3", axis=0)
        g.node("Concat", ["ids_shape", g.const([m.hidden])], "hidden_shape3", axis=0)

        h = g.gather("input_ids", m.embedding, "embed_3d")
        h = g.node("Reshape", [h, g.const([-1, m.hidden])], "embed")
        if m.embedding_scale != 1.0:
            h = g.node("Mul", [h, g.const([m.embedding_scale], np.float32)], "embed_scaled")
        rope_cache: dict = {}
        residual, pending = h, None  # pending: the last block's output, not yet added to the residual
        for i, b in enumerate(m.blocks):
            if progress:
                progress(f"block {i + 1}/{m.layers}")
            ln1 = g.init(b.attn_norm, g.vector(b.attn_norm))
            if pending is None:
                x = g.node("SimplifiedLayerNormalization", [residual, ln1], f"x_{i}", axis=-1, epsilon=m.rms_eps)
            else:  # the last block's output joins the residual stream here
                x = f"x_{i}"
                g.node("SkipSimplifiedLayerNormalization", [pending, residual, ln1], [x, "", "", f"res_{i}"],
                       domain="com.microsoft", epsilon=m.rms_eps)
                residual = f"res_{i}"
            qkv = _qkv(g, b, i, x)
            qkv3 = g.node("Reshape", [qkv, "qkv_shape3"], f"qkv3_{i}")
            cos, sin = _rope_inputs(g, b.rope, positions, rope_cache)
            attrs = {"num_heads": m.heads, "kv_num_heads": m.kv_heads, "scale": float(m.attention_scale),
                     "kv_format": kv_format}
            if b.sliding_window:
                attrs["sliding_window"] = int(b.sliding_window)
            if m.attn_softcap:
                attrs["softcap"] = float(m.attn_softcap)
            g.node("Attention", [qkv3, f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
                                 cos, sin, "kv_pages"],
                   [f"attn3_{i}", f"present.{i}.key", f"present.{i}.value"], domain=DOMAIN, **attrs)
            attn = g.node("Reshape", [f"attn3_{i}", g.const([-1, m.heads * m.head_dim])], f"attn_{i}")
            o = g.linear(attn, f"l{i}_o", [b.o], f"o_{i}")
            if b.o_bias:
                o = g.node("Add", [o, g.init(b.o_bias, g.vector(b.o_bias))], f"ob_{i}")
            if b.post_attn_norm:
                o = g.node("SimplifiedLayerNormalization", [o, g.init(b.post_attn_norm, g.vector(b.post_attn_norm))],
                           f"o_post_{i}", axis=-1, epsilon=m.rms_eps)
            y = f"y_{i}"
            g.node("SkipSimplifiedLayerNormalization", [o, residual, g.init(b.ffn_norm, g.vector(b.ffn_norm))],
                   [y, "", "", f"res2_{i}"], domain="com.microsoft", epsilon=m.rms_eps)
            down = _mlp(g, b, i, y)
            if b.post_ffn_norm:
                down = g.node("SimplifiedLayerNormalization",
                              [down, g.init(b.post_ffn_norm, g.vector(b.post_ffn_norm))],
                              f"down_post_{i}", axis=-1, epsilon=m.rms_eps)
            pending, residual = down, f"res2_{i}"

        # Back to [B, S, H]; the last position only unless every position is asked for.
        down3 = g.node("Reshape", [pending, "hidden_shape3"], "down_3d")
        res3 = g.node("Reshape", [residual, "hidden_shape3"], "res_3d")
        if last_only:
            ends = [g.const([-1]), g.const([np.iinfo(np.int64).max]), g.const([1])]
            down3 = g.node("Slice", [down3, *ends], "down_last")
            res3 = g.node("Slice", [res3, *ends], "res_last")
        final = g.init(m.output_norm, g.vector(m.output_norm))
        g.node("SkipSimplifiedLayerNormalization", [down3, res3, final], "hidden_last", domain="com.microsoft",
               epsilon=m.rms_eps)
        out = "logits"
        pre = "logits_raw" if (m.output_bias or m.final_softcap) else out
        h = g.linear("hidden_last", m.output, [m.output], pre)
        if m.output_bias:
            h = g.node("Add", [h, g.init(m.output_bias, g.vector(m.output_bias))],
                       "logits_biased" if m.final_softcap else out)
        if m.final_softcap:
            cap = g.const([m.final_softcap], np.float32)
            scaled = g.node("Div", [h, cap], "logits_over_cap")
            g.node("Mul", [g.node("Tanh", [scaled], "logits_tanh"), cap], out)
    finally:
        data.close()

    kv_shape = ["kv_pages_total", m.kv_heads, "page_size", m.head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("kv_pages", TensorProto.INT32, ["batch_size", "pages_per_row"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["batch_size", 1 if last_only else "sequence_length", m.vocab])]
    for i in range(m.layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT16, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT16, kv_shape))
    graph = helper.make_graph(g.nodes, f"tokenwire_gguf_{m.architecture}", inputs, outputs, initializer=g.inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1), helper.make_opsetid(DOMAIN, 1)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="tokenwire-gguf")
    proto.ir_version = 8
    onnx.save_model(proto, str(out_dir / NATIVE_GRAPH))  # references only: the weights are in the .data file
    return g.report


def config_json(model: GGUFModel, eos_ids: list[int] | None = None, bos_id: int | None = None) -> dict:
    """The config.json the engine (ModelConfig, TokenizerBundle) reads for a GGUF model's graph."""
    m = model
    config = {
        "model_type": m.architecture,
        "architectures": [f"GGUF:{m.architecture}"],
        "num_hidden_layers": m.layers,
        "hidden_size": m.hidden,
        "intermediate_size": m.intermediate,
        "num_attention_heads": m.heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "vocab_size": m.vocab,
        "max_position_embeddings": m.context_length,
        "rms_norm_eps": m.rms_eps,
        "rope_theta": next((b.rope.base for b in m.blocks if b.rope and not b.sliding_window), 10000.0),
        "sliding_window": max(b.sliding_window for b in m.blocks) or None,
        "tie_word_embeddings": m.tied,
        "gguf_file_type": m.file_type,
    }
    if eos_ids:
        config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else list(eos_ids)
    if bos_id is not None:
        config["bos_token_id"] = bos_id
    return config
